"""MatchNet (Han et al. 2015) as a reranker: a feature tower shared by both images, a 256-d bottleneck,
and a metric network of three fully connected layers ending in a sigmoid; BCE on balanced
same/different pairs, Adam lr 1e-4, batch 32, dropout 0.3 (the research's settings).

Two towers:
  "pretrained"  the EfficientNet-Lite trunk (frozen) -> Linear -> 256: its input is the encoder's
                stored embedding, so training and reranking never run the CNN again.
  "scratch"     a 4-block conv net on 64x64 pixels in [0, 1], trained from scratch: the research's
                setting, so its balanced accuracy compares with the research's 60.87%.
Imports torch: only `simsearch train matchnet` and tests import this module.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from simsearch.devices import Device
from simsearch.errors import SimsearchError

log = logging.getLogger(__name__)

TOWERS = ("pretrained", "scratch")


@dataclass(frozen=True)
class MatchNetConfig:
    name: str
    tower: str = "pretrained"
    encoder: str = "efficientnet-lite0"  # tower "pretrained": whose embeddings it reads
    data: Path = Path("../shared/data/tiny-imagenet-200")
    split: str = "train"
    image_size: int = 64  # tower "scratch"
    bottleneck: int = 256
    hidden: int = 256
    dropout: float = 0.3
    lr: float = 1e-4
    batch_size: int = 32
    pairs_per_epoch: int = 64_000
    epochs: int = 40
    patience: int = 5
    holdout_per_class: int = 10
    max_minutes: float = 20.0
    seed: int = 0
    device: Device = Device.auto


def conv_tower(bottleneck: int) -> nn.Module:
    """(B, 3, 64, 64) in [0, 1] -> (B, bottleneck)."""
    layers: list[nn.Module] = []
    width = 3
    # Widths chosen for 2 CPU cores: (16, 32, 64, 128) costs ~1 GMAC per 64-image batch forward, a quarter
    # of (32, 64, 128, 256), which ran at ~0.5 s per training step and did not finish an epoch in budget.
    for out in (16, 32, 64, 128):  # 64 -> 32 -> 16 -> 8 -> 4
        layers += [nn.Conv2d(width, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
        width = out
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * 4 * 4, bottleneck), nn.ReLU())


def feature_tower(in_dim: int, bottleneck: int) -> nn.Module:
    """(B, in_dim) encoder embedding -> (B, bottleneck)."""
    return nn.Sequential(nn.Linear(in_dim, bottleneck), nn.ReLU())


class Metric(nn.Module):
    """Two bottlenecks (B, 256), (B, 256) -> (B,) P(same): FC-ReLU-dropout x2, FC, sigmoid."""

    def __init__(self, bottleneck: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * bottleneck, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([a, b], dim=1)).squeeze(1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(a, b))


def load_pixels(paths: list[Path], size: int) -> np.ndarray:
    """(N, 3, size, size) uint8: kept as bytes (20,000 Tiny ImageNet images = 245 MB), scaled per batch."""
    from simsearch.retrieval.rerank import pixels

    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i in range(0, len(paths), 512):
        out[i:i + 512] = np.round(pixels(paths[i:i + 512], size) * 255).astype(np.uint8)
    return out


def _inputs(cfg: MatchNetConfig, paths: list[Path], models_dir: Path | None, on_progress):
    """Tower inputs for every image, and a function turning a batch of them into float tensors."""
    if cfg.tower == "scratch":
        data = load_pixels(paths, cfg.image_size)
        return data, lambda idx: torch.from_numpy(data[idx].astype(np.float32) / 255.0)
    from simsearch.encoders.spec import get_encoder
    from simsearch.encoders.training.features import base_features

    data = base_features(get_encoder(cfg.encoder, models_dir), paths, models_dir, cfg.device,
                         on_progress and (lambda d, t: on_progress("embedding training images", d, t)))
    return data, lambda idx: torch.from_numpy(data[idx])


def evaluate(tower: nn.Module, metric: Metric, batch_of, labels: np.ndarray, n_pairs: int, seed: int) -> dict:
    from simsearch.benchmarks import datasets, metrics

    tower.eval()
    metric.eval()
    i, j, same = datasets.balanced_pairs(labels, n_pairs, seed)
    with torch.no_grad():
        b = torch.cat([tower(batch_of(np.arange(s, min(s + 512, len(labels))))) for s in range(0, len(labels), 512)])
        p = metric(b[i], b[j]).numpy()
    cm = metrics.confusion(p, same, 0.5)
    return {"balanced_accuracy": cm.balanced_accuracy, "roc_auc": metrics.roc_auc(p, same)}


def train_matchnet(cfg: MatchNetConfig, models_dir: Path | None = None, on_progress=None) -> dict:
    """Train, keep the best epoch by held-out balanced accuracy, export tower + metric to ONNX, register."""
    from simsearch.benchmarks import datasets
    from simsearch.encoders.training.features import FeatureSet, holdout_mask

    if cfg.tower not in TOWERS:
        raise SimsearchError(f"unknown tower {cfg.tower!r} (towers: {', '.join(TOWERS)})")
    t0 = time.perf_counter()
    ds = datasets.load_class_dataset(cfg.data, cfg.split)
    data, batch_of = _inputs(cfg, ds.paths, models_dir, on_progress)
    held = holdout_mask(FeatureSet(np.empty((len(ds.labels), 0)), ds.labels, "classes"), cfg.holdout_per_class, cfg.seed)
    train_idx, val_idx = np.flatnonzero(~held), np.flatnonzero(held)
    log.info("matchnet (%s tower): %d training images, %d held out", cfg.tower, len(train_idx), len(val_idx))

    torch.manual_seed(cfg.seed)
    tower = conv_tower(cfg.bottleneck) if cfg.tower == "scratch" else feature_tower(data.shape[1], cfg.bottleneck)
    metric = Metric(cfg.bottleneck, cfg.hidden, cfg.dropout)
    params = [*tower.parameters(), *metric.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    bce = nn.BCEWithLogitsLoss()
    history, best, best_state = [], {"balanced_accuracy": -1.0}, None
    stopped = "epochs done"
    for epoch in range(cfg.epochs):
        torch.manual_seed(cfg.seed + epoch)
        i, j, same = datasets.balanced_pairs(ds.labels[train_idx], cfg.pairs_per_epoch, cfg.seed + 1 + epoch)
        order = np.random.default_rng(cfg.seed + epoch).permutation(len(i))
        tower.train()
        metric.train()
        total, steps = 0.0, len(order) // cfg.batch_size
        for step in range(steps):
            sel = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            a = tower(batch_of(train_idx[i[sel]]))  # (B, 256)
            b = tower(batch_of(train_idx[j[sel]]))
            loss = bce(metric.logits(a, b), torch.from_numpy(same[sel].astype(np.float32)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            if on_progress and step % 50 == 0:
                on_progress(f"epoch {epoch + 1}/{cfg.epochs} loss {total / (step + 1):.4f}", step + 1, steps)
        row = {"epoch": epoch + 1, "loss": total / max(steps, 1),
               **evaluate(tower, metric, lambda idx: batch_of(val_idx[idx]), ds.labels[val_idx], 10_000, cfg.seed),
               "seconds": time.perf_counter() - t0}
        history.append(row)
        log.info("epoch %d: loss %.4f, held-out balanced accuracy %.4f, AUC %.4f", row["epoch"], row["loss"],
                 row["balanced_accuracy"], row["roc_auc"])
        if row["balanced_accuracy"] > best["balanced_accuracy"]:
            best = row
            best_state = ({k: v.clone() for k, v in tower.state_dict().items()},
                          {k: v.clone() for k, v in metric.state_dict().items()})
        if row["epoch"] - best["epoch"] >= cfg.patience:
            stopped = f"no better held-out balanced accuracy for {cfg.patience} epochs"
            break
        if time.perf_counter() - t0 > cfg.max_minutes * 60:
            stopped = f"time budget of {cfg.max_minutes} minutes reached"
            break
    tower.load_state_dict(best_state[0])
    metric.load_state_dict(best_state[1])
    card = {
        "name": cfg.name, "arch": "matchnet", "tower": cfg.tower,
        "input": "pixels" if cfg.tower == "scratch" else "encoder",
        "encoder": cfg.encoder if cfg.tower == "pretrained" else "", "image_size": cfg.image_size,
        "data": str(cfg.data), "split": cfg.split,
        "hyper_parameters": {k: str(v) if isinstance(v, (Path, Device)) else v for k, v in asdict(cfg).items()},
        "train_seconds": time.perf_counter() - t0,
        "validation": {**best, "held_out": f"{len(val_idx)} images of {cfg.split}, 10,000 balanced pairs",
                       "history": history, "stopped": stopped},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    tower_shape = (1, 3, cfg.image_size, cfg.image_size) if cfg.tower == "scratch" else (1, data.shape[1])
    export_reranker(card, tower, metric, tower_shape, models_dir)
    return card


class _Probability(nn.Module):
    """The metric network as exported: P(same), not logits."""

    def __init__(self, metric: Metric):
        super().__init__()
        self.metric = metric

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.metric(a, b)


def export_reranker(card: dict, tower: nn.Module, metric: Metric, tower_shape: tuple[int, ...],
                    models_dir: Path | None) -> Path:
    """tower.onnx + metric.onnx + card.json into <models_dir>/rerankers/<name>/, swapped in atomically."""
    from simsearch.encoders.export import export_module, sha256_file
    from simsearch.encoders.trained import replace_dir
    from simsearch.retrieval.rerank import CARD, METRIC, TOWER, rerankers_root

    root = rerankers_root(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".work-{card['name']}-", dir=root))
    # eval(): dropout off and BatchNorm on running statistics, or the export bakes in batch statistics.
    export_module(tower.eval(), tower_shape, work / TOWER)
    export_module(_Probability(metric).eval(), (1, card_bottleneck(card)), work / METRIC, n_inputs=2)
    torch.save({"tower": tower.state_dict(), "metric": metric.state_dict()}, work / "weights.pt")  # to fine-tune further
    card["onnx_sha256"] = {TOWER: sha256_file(work / TOWER), METRIC: sha256_file(work / METRIC)}
    (work / CARD).write_text(json.dumps(card, indent=1))
    final = replace_dir(work, root / card["name"])
    log.info("reranker %s registered", card["name"])
    return final


def card_bottleneck(card: dict) -> int:
    return int(card["hyper_parameters"]["bottleneck"])
