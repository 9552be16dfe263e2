"""Torch modules of trained encoders: a base encoder followed by a trained head, L2-normalised."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from simsearch.encoders.cards import HEAD, Card
from simsearch.encoders.registry import get_encoder
from simsearch.encoders.spec import EncoderSpec


class Blended(nn.Module):
    """(B, in) L2-normalised base embedding -> (B, in + out) [sqrt(1 - w) x, sqrt(w) L2norm(project(x))], unit norm:
    its cosine is (1 - w) times the base's plus w times the projection's (training/whitening.py)."""

    def __init__(self, project: nn.Module, blend: float):
        super().__init__()
        self.project = project
        self.blend = blend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([(1 - self.blend) ** 0.5 * x, self.blend ** 0.5 * F.normalize(self.project(x), dim=1)], dim=1)


def head_dim(arch: dict) -> int:
    """The embedding width a head of this architecture outputs."""
    return arch["out"] + (arch["in"] if "blend" in arch else 0)


def build_head(arch: dict) -> nn.Module:
    """{"in": 1280, "hidden": [2048, 2048], "out": 256}: (B, in) -> (B, out).

    (Linear-BN-ReLU) per hidden width, then a Linear: the Barlow Twins projector's shape, and with one
    hidden layer the triplet projection head; no hidden layer is a linear map (learned whitening).
    With "blend": w, that map blended with its input (`Blended`): (B, in) -> (B, in + out).
    """
    layers: list[nn.Module] = []
    width = arch["in"]
    for hidden in arch["hidden"]:
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, arch["out"]))
    return Blended(nn.Sequential(*layers), arch["blend"]) if "blend" in arch else nn.Sequential(*layers)


class HeadOnFeatures(nn.Module):
    """What training optimises: base features (B, in) -> head -> (B, out) L2-normalised."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(x), dim=1)


class StackedEncoder(nn.Module):
    """Image (B, 3, S, S) -> base encoder (B, in) -> head -> (B, out) L2-normalised: what is exported."""

    def __init__(self, base: nn.Module, head: nn.Module):
        super().__init__()
        self.base = base
        self.on_features = HeadOnFeatures(head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.on_features(self.base(x))


def torch_encoder(spec: EncoderSpec, models_dir: Path | None = None) -> nn.Module:
    """A fresh eval-mode torch module for any registered encoder (trained ones recursively from their base)."""
    from simsearch.encoders.export import build_embedding_model

    if not spec.trained:
        return build_embedding_model(spec)
    card = Card.load(Path(spec.card), "encoder")
    head = build_head(card.details.head)
    head.load_state_dict(torch.load(Path(spec.card).parent / HEAD, map_location="cpu", weights_only=True))
    base = torch_encoder(get_encoder(card.base, models_dir), models_dir)
    # A new module starts in training mode: eval() so BatchNorm uses its running statistics.
    return StackedEncoder(base, head).eval()
