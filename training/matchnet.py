"""MatchNet (Han et al. 2015) as a reranker: a feature tower shared by both images, a 256-d bottleneck,
and a metric network of three fully connected layers ending in a sigmoid, dropout 0.3, batch 32 (the
research's settings), reading symmetric pair features (`Metric`) where the research concatenated.

Two towers:
  "pretrained"  the EfficientNet-Lite trunk (frozen) -> the embedding and its Linear -> 256 projection:
                its input is the encoder's stored embedding, so training and reranking never run the CNN
                again. Trained listwise over the encoder's own top candidates by default (pair_training).
  "scratch"     a 4-block conv net on 64x64 pixels in [0, 1], trained from scratch on balanced pairs (BCE),
                with an auxiliary class loss: the research's setting, comparable with its 60.87%.
Imports torch: only `simsearch train matchnet` and tests import this module.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from simsearch.encoders.cards import Card, RerankerDetails
from simsearch.errors import SimsearchError
from simsearch.training.configs import MatchNetConfig

log = logging.getLogger(__name__)

TOWERS = ("pretrained", "scratch")


class Augment(nn.Module):
    """In training mode only: a random horizontal flip and shift (up to `shift` of the side) of every image,
    one affine resample for both; identity in eval mode, so the exported tower never augments.

    (B, 3, S, S) -> (B, 3, S, S). The scratch tower over-fits its 18,000 training images without it.
    """

    def __init__(self, shift: float = 0.125):
        super().__init__()
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        n = len(x)
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0] = torch.where(torch.rand(n, device=x.device) < 0.5, -1.0, 1.0)  # mirror or not
        theta[:, 1, 1] = 1.0
        theta[:, :, 2] = (torch.rand(n, 2, device=x.device) * 2 - 1) * 2 * self.shift  # grid units: side = 2
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)


def conv_tower(bottleneck: int) -> nn.Module:
    """(B, 3, 64, 64) in [0, 1] -> (B, bottleneck)."""
    # BatchNorm of the input standardises each channel with statistics learnt in training (no hand-set mean).
    layers: list[nn.Module] = [Augment(), nn.BatchNorm2d(3)]
    width = 3
    # Widths chosen for 2 CPU cores: (16, 32, 64, 128) costs ~1 GMAC per 64-image batch forward, a quarter
    # of (32, 64, 128, 256), which ran at ~0.5 s per training step and did not finish an epoch in budget.
    for out in (16, 32, 64, 128):  # 64 -> 32 -> 16 -> 8 -> 4
        layers += [nn.Conv2d(width, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
        width = out
    # A linear bottleneck: the metric's product features want signed values (a final ReLU left units dead).
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * 4 * 4, bottleneck))


class FeatureTower(nn.Module):
    """(B, in_dim) encoder embedding -> (B, in_dim + bottleneck): the embedding itself, then its learned projection.

    The embedding is passed through so the metric network sees the first-stage cosine (the vector search's
    own score) beside the learned comparison; the db already stores it, so keeping it costs nothing.
    """

    def __init__(self, in_dim: int, bottleneck: int):
        super().__init__()
        self.project = nn.Linear(in_dim, bottleneck)  # linear: the product features need signed values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.project(x)], dim=1)


class Metric(nn.Module):
    """Two representations (B, r), (B, r) -> logit of P(same): FC-ReLU-dropout x2, FC (a sigmoid in forward).

    Its input is the pair's symmetric features, the bottlenecks' elementwise product and absolute
    difference (B, 2 * bottleneck), plus, when the tower passes `raw` embedding dims through first, the
    embeddings' cosine (B, 1). The research concatenated the two bottlenecks; a concatenation has no
    built-in notion of "this candidate against this query", and reranking with it fell below the vector
    search (docs/training.md, "Reranking").
    """

    def __init__(self, bottleneck: int, hidden: int, dropout: float, raw: int = 0):
        super().__init__()
        self.raw = raw
        self.net = nn.Sequential(nn.Linear(2 * bottleneck + (1 if raw else 0), hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def features(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # L2-normalised and scaled so each feature is O(1) whatever the tower's scale: raw ReLU bottlenecks
        # multiplied elementwise blew up and killed the scratch tower's units in its first epoch.
        scale = (a.shape[1] - self.raw) ** 0.5
        pa, pb = (F.normalize(r[:, self.raw:], dim=1) * scale for r in (a, b))  # (B, bottleneck)
        parts = [pa * pb, (pa - pb).abs()]
        if self.raw:
            parts.append((a[:, :self.raw] * b[:, :self.raw]).sum(1, keepdim=True))  # (B, 1) cosine
        return torch.cat(parts, dim=1)

    def logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(self.features(a, b)).squeeze(1)

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
    neighbours = nearest_neighbours(data[train_idx], 50) if cfg.hard_fraction else None  # (n_train, 50)

    torch.manual_seed(cfg.seed)
    tower = conv_tower(cfg.bottleneck) if scratch else FeatureTower(data.shape[1], cfg.bottleneck)
    metric = Metric(cfg.bottleneck, cfg.hidden, cfg.dropout, raw=0 if scratch else data.shape[1])
    details = RerankerDetails(input="pixels" if scratch else "encoder", image_size=cfg.image_size if scratch else 0,
                              representation=(), tower=cfg.tower)
    tower_shape = (1, 3, cfg.image_size, cfg.image_size) if scratch else (1, data.shape[1])
    # The scratch tower also learns to name each image's class (a linear classifier on its bottleneck, trained
    # alongside and then dropped): pairs alone teach a from-scratch conv net slowly (docs/training.md, "Reranking").
    classifier = nn.Linear(cfg.bottleneck, len(ds.classes)) if scratch and cfg.class_loss else None
    return train_reranker(cfg, "matchnet", "" if scratch else cfg.encoder, details, tower, metric, tower, tower_shape,
                          batch_of, ds.labels, train_idx, val_idx, budget, models_dir, on_progress, neighbours,
                          classifier, None if scratch else data)
