"""Barlow Twins, self-supervised on the user's images: a projector on a frozen base encoder.

CPU mode (why): on 2 cores the base encoder runs at ~150 img/s, so training it end to end for even
one epoch over 20,000 images and two views would take ~5 minutes per epoch *forward only*. Instead,
each image's two augmented views (the Barlow Twins recipe, with kornia) go through the frozen base
encoder once, their features are cached on disk (so an interrupted run resumes where it stopped),
and the projector (Linear-BN-ReLU x2, Linear) is trained on the cached pairs with the Barlow Twins
loss; an epoch then takes seconds. The exported encoder is base + projector, L2-normalised.
The price: one fixed pair of views per image instead of fresh views every epoch, and a frozen trunk.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from simsearch.devices import torch_device
from simsearch.encoders.cards import Card
from simsearch.training.configs import BarlowConfig

log = logging.getLogger(__name__)


def barlow_loss(z1, z2, lambda_offdiag: float):
    """Cross-correlation of batch-standardised embeddings pushed to the identity: (B, D), (B, D) -> scalar."""
    import torch

    b = z1.shape[0]
    z1 = (z1 - z1.mean(0)) / (z1.std(0) + 1e-6)
    z2 = (z2 - z2.mean(0)) / (z2.std(0) + 1e-6)
    c = z1.T @ z2 / b  # (D, D)
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on + lambda_offdiag * off


def train_barlow(cfg: BarlowConfig, models_dir: Path | None = None, on_progress=None) -> Card:
    import torch

    from simsearch.training.encoder_training import check_name, head_trainer, train_head
    from simsearch.training.features import train_and_holdout
    from simsearch.training.heads import HeadOnFeatures, build_head
    from simsearch.training.loop import Budget, EpochPlan
    from simsearch.training.views import view_features

    check_name(cfg.name)
    budget = Budget(cfg.max_minutes)
    # Labels are used only to hold out validation pair sets; training itself never sees them.
    data = train_and_holdout(cfg, models_dir, on_progress)
    base, train, val = data.base, data.train, data.val
    train_paths = train.paths
    if cfg.max_images:
        train_paths = [train_paths[i] for i in np.random.default_rng(cfg.seed).permutation(len(train_paths))[:cfg.max_images]]
    views = view_features(base, train_paths, models_dir, cfg.device, cfg.seed, on_progress)  # (2, N, dim)
    log.info("barlow: %d images x 2 views, %d held out, base %s", views.shape[1], len(val.y), base.name)

    torch.manual_seed(cfg.seed)
    head_arch = {"in": base.dim, "hidden": [cfg.hidden, cfg.hidden], "out": cfg.dim}
    device = torch_device(cfg.device, torch.cuda.is_available())
    model = HeadOnFeatures(build_head(head_arch)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    v1, v2 = torch.from_numpy(views[0]).to(device), torch.from_numpy(views[1]).to(device)
    batch = min(cfg.batch_size, len(v1))

    def plan(epoch: int) -> EpochPlan:
        order = torch.randperm(len(v1))

        def step(i: int):
            idx = order[i * batch:(i + 1) * batch]
            # The loss sees the projector's raw output (standardised per batch), not the normalised embedding.
            return barlow_loss(model.head(v1[idx]), model.head(v2[idx]), cfg.lambda_offdiag), {}

        return EpochPlan(len(order) // batch, step)

    trainer = head_trainer(model, opt, plan, val, cfg.seed, cfg.collapse_cosine)
    return train_head(cfg, "barlow", data, head_arch, trainer, f"{len(val.y)} images of the {cfg.split} split "
                      f"({val.kind}); trained on {views.shape[1]} others", budget, models_dir, train_paths, on_progress)
