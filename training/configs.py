"""The configs of the `train` commands: plain frozen dataclasses, importable without torch.

The CLI takes its option defaults from here (one place for every default), and each trainer module
(whitening, barlow, triplet, matchnet, beit_pair) takes its config from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from simsearch.devices import Device
from simsearch.encoders.registry import DEFAULT_BASE
from simsearch.encoders.spec import Preprocess
from simsearch.paths import default_data_dir


@dataclass(frozen=True)
class TrainingConfig:
    """What every `train` command has; each trainer's config adds its own fields and may change a default."""

    name: str
    data: Path = field(default_factory=default_data_dir)  # $SIMSEARCH_DATA when not given
    check_photos: Path | None = None  # an encoder card's near-duplicate check's photos (None: skipped, noted on the card)
    split: str = "train"
    lr: float = 1e-3
    epochs: int = 30
    patience: int = 8  # epochs without a better held-out score before stopping
    holdout_per_class: int = 10  # train images per class held out to choose the best epoch
    max_minutes: float = 20.0
    seed: int = 0
    device: Device = Device.auto


@dataclass(frozen=True)
class HeadConfig(TrainingConfig):
    """What the encoder trainers (a head on a frozen base encoder) add."""

    base: str = DEFAULT_BASE
    # The policy the base sees the training images with (None: the base's own); the trained encoder keeps it.
    preprocess: Preprocess | None = None
    # Share of a class dataset's classes left out of training (seeded), so its card can show what it does on
    # classes it never saw (evaluation/generalisation.py); 0 trains on every class. Pair folders ignore it.
    unseen_classes: float = 0.25


@dataclass(frozen=True)
class BarlowConfig(HeadConfig):
    dim: int = 256  # projector output = the embedding
    hidden: int = 2048  # projector hidden width (the paper: 8192; a frozen 1280-d trunk needs less)
    lambda_offdiag: float = 5e-3
    weight_decay: float = 1e-4
    batch_size: int = 512
    max_images: int = 0  # 0: every image of the split
    collapse_cosine: float = 0.9


@dataclass(frozen=True)
class TripletConfig(HeadConfig):
    dim: int = 256
    hidden: int = 1024  # 0: a linear projection
    margin: float = 0.1  # held-out sweep on Tiny ImageNet train: 0.1 gave hit@1 28.5% / hit@10 64.5%, 0.2 27.6% / 63.0%
    weight_decay: float = 1e-4
    batch_size: int = 256
    m_per_class: int = 4
    collapse_cosine: float = 0.9
    # Two augmented views of every training image (the Barlow Twins augmentations, cached and shared with
    # `train barlow`) join the training set as extra samples of their class or pair. Off by default: on
    # Tiny ImageNet they lowered held-out hit@1 from 28% to 21% (the views are too strong as positives).
    views: bool = False


@dataclass(frozen=True)
class WhiteningConfig(HeadConfig):
    """Learned whitening (training/whitening.py): every combination of these is compared on held-out data.

    The grid covers what the held-out sweeps on Tiny ImageNet train (lite0 features) and on its 900-pair
    low-data folder preferred: little shrinkage and 128 dims with many classes, more shrinkage and 256 dims
    with few pairs; blending with the base mattered for the near-duplicate check.
    """

    shrink: tuple[float, ...] = (0.05, 0.1, 0.3, 0.6)
    dim: tuple[int, ...] = (64, 128, 256)
    blend: tuple[float, ...] = (1.0, 0.7, 0.5)  # 1: the projection alone
    tune_classes: float = 0.2  # share of the training classes left out of the fit to check each setting on
    unseen_tolerance: float = 0.01  # hit@1 a setting may lose against the base on those classes


@dataclass(frozen=True)
class MatchNetConfig(TrainingConfig):
    tower: str = "pretrained"
    encoder: str = DEFAULT_BASE  # tower "pretrained": whose embeddings it reads
    image_size: int = 64  # tower "scratch"
    bottleneck: int = 256
    hidden: int = 256
    dropout: float = 0.3
    lr: float = 1e-4  # the research's
    batch_size: int = 32
    pairs_per_epoch: int = 64_000
    # Share of training pairs that are (image, one of its 50 nearest neighbours under the encoder): what a
    # reranker meets at query time. 0 = the research's balanced random pairs.
    hard_fraction: float = 0.0
    # Train for reranking (tower "pretrained"; None: yes for it, no for "scratch"): pair sets of the training
    # images, each query against its top `depth` candidates by the encoder, softmax cross-entropy with its partner
    # as the target; the epoch and the vector score's weight are chosen by held-out reranked hit@k. batch_size
    # then counts queries.
    listwise: bool | None = None
    depth: int = 100
    # Tower "scratch": weight of an auxiliary cross-entropy over the training classes on each image's bottleneck
    # (0: pairs only, the research's). Measured on 6,000 train images, 400 steps: 63.0% held-out balanced
    # accuracy with it, 53.0% without.
    class_loss: float = 1.0
    epochs: int = 40
    patience: int = 5

    def __post_init__(self):
        if self.listwise is None:  # resolved here, so the run's checkpoint key is the same however it was asked for
            object.__setattr__(self, "listwise", self.tower == "pretrained" and not self.hard_fraction)


@dataclass(frozen=True)
class BeitPairConfig(TrainingConfig):
    encoder: str = DEFAULT_BASE  # default tokens: this encoder's trunk
    weights: Path | None = None  # a user's BEiT checkpoint folder: pixel patches instead of trunk tokens
    image_size: int = 160  # trunk input side: a 5x5 token grid per image (Tiny ImageNet is 64 px)
    token_dim: int = 128  # trunk features (1280) -> token width, by a trained 1x1 conv
    hidden: int = 128  # the small BEiT (ignored with --weights: the checkpoint's config rules)
    layers: int = 3
    heads: int = 4
    mlp: int = 256
    layer_scale: float = 0.1
    dropout: float = 0.1
    lr: float = 3e-4  # the research's 5e-5 fine-tuned a pretrained BEiT; this one starts from scratch
    weight_decay: float = 0.05
    batch_size: int = 64  # the research's
    pairs_per_epoch: int = 32_000
    epochs: int = 40
    patience: int = 4
