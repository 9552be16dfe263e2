"""Triplet fine-tuning: a projection head on a frozen base encoder, trained with semi-hard triplet mining.

Anchors and positives are same-class images (class dataset) or the two sides of a matched pair
(pair folder); negatives are mined in the batch (pytorch-metric-learning's TripletMarginMiner,
"semihard": negatives farther than the positive but inside the margin, which avoids the collapse
batch-hard mining is known for). Batches hold `m_per_class` images of each of batch/m classes.

Guards against the known failure modes, checked every epoch (training/loop.py): embeddings
collapsing to one point (mean pairwise cosine of held-out embeddings), the loss stuck at the margin
(nothing learnt) or at zero with no triplets mined (nothing left to learn). On any of them training
stops with a warning and the best epoch so far is kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simsearch.devices import Device, torch_device
from simsearch.encoders.trained import ModelCard
from simsearch.paths import default_data_dir
from simsearch.training.loop import TrainingStopped

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TripletConfig:
    name: str
    base: str = "efficientnet-lite0"
    data: Path = field(default_factory=default_data_dir)  # $SIMSEARCH_DATA or the shared Tiny ImageNet
    split: str = "train"
    dim: int = 256
    hidden: int = 1024  # 0: a linear projection
    margin: float = 0.1  # held-out sweep on Tiny ImageNet train: 0.1 gave hit@1 28.5% / hit@10 64.5%, 0.2 27.6% / 63.0%
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    m_per_class: int = 4
    epochs: int = 30
    patience: int = 8
    holdout_per_class: int = 10
    max_minutes: float = 20.0
    collapse_cosine: float = 0.9
    # Two augmented views of every training image (the Barlow Twins augmentations, cached and shared with
    # `train barlow`) join the training set as extra samples of their class or pair. Off by default: on
    # Tiny ImageNet they lowered held-out hit@1 from 28% to 21% (the views are too strong as positives).
    views: bool = False
    seed: int = 0
    device: Device = Device.auto


def check_triplet_loss(history: list[dict], margin: float) -> None:
    """Loss at zero with nothing mined (nothing left to learn), or stuck at the margin (nothing learnt)."""
    if history[-1]["triplets"] == 0:
        raise TrainingStopped("no semi-hard triplets mined in a whole epoch (loss at zero: nothing left to learn)")
    if len(history) >= 3 and all(abs(h["loss"] - margin) < 0.02 * margin for h in history[-3:]):
        raise TrainingStopped(f"loss stuck at the margin ({margin}) for 3 epochs")


def train_triplet(cfg: TripletConfig, models_dir: Path | None = None, on_progress=None) -> ModelCard:
    """Train, keep the best epoch by held-out hit@1 + hit@10, export to ONNX and register. Returns the model card."""
    import torch
    from pytorch_metric_learning import losses, miners, samplers

    from simsearch.training.features import train_and_holdout
    from simsearch.training.heads import HeadOnFeatures, build_head
    from simsearch.training.loop import (
        Budget,
        LoopConfig,
        check_name,
        checkpoint_path,
        export_and_install,
        fit,
        make_card,
    )

    check_name(cfg.name)
    budget = Budget(cfg.max_minutes)
    base, train, val = train_and_holdout(cfg, models_dir, on_progress)
    x_train, y_train = train.x, train.y
    if cfg.views:
        from simsearch.training.views import view_features

        views = view_features(base, train.paths, models_dir, cfg.device, cfg.seed, on_progress)  # (2, N, dim)
        x_train, y_train = np.concatenate([train.x, *views]), np.tile(train.y, 3)

    torch.manual_seed(cfg.seed)
    head_arch = {"in": base.dim, "hidden": [cfg.hidden] if cfg.hidden else [], "out": cfg.dim}
    device = torch_device(cfg.device, torch.cuda.is_available())
    model = HeadOnFeatures(build_head(head_arch)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = losses.TripletMarginLoss(margin=cfg.margin)
    miner = miners.TripletMarginMiner(margin=cfg.margin, type_of_triplets="semihard")
    m = 2 if train.kind == "pairs" else cfg.m_per_class  # a pair has exactly two images
    batch = min(cfg.batch_size, len(y_train)) // m * m
    x, y = torch.from_numpy(x_train).to(device), torch.from_numpy(y_train).to(device)

    def run_epoch(epoch: int) -> dict:
        # A fresh sampler per epoch: it shuffles its own label list in place, so a long-lived one would
        # make epoch e depend on every earlier epoch, and a resumed run would train differently.
        sampler = samplers.MPerClassSampler(y_train, m=m, batch_size=batch, length_before_new_iter=len(y_train))
        order = torch.tensor(list(sampler))
        steps = len(order) // batch
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
        return {"loss": total / max(steps, 1), "triplets": mined}

    loop = LoopConfig(cfg.epochs, cfg.patience, budget, cfg.collapse_cosine, cfg.seed)
    ckpt = checkpoint_path(models_dir, cfg)
    result = fit(model, run_epoch, val, loop, lambda history: check_triplet_loss(history, cfg.margin),
                 optimizer=opt, checkpoint=ckpt)
    card = make_card("triplet", cfg.name, base, head_arch, cfg.data, cfg.split, cfg, result,
                     f"{len(val.y)} images of the {cfg.split} split ({val.kind})", budget.spent())
    return export_and_install(card, model.head, models_dir, ckpt)
