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

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from simsearch.encoders.cards import Card, RerankerDetails
from simsearch.errors import SimsearchError
from simsearch.training.configs import MatchNetConfig

log = logging.getLogger(__name__)

TOWERS = ("pretrained", "scratch")


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


def pixel_batches(data: np.ndarray):
    """Image indices -> (n, 3, S, S) float tensors in [0, 1], from the uint8 pixels of load_pixels."""
    return lambda idx: torch.from_numpy(data[idx].astype(np.float32) / 255.0)


def train_matchnet(cfg: MatchNetConfig, models_dir: Path | None = None, on_progress=None) -> Card:
    """Train, keep the best epoch by held-out balanced accuracy, export tower + metric to ONNX, register."""
    from simsearch.encoders.trained import check_model_name
    from simsearch.evaluation import datasets
    from simsearch.training.loop import Budget
    from simsearch.training.pair_training import holdout_split, nearest_neighbours, train_reranker

    if cfg.tower not in TOWERS:
        raise SimsearchError(f"unknown tower {cfg.tower!r} (towers: {', '.join(TOWERS)})")
    if (cfg.hard_fraction or cfg.listwise) and cfg.tower != "pretrained":
        raise SimsearchError("--hard-negatives and --listwise use the encoder's nearest neighbours: use --tower pretrained")
    check_model_name(cfg.name)
    budget = Budget(cfg.max_minutes)  # the whole command: data preparation counts too
    ds = datasets.load_class_dataset(cfg.data, cfg.split)
    scratch = cfg.tower == "scratch"
    if scratch:
        data = load_pixels(ds.paths, cfg.image_size)
        batch_of = pixel_batches(data)
    else:
        from simsearch.encoders.registry import get_encoder
        from simsearch.training.features import base_features

        data = base_features(get_encoder(cfg.encoder, models_dir), ds.paths, models_dir, cfg.device,
                             on_progress and (lambda d, t: on_progress("embedding training images", d, t)))
        batch_of = lambda idx: torch.from_numpy(data[idx])  # noqa: E731
    train_idx, val_idx = holdout_split(ds.labels, cfg.holdout_per_class, cfg.seed)
    log.info("matchnet (%s tower): %d training images, %d held out", cfg.tower, len(train_idx), len(val_idx))
    neighbours = nearest_neighbours(data[train_idx], 50) if cfg.hard_fraction or cfg.listwise else None  # (n_train, 50)

    torch.manual_seed(cfg.seed)
    tower = conv_tower(cfg.bottleneck) if scratch else feature_tower(data.shape[1], cfg.bottleneck)
    metric = Metric(cfg.bottleneck, cfg.hidden, cfg.dropout)
    details = RerankerDetails(input="pixels" if scratch else "encoder", image_size=cfg.image_size if scratch else 0,
                              representation=(), tower=cfg.tower)
    tower_shape = (1, 3, cfg.image_size, cfg.image_size) if scratch else (1, data.shape[1])
    return train_reranker(cfg, "matchnet", "" if scratch else cfg.encoder, details, tower, metric, tower, tower_shape,
                          batch_of, ds.labels, train_idx, val_idx, budget, models_dir, on_progress, neighbours)
