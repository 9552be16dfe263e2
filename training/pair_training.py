"""What every pair-classifier reranker shares: balanced-pair epochs, held-out validation, keep-best, budget, export.

A reranker is a `tower` (one image's input -> its representation) and a `metric` network (two
representations -> logit of P(same)). Training draws fresh balanced same/different pairs of the train
split every epoch (optionally part of them from each image's nearest neighbours, or a listwise
objective over them), validates on pairs of held-out images, keeps the epoch with the best held-out
balanced accuracy, and stops on patience or the time budget. Imports torch: training only.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from simsearch.devices import Device
from simsearch.paths import rerankers_dir
from simsearch.training.loop import Budget

log = logging.getLogger(__name__)

BatchOf = Callable[[np.ndarray], torch.Tensor]  # image indices (n,) -> tower inputs (n, ...)


@dataclass(frozen=True)
class PairFitConfig:
    lr: float
    batch_size: int
    pairs_per_epoch: int
    epochs: int
    patience: int
    seed: int
    weight_decay: float = 0.0
    val_pairs: int = 10_000
    hard_fraction: float = 0.0  # share of each epoch's pairs drawn as (image, one of its nearest neighbours)
    listwise: bool = False  # train on each image's nearest neighbours + a positive, softmax over them

    @classmethod
    def of(cls, trainer_config) -> PairFitConfig:
        """The loop's settings, read off a reranker's config (MatchNetConfig, BeitPairConfig) by field name."""
        return cls(**{f.name: getattr(trainer_config, f.name) for f in fields(cls) if hasattr(trainer_config, f.name)})


def holdout_split(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of training images and of held-out images (per_class of every class)."""
    from simsearch.training.features import FeatureSet, holdout_mask

    held = holdout_mask(FeatureSet(np.empty((len(labels), 0)), labels, "classes"), per_class, seed)
    return np.flatnonzero(~held), np.flatnonzero(held)


def nearest_neighbours(x: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """(N, k) indices of each row's k nearest other rows by cosine (x L2-normalised), in blocks of rows."""
    out = np.empty((len(x), k), np.int64)
    for s in range(0, len(x), block):
        sims = x[s:s + block] @ x.T  # (b, N)
        sims[np.arange(len(sims)), np.arange(s, s + len(sims))] = -np.inf  # not itself
        out[s:s + len(sims)] = np.argpartition(-sims, k, axis=1)[:, :k]
    return out


def hard_pairs(neighbours: np.ndarray, labels: np.ndarray, n: int, seed: int):
    """n pairs (i, one of i's nearest neighbours), labelled by class: the candidates a reranker sees at query
    time are a query's nearest neighbours, not random images, so it must learn to tell those apart."""
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(neighbours), n)
    j = neighbours[i, rng.integers(0, neighbours.shape[1], n)]
    return i, j, labels[i] == labels[j]


def listwise_loss(tower: nn.Module, metric: nn.Module, batch_of: BatchOf, train_idx: np.ndarray, labels: np.ndarray,
                  queries: np.ndarray, neighbours: np.ndarray, rng: np.random.Generator, device: str) -> torch.Tensor:
    """What reranking asks for: among a query's nearest neighbours, one same-class image and as many random
    images, put the same-class ones first. Cross-entropy of the softmax over the candidates' logits against
    a uniform distribution on the same-class candidates. queries: (Q,) train-local indices; labels: train-local.

    The random images matter: with near neighbours as the only negatives, "the least similar candidate"
    would give the positive away (measured: a model trained so reranked at chance level).
    """
    same_class = [np.flatnonzero(labels == labels[q]) for q in queries]
    pos = np.array([rng.choice(c[c != q]) for q, c in zip(queries, same_class)])
    k = neighbours.shape[1]
    far = rng.integers(0, len(labels), (len(queries), k))
    cands = np.concatenate([pos[:, None], neighbours[queries], far], axis=1)  # (Q, 1 + 2k)
    target = torch.from_numpy((labels[cands] == labels[queries][:, None]).astype(np.float32)).to(device)
    target = target / target.sum(1, keepdim=True)
    a = tower(batch_of(train_idx[queries]).to(device))  # (Q, d)
    b = tower(batch_of(train_idx[cands.ravel()]).to(device))  # (Q * (1 + 2k), d)
    logits = metric.logits(a.repeat_interleave(cands.shape[1], 0), b).view(cands.shape)  # (Q, 1 + 2k)
    return -(target * torch.log_softmax(logits, 1)).sum(1).mean()


def predict(tower: nn.Module, metric: nn.Module, batch_of: BatchOf, n: int, i: np.ndarray, j: np.ndarray,
            block: int = 512) -> np.ndarray:
    """P(same) of pairs (i[p], j[p]) of n images: the tower runs once per image, the metric once per pair."""
    tower.eval()
    metric.eval()
    device = next(metric.parameters()).device
    with torch.no_grad():
        reps = torch.cat([tower(batch_of(np.arange(s, min(s + block, n))).to(device)) for s in range(0, n, block)])
        return torch.cat([torch.sigmoid(metric.logits(reps[i[s:s + block]], reps[j[s:s + block]]))
                          for s in range(0, len(i), block)]).cpu().numpy()


def evaluate(tower: nn.Module, metric: nn.Module, batch_of: BatchOf, labels: np.ndarray, n_pairs: int,
             seed: int) -> dict:
    from simsearch.evaluation import datasets, metrics

    i, j, same = datasets.balanced_pairs(labels, n_pairs, seed)
    p = predict(tower, metric, batch_of, len(labels), i, j)
    return {"balanced_accuracy": metrics.confusion(p, same, 0.5).balanced_accuracy, "roc_auc": metrics.roc_auc(p, same)}


def fit_pairs(tower: nn.Module, metric: nn.Module, batch_of: BatchOf, labels: np.ndarray, train_idx: np.ndarray,
              val_idx: np.ndarray, cfg: PairFitConfig, budget: Budget, on_progress=None, device: str = "cpu",
              neighbours: np.ndarray | None = None) -> dict:
    """Train tower + metric (BCE on labelled pairs, or cfg.listwise); leaves both holding the best epoch, on the CPU.

    device: where torch trains ("cuda" or "cpu", from devices.torch_device).
    neighbours: (len(train_idx), k) nearest neighbours among the training images (indices into train_idx),
    for cfg.hard_fraction of the pairs or for cfg.listwise. Returns the validation record.
    """
    from simsearch.evaluation import datasets

    tower.to(device)
    metric.to(device)
    params = [p for p in (*tower.parameters(), *metric.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    bce = nn.BCEWithLogitsLoss()
    history, best, best_state = [], {"balanced_accuracy": -1.0}, None
    stopped = "epochs done"
    for epoch in range(cfg.epochs):
        torch.manual_seed(cfg.seed + epoch)  # dropout: the same run gives the same model
        rng = np.random.default_rng(cfg.seed + epoch)
        if cfg.listwise:  # batches of queries, each against its neighbours and a positive
            queries = rng.permutation(len(train_idx))[: max(1, cfg.pairs_per_epoch // (1 + 2 * neighbours.shape[1]))]
            steps = max(1, len(queries) // cfg.batch_size)

            def step_loss(step: int) -> torch.Tensor:
                sel = queries[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                return listwise_loss(tower, metric, batch_of, train_idx, labels[train_idx], sel, neighbours, rng,
                                     device)
        else:  # batches of labelled pairs
            n_hard = int(cfg.pairs_per_epoch * cfg.hard_fraction) if neighbours is not None else 0
            i, j, same = datasets.balanced_pairs(labels[train_idx], cfg.pairs_per_epoch - n_hard, cfg.seed + 1 + epoch)
            if n_hard:
                hi, hj, hs = hard_pairs(neighbours, labels[train_idx], n_hard, cfg.seed + 1 + epoch)
                i, j, same = np.r_[i, hi], np.r_[j, hj], np.r_[same, hs]
            order = rng.permutation(len(i))
            steps = len(order) // cfg.batch_size

            def step_loss(step: int) -> torch.Tensor:
                sel = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                a = tower(batch_of(train_idx[i[sel]]).to(device))  # (B, ...) one representation per image
                b = tower(batch_of(train_idx[j[sel]]).to(device))
                return bce(metric.logits(a, b), torch.from_numpy(same[sel].astype(np.float32)).to(device))
        tower.train()
        metric.train()
        total, done = 0.0, 0
        for step in range(steps):
            loss = step_loss(step)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            done += 1
            if on_progress and (step % 20 == 0 or step + 1 == steps):
                on_progress(f"epoch {epoch + 1}/{cfg.epochs} loss {total / (step + 1):.4f}", step + 1, steps)
            if budget.over():
                break  # an epoch may be long: the budget is checked per step, and this epoch is still validated
        row = {"epoch": epoch + 1, "loss": total / max(done, 1), "steps": done,
               **evaluate(tower, metric, lambda idx: batch_of(val_idx[idx]), labels[val_idx], cfg.val_pairs, cfg.seed),
               "seconds": budget.spent()}
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
        if budget.over():
            stopped = f"time budget of {budget.minutes} minutes reached"
            log.warning("time budget reached in epoch %d", row["epoch"])
            break
    tower.load_state_dict(best_state[0])
    metric.load_state_dict(best_state[1])
    tower.cpu().eval()  # exported and saved from the CPU
    metric.cpu().eval()
    return {**best, "held_out": f"{len(val_idx)} held-out images, {cfg.val_pairs:,} balanced pairs",
            "history": history, "stopped": stopped}


def make_card(cfg, arch: str, input_kind: str, image_size: int, validation: dict, seconds: float, **extra) -> dict:
    return {
        "name": cfg.name, "arch": arch, "input": input_kind, "image_size": image_size,
        "data": str(cfg.data), "split": cfg.split,
        "hyper_parameters": {k: str(v) if isinstance(v, (Path, Device)) or v is None else v
                             for k, v in asdict(cfg).items()},
        "train_seconds": seconds, "validation": validation,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra,
    }


class _Probability(nn.Module):
    """The metric network as exported: P(same), not logits."""

    def __init__(self, metric: nn.Module):
        super().__init__()
        self.metric = metric

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.metric.logits(a, b))


def export_reranker(card: dict, tower: nn.Module, metric: nn.Module, tower_shape: tuple[int, ...],
                    models_dir: Path | None, weights: dict) -> Path:
    """tower.onnx + metric.onnx + weights.pt + card.json into <models_dir>/rerankers/<name>/, swapped in atomically.

    tower_shape: one image's tower input, batch 1; the metric's input shape is read off the tower's output.
    """
    from simsearch.encoders.export import export_module, sha256_file
    from simsearch.encoders.trained import replace_dir
    from simsearch.retrieval.rerank import CARD, METRIC, TOWER

    root = rerankers_dir(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".work-{card['name']}-", dir=root))
    # eval(): dropout off and BatchNorm on running statistics, or the export bakes in batch statistics.
    tower.eval()
    with torch.no_grad():
        rep_shape = tuple(tower(torch.zeros(tower_shape)).shape)
    export_module(tower, tower_shape, work / TOWER)
    export_module(_Probability(metric).eval(), rep_shape, work / METRIC, n_inputs=2)
    torch.save(weights, work / "weights.pt")  # to fine-tune further
    card["representation"] = list(rep_shape[1:])
    card["onnx_sha256"] = {TOWER: sha256_file(work / TOWER), METRIC: sha256_file(work / METRIC)}
    (work / CARD).write_text(json.dumps(card, indent=1))
    final = replace_dir(work, root / card["name"])
    log.info("reranker %s registered", card["name"])
    return final
