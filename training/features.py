"""Training data as base-encoder features, through the indexer's content-hash cache.

Training a head on frozen base features is what makes training feasible on a laptop CPU: the base
encoder runs once per image (and never again: the features are cached in the same LMDB cache as
`simsearch bench`), and an epoch over 20,000 images then takes about a second.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simsearch.devices import Device
from simsearch.encoders.runtime import OnnxEncoder
from simsearch.encoders.spec import EncoderSpec
from simsearch.errors import DatasetError
from simsearch.evaluation import datasets, generalisation
from simsearch.indexer.cached import CachedEmbedder
from simsearch.indexer.store import Store
from simsearch.paths import embedding_cache

log = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    """Features with group labels: a class, or a matched pair (both images of pair i get label i)."""

    x: np.ndarray  # (N, d) float32, L2-normalised base embeddings
    y: np.ndarray  # (N,) int
    kind: str  # "classes" | "pairs"
    paths: list[Path] = field(default_factory=list)  # the image of each row

    def subset(self, mask: np.ndarray) -> FeatureSet:
        return FeatureSet(self.x[mask], self.y[mask], self.kind, [p for p, m in zip(self.paths, mask) if m])


def base_features(spec: EncoderSpec, paths: list[Path], models_dir: Path | None, device: Device,
                  on_progress=None) -> np.ndarray:
    """(len(paths), spec.dim) embeddings of the base encoder, embedding only what the cache lacks."""
    with Store(embedding_cache(), create=True) as store:
        return CachedEmbedder(OnnxEncoder(spec, device, models_dir), store)(paths, on_progress)


def load_training_set(spec: EncoderSpec, data: Path, split: str, models_dir: Path | None, device: Device,
                      on_progress=None, unseen_share: float = 0.0, seed: int = 0) -> tuple[FeatureSet, list[str]]:
    """The training images' base features, and the classes left out of them (a seeded unseen_share of a class
    dataset's classes; none for a pair folder, whose val pairs are unseen anyway)."""
    if datasets.detect_layout(data) == "pairs":
        pairs = datasets.load_pair_folder(data, split)
        x = base_features(spec, pairs.left + pairs.right, models_dir, device, on_progress)
        n = len(pairs.left)
        return FeatureSet(x, np.r_[np.arange(n), np.arange(n)], "pairs", pairs.left + pairs.right), []
    ds = datasets.load_class_dataset(data, split)
    unseen = generalisation.split_classes(ds.classes, unseen_share, seed)
    keep = ~np.isin(np.asarray(ds.classes)[ds.labels], unseen)
    paths = [p for p, k in zip(ds.paths, keep) if k]
    return FeatureSet(base_features(spec, paths, models_dir, device, on_progress), ds.labels[keep], "classes",
                      paths), unseen


def holdout_mask(fs: FeatureSet, per_group: int, seed: int) -> np.ndarray:
    """(N,) bool, True for the validation part: per_group images of every class (at most a fifth of the
    smallest class), or a seeded 10% of the pairs."""
    rng = np.random.default_rng(seed)
    if fs.kind == "pairs":
        groups = np.unique(fs.y)
        mask = np.isin(fs.y, rng.permutation(groups)[: max(2, len(groups) // 10)])
    else:
        # Never more than a fifth of the smallest class, so small user datasets keep images to train on.
        smallest = int(np.unique(fs.y, return_counts=True)[1].min())
        mask = np.zeros(len(fs.y), bool)
        mask[datasets.class_balanced_subset(fs.y, min(per_group, max(1, smallest // 5)), seed)] = True
    if mask.all() or not mask.any():
        raise DatasetError("too little training data to hold out a validation part")
    return mask


def holdout(fs: FeatureSet, per_group: int, seed: int) -> tuple[FeatureSet, FeatureSet]:
    mask = holdout_mask(fs, per_group, seed)
    return fs.subset(~mask), fs.subset(mask)


def validation_ranks(embed, fs: FeatureSet, seed: int) -> np.ndarray:
    """0-based partner ranks on pair sets of a held-out FeatureSet (as `simsearch bench` ranks val)."""
    from simsearch.evaluation import metrics

    e = embed(fs.x)  # (N, out)
    if fs.kind == "pairs":
        order = np.argsort(fs.y, kind="stable")  # each label appears twice: left then right
        left, right = order[0::2], order[1::2]
        return metrics.hit_ranks(e[left], e[right], np.arange(len(left)))
    sets = datasets.make_pair_sets(fs.y, seed)
    return np.concatenate([metrics.hit_ranks(e[s.left_idx], e[s.right_idx], np.arange(len(s.left_idx))) for s in sets])


@dataclass
class TrainingData:
    """What every head trainer starts with."""

    base: EncoderSpec
    train: FeatureSet  # base features of what it trains on
    val: FeatureSet  # and of the held-out part it is validated on
    unseen_classes: list[str]  # classes of the dataset left out of both (HeadConfig.unseen_classes)


def train_and_holdout(cfg, models_dir: Path | None, on_progress=None) -> TrainingData:
    """The base encoder, and the base features of the training data split into the part a head trains on and
    the held-out part it is validated on (cfg: any head trainer's config)."""
    from simsearch.encoders.registry import get_encoder

    base = get_encoder(cfg.base, models_dir).with_preprocess(cfg.preprocess)
    data, unseen = load_training_set(base, cfg.data, cfg.split, models_dir, cfg.device,
                                     on_progress and (lambda d, t: on_progress("embedding training images", d, t)),
                                     cfg.unseen_classes, cfg.seed)
    train, val = holdout(data, cfg.holdout_per_class, cfg.seed)
    log.info("%d training images, %d held out (%s), %d classes left out, base %s (%d-d)", len(train.y), len(val.y),
             data.kind, len(unseen), base.name, base.dim)
    return TrainingData(base, train, val, unseen)
