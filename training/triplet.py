"""Triplet fine-tuning: a projection head on a frozen base encoder, trained with semi-hard triplet mining.

Anchors and positives are same-class images (class dataset) or the two sides of a matched pair
(pair folder); negatives are mined in the batch (pytorch-metric-learning's TripletMarginMiner,
"semihard": negatives farther than the positive but inside the margin, which avoids the collapse
batch-hard mining is known for). Batches hold `m_per_class` images of each of batch/m classes.

Guards against the known failure modes, checked every epoch (training/encoder_training.py): embeddings
collapsing to one point (mean pairwise cosine of held-out embeddings), the loss stuck at the margin
(nothing learnt) or at zero with no triplets mined (nothing left to learn). On any of them training
stops with a warning and the best epoch so far is kept.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from simsearch.devices import torch_device
from simsearch.encoders.cards import Card
from simsearch.training.configs import TripletConfig
from simsearch.training.loop import TrainingStopped

log = logging.getLogger(__name__)


def check_triplet_loss(history: list[dict], margin: float) -> None:
    """Loss at zero with nothing mined (nothing left to learn), or stuck at the margin (nothing learnt)."""
    if history[-1]["triplets"] == 0:
        raise TrainingStopped("no semi-hard triplets mined in a whole epoch (loss at zero: nothing left to learn)")
    if len(history) >= 3 and all(abs(h["loss"] - margin) < 0.02 * margin for h in history[-3:]):
        raise TrainingStopped(f"loss stuck at the margin ({margin}) for 3 epochs")


def train_triplet(cfg: TripletConfig, models_dir: Path | None = None, on_progress=None) -> Card:
    """Train, keep the best epoch by held-out hit@1 + hit@10, export to ONNX and register. Returns the model card."""
    import torch
    from pytorch_metric_learning import losses, miners, samplers

    from simsearch.training.encoder_training import check_name, head_trainer, train_head
    from simsearch.training.features import train_and_holdout
    from simsearch.training.heads import HeadOnFeatures, build_head
    from simsearch.training.loop import Budget, EpochPlan

    check_name(cfg.name)
    budget = Budget(cfg.max_minutes)
    data = train_and_holdout(cfg, models_dir, on_progress)
    base, train, val = data.base, data.train, data.val
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
    # m images of batch/m groups: a dataset with fewer groups gets smaller batches (the sampler refuses more)
    batch = min(cfg.batch_size, len(y_train), m * len(np.unique(y_train))) // m * m
    x, y = torch.from_numpy(x_train).to(device), torch.from_numpy(y_train).to(device)

    def plan(epoch: int) -> EpochPlan:
        # A fresh sampler per epoch: it shuffles its own label list in place, so a long-lived one would
        # make epoch e depend on every earlier epoch, and a resumed run would train differently.
        sampler = samplers.MPerClassSampler(y_train, m=m, batch_size=batch, length_before_new_iter=len(y_train))
        order = torch.tensor(list(sampler))

        def step(i: int):
            idx = order[i * batch:(i + 1) * batch]
            emb = model(x[idx])  # (batch, dim)
            triplets = miner(emb, y[idx])  # (anchors, positives, negatives) indices into the batch
            return loss_fn(emb, y[idx], triplets), {"triplets": len(triplets[0])}

        return EpochPlan(len(order) // batch, step)

    trainer = head_trainer(model, opt, plan, val, cfg.seed, cfg.collapse_cosine,
                           lambda history: check_triplet_loss(history, cfg.margin))
    return train_head(cfg, "triplet", data, head_arch, trainer, f"{len(val.y)} images of the {cfg.split} split "
                      f"({val.kind})", budget, models_dir, train.paths, on_progress)
