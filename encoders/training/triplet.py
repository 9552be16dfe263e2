"""Triplet fine-tuning: a projection head on a frozen base encoder, trained with semi-hard triplet mining.

Anchors and positives are same-class images (class dataset) or the two sides of a matched pair
(pair folder); negatives are mined in the batch (pytorch-metric-learning's TripletMarginMiner,
"semihard": negatives farther than the positive but inside the margin, which avoids the collapse
batch-hard mining is known for). Batches hold `m_per_class` images of each of batch/m classes.

Guards against the known failure modes, checked every epoch on a held-out part of the train split:
embeddings collapsing to one point (mean pairwise cosine), the loss stuck at the margin (nothing
learnt) or at zero with no triplets mined (nothing left to learn). On any of them training stops with
a warning and the best epoch so far is kept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from simsearch.devices import Device
from simsearch.encoders.spec import get_encoder, is_builtin
from simsearch.encoders.trained import ModelCard, install, trained_root
from simsearch.errors import SimsearchError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TripletConfig:
    name: str
    base: str = "efficientnet-lite0"
    data: Path = Path("../shared/data/tiny-imagenet-200")
    split: str = "train"
    dim: int = 256
    hidden: int = 1024  # 0: a linear projection
    margin: float = 0.2
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    m_per_class: int = 4
    epochs: int = 30
    patience: int = 8  # epochs without a better held-out score (hit@1 + hit@10) before stopping
    holdout_per_class: int = 10
    max_minutes: float = 20.0
    collapse_cosine: float = 0.9  # mean pairwise cosine of held-out embeddings above this = collapsed
    seed: int = 0
    device: Device = Device.auto


class TrainingStopped(Exception):
    """A guard fired; the message says which."""


def _check_guards(losses: list[float], triplets: int, spread: float, initial_spread: float, cfg: TripletConfig) -> None:
    """spread: mean pairwise cosine of held-out embeddings now; initial_spread: the same before training."""
    limit = max(cfg.collapse_cosine, initial_spread + 0.05)  # an untrained head may already be narrow
    if spread > limit:
        raise TrainingStopped(f"embeddings collapsing (mean pairwise cosine {spread:.3f} > {limit:.3f})")
    if triplets == 0:
        raise TrainingStopped("no semi-hard triplets mined in a whole epoch (loss at zero: nothing left to learn)")
    if len(losses) >= 3 and all(abs(loss - cfg.margin) < 0.02 * cfg.margin for loss in losses[-3:]):
        raise TrainingStopped(f"loss stuck at the margin ({cfg.margin}) for 3 epochs")


def train_triplet(cfg: TripletConfig, models_dir: Path | None = None, on_progress=None) -> ModelCard:
    """Train, keep the best epoch by held-out hit@1 + hit@10, export to ONNX and register. Returns the model card."""
    import torch
    from pytorch_metric_learning import losses, miners, samplers

    from simsearch.benchmarks import metrics
    from simsearch.encoders.training.features import holdout, load_training_set, validation_ranks
    from simsearch.encoders.training.model import HeadOnFeatures, build_head

    if is_builtin(cfg.name):
        raise SimsearchError(f"{cfg.name!r} is a built-in encoder; choose another --name")
    t0 = time.perf_counter()
    base = get_encoder(cfg.base, models_dir)
    data = load_training_set(base, cfg.data, cfg.split, models_dir, cfg.device,
                             on_progress and (lambda d, t: on_progress("embedding training images", d, t)),
                             seed=cfg.seed)
    train, val = holdout(data, cfg.holdout_per_class, cfg.seed)
    log.info("triplet: %d training images, %d held out, base %s (%d-d)", len(train.y), len(val.y), base.name, base.dim)

    torch.manual_seed(cfg.seed)
    head_arch = {"in": base.dim, "hidden": cfg.hidden, "out": cfg.dim}
    model = HeadOnFeatures(build_head(head_arch))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = losses.TripletMarginLoss(margin=cfg.margin)
    miner = miners.TripletMarginMiner(margin=cfg.margin, type_of_triplets="semihard")
    m = 2 if train.kind == "pairs" else cfg.m_per_class  # a pair has exactly two images
    batch = min(cfg.batch_size, len(train.y)) // m * m
    sampler = samplers.MPerClassSampler(train.y, m=m, batch_size=batch, length_before_new_iter=len(train.y))
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)

    def embed(feats: np.ndarray) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            return model(torch.from_numpy(feats)).numpy()

    def mean_cosine() -> float:
        e = embed(val.x[:1000])  # (n, dim)
        return float((e @ e.T).mean())

    initial_spread = mean_cosine()
    history, epoch_losses = [], []
    best = {"score": -1.0}
    best_state = None
    stop_reason = "epochs done"
    for epoch in range(cfg.epochs):
        torch.manual_seed(cfg.seed + epoch)  # the sampler draws from torch's global generator
        order = torch.tensor(list(sampler))
        steps = len(order) // batch
        model.train()
        total, mined = 0.0, 0
        for step in range(steps):
            idx = order[step * batch:(step + 1) * batch]
            emb = model(x[idx])  # (batch, dim)
            triplets = miner(emb, y[idx])
            loss = loss_fn(emb, y[idx], triplets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            mined += len(triplets[0])
            if on_progress:
                on_progress(f"epoch {epoch + 1}/{cfg.epochs} loss {total / (step + 1):.4f}", step + 1, steps)
        epoch_losses.append(total / max(steps, 1))
        ranks = validation_ranks(embed, val, cfg.seed)
        spread = mean_cosine()
        row = {"epoch": epoch + 1, "loss": epoch_losses[-1], "triplets": mined, "mean_cosine": spread,
               "hit1": float(np.mean(ranks < 1)), "hit10": float(np.mean(ranks < 10)),
               "seconds": time.perf_counter() - t0}
        history.append(row)
        log.info("epoch %d: loss %.4f, %d triplets, held-out hit@1 %.3f hit@10 %.3f, mean cosine %.3f",
                 row["epoch"], row["loss"], mined, row["hit1"], row["hit10"], spread)
        # Kept by hit@1 + hit@10: on ~1,000 held-out queries hit@10 alone peaks early and noisily while
        # hit@1 still climbs (measured: epoch 7 24%/62% vs epoch 13 27%/62%).
        row["score"] = row["hit1"] + row["hit10"]
        if row["score"] > best["score"]:
            best = row
            best_state = {k: v.clone() for k, v in model.head.state_dict().items()}
        try:
            _check_guards(epoch_losses, mined, spread, initial_spread, cfg)
        except TrainingStopped as stopped:
            log.warning("stopping early: %s; keeping epoch %d", stopped, best["epoch"])
            stop_reason = str(stopped)
            break
        if row["epoch"] - best["epoch"] >= cfg.patience:
            stop_reason = f"no better held-out hit@1 + hit@10 for {cfg.patience} epochs"
            break
        if time.perf_counter() - t0 > cfg.max_minutes * 60:
            stop_reason = f"--max-minutes {cfg.max_minutes} reached"
            log.warning("time budget reached after epoch %d", row["epoch"])
            break
    model.head.load_state_dict(best_state)
    card = ModelCard(
        name=cfg.name, method="triplet", base=base.name, base_key=base.key, dim=cfg.dim, image_size=base.image_size,
        mean=base.mean, std=base.std, crop_fraction=base.crop_fraction, head=head_arch, data=str(cfg.data),
        split=cfg.split,
        hyper_parameters={k: (str(v) if isinstance(v, (Path, Device)) else v) for k, v in asdict(cfg).items()},
        train_seconds=time.perf_counter() - t0,
        validation={"held_out": f"{len(val.y)} images of the {cfg.split} split ({data.kind})", "best": best,
                    "history": history, "stopped": stop_reason},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return export_and_install(card, model.head, models_dir)


def export_and_install(card: ModelCard, head, models_dir: Path | None) -> ModelCard:
    """Export base + head as one ONNX model (eval mode), then register it under card.name."""
    import tempfile

    import torch

    from simsearch import __version__
    from simsearch.encoders.export import export_module
    from simsearch.encoders.training.model import StackedEncoder, torch_encoder

    card.simsearch_version = __version__
    base = torch_encoder(get_encoder(card.base, models_dir), models_dir)
    full = StackedEncoder(base, head).eval()  # eval: BatchNorm must use running statistics in the export
    root = trained_root(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".work-{card.name}-", dir=root))
    export_module(full, (1, 3, card.image_size, card.image_size), work / "model.onnx")
    torch.save(head.state_dict(), work / "head.pt")
    install(models_dir, card, work / "model.onnx", work / "head.pt")
    work.rmdir()
    log.info("trained encoder %s registered (best held-out hit@10 %.3f)", card.name, card.validation["best"]["hit10"])
    return card
