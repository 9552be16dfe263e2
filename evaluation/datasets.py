"""Datasets shared by benchmarks and training: class datasets (Tiny ImageNet layout or <class>/<image>) and pair folders (left/ <-> right/).

Everything random is drawn from `np.random.default_rng(seed)`, so a (dataset, split, seed) triple
always gives the same splits, pair sets and sampled pairs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simsearch.errors import DatasetError
from simsearch.indexer.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
# Share of val when none is given: pair folders follow the research's 325 val / 900 train pairs; class
# folders keep a fifth of every class. Tiny ImageNet has its own val split and takes none.
DEFAULT_VAL_FRACTION = {"pairs": 325 / 1225, "classes": 0.2}


@dataclass
class LabeledImages:
    paths: list[Path]
    labels: np.ndarray  # (N,) int index into classes
    classes: list[str]


@dataclass
class Pairs:
    left: list[Path]
    right: list[Path]  # right[i] is the partner of left[i]
    names: list[str]
    split: str
    seed: int
    val_names: list[str]
    train_names: list[str]

    def split_manifest(self) -> dict:
        return {"seed": self.seed, "val": self.val_names, "train": self.train_names}


@dataclass(frozen=True)
class PairSet:
    left_idx: np.ndarray  # (C,) one image per class
    right_idx: np.ndarray  # (C,) its partner: same class, another image


def val_fraction_of(layout: str, val_fraction: float | None) -> float:
    """The share of val a split of this layout uses: val_fraction, or the layout's default when None."""
    fraction = DEFAULT_VAL_FRACTION[layout] if val_fraction is None else val_fraction
    if not 0.0 <= fraction <= 1.0:
        raise DatasetError(f"val fraction must be between 0 and 1 (got {fraction})")
    return fraction


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def detect_layout(root: Path) -> str:
    """ "tiny-imagenet" | "pairs" | "classes"; DatasetError when it is none of them."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    if (root / "wnids.txt").is_file() and (root / "train").is_dir():
        return "tiny-imagenet"
    if (root / "left").is_dir() and (root / "right").is_dir():
        return "pairs"
    if any(p.is_dir() and _images(p) for p in root.iterdir()):
        return "classes"
    raise DatasetError(f"{root}: not a dataset (expected left/ + right/, <class>/<image>, or the Tiny ImageNet layout)")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} (splits: {', '.join(SPLITS)})")


def load_class_dataset(root: Path, split: str, val_fraction: float | None = None, seed: int = 0) -> LabeledImages:
    """A split of a class dataset. val_fraction and seed split <class>/<image> folders (None: a fifth of
    every class in val); the Tiny ImageNet layout has its own split and ignores both."""
    root = Path(root)
    _check_split(split)
    layout = detect_layout(root)
    if layout == "tiny-imagenet":
        out = _tiny_imagenet(root, split)
    elif layout == "classes":
        val_fraction = val_fraction_of(layout, val_fraction)
        out = _class_folders(root, split, val_fraction, seed)
    else:
        raise DatasetError(f"{root}: a pair folder has no classes")
    if not out.paths:
        with_fraction = f" with val fraction {val_fraction}" if layout == "classes" else ""
        raise DatasetError(f"{root}: no images in split {split!r}{with_fraction}")
    return out


def _tiny_imagenet(root: Path, split: str) -> LabeledImages:
    classes = (root / "wnids.txt").read_text().split()
    index = {w: i for i, w in enumerate(classes)}
    paths, labels = [], []
    if split == "train":
        for w in classes:
            for p in _images(root / "train" / w / "images") if (root / "train" / w / "images").is_dir() else []:
                paths.append(p)
                labels.append(index[w])
    else:
        ann = root / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise DatasetError(f"{ann}: missing (Tiny ImageNet val labels)")
        for n, line in enumerate(ann.read_text().splitlines(), 1):
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in index:
                raise DatasetError(f"{ann}:{n}: expected 'file<TAB>wnid' with a wnid from wnids.txt")
            paths.append(root / "val" / "images" / parts[0])
            labels.append(index[parts[1]])
    return LabeledImages(paths, np.asarray(labels, dtype=np.int64), classes)


def _class_folders(root: Path, split: str, val_fraction: float, seed: int) -> LabeledImages:
    """<class>/<image>: per class, a seeded share val_fraction of the images is val, the rest train."""
    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _images(p))
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = _images(root / name)
        perm = rng.permutation(len(files))
        n_val = int(round(len(files) * val_fraction))
        chosen = perm[:n_val] if split == "val" else perm[n_val:]
        for i in sorted(chosen):
            paths.append(files[i])
            labels.append(c)
    return LabeledImages(paths, np.asarray(labels, dtype=np.int64), classes)


def load_pair_folder(root: Path, split: str, val_fraction: float | None = None, seed: int = 0) -> Pairs:
    """left/NAME.* <-> right/NAME.*, matched by stem; a seeded share val_fraction of the names is val
    (None: 325/1225)."""
    root = Path(root)
    _check_split(split)
    val_fraction = val_fraction_of("pairs", val_fraction)
    left = {p.stem: p for p in _images(root / "left")}
    right = {p.stem: p for p in _images(root / "right")}
    names = sorted(left.keys() & right.keys())
    unmatched = len(left) + len(right) - 2 * len(names)
    if unmatched:
        log.warning("%s: %d images without a partner on the other side, ignored", root, unmatched)
    if len(names) < 2:
        raise DatasetError(f"{root}: fewer than 2 matched pairs in left/ and right/")
    perm = np.random.default_rng(seed).permutation(len(names))
    n_val = int(round(len(names) * val_fraction))
    val = sorted(names[i] for i in perm[:n_val])
    train = sorted(names[i] for i in perm[n_val:])
    chosen = val if split == "val" else train
    if not chosen:
        raise DatasetError(f"{root}: split {split!r} is empty with val fraction {val_fraction}")
    return Pairs([left[n] for n in chosen], [right[n] for n in chosen], chosen, split, seed, val, train)


def make_pair_sets(labels: np.ndarray, seed: int = 0) -> list[PairSet]:
    """TLL-like pair sets from a class dataset.

    Each class's images are shuffled (classes in label order, one generator); pair set s takes, for
    every class, its images 2s (left) and 2s+1 (right). The number of sets is set by the smallest
    class (count // 2); Tiny ImageNet val (50 per class) gives 25 disjoint sets of 200 pairs.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    shuffled = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    n_sets = min(len(s) for s in shuffled) // 2 if shuffled else 0
    return [PairSet(np.array([s[2 * k] for s in shuffled]), np.array([s[2 * k + 1] for s in shuffled]))
            for k in range(n_sets)]


def balanced_pairs(labels: np.ndarray, n_pairs: int = 50_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n_pairs index pairs (i, j, same): half same-class (i != j), half different-class, seeded, with replacement."""
    rng = np.random.default_rng(seed)
    n_same = n_pairs // 2
    n_diff = n_pairs - n_same
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    eligible = [m for m in by_class if len(m) >= 2]
    if not eligible or len(by_class) < 2:
        raise DatasetError("balanced pairs need 2+ classes and a class with 2+ images")
    # same: a class with probability proportional to its number of pairs, then two distinct members
    weights = np.array([len(m) * (len(m) - 1) for m in eligible], dtype=np.float64)
    cls = rng.choice(len(eligible), n_same, p=weights / weights.sum())
    si, sj = np.empty(n_same, np.int64), np.empty(n_same, np.int64)
    for c in np.unique(cls):
        rows = np.flatnonzero(cls == c)
        members = eligible[c]
        a = rng.integers(0, len(members), len(rows))
        b = (a + rng.integers(1, len(members), len(rows))) % len(members)  # never a
        si[rows], sj[rows] = members[a], members[b]
    # different: rejection sampling of uniform pairs (cheap: most pairs are different-class)
    di, dj = np.empty(0, np.int64), np.empty(0, np.int64)
    while len(di) < n_diff:
        i = rng.integers(0, len(labels), 2 * n_diff)
        j = rng.integers(0, len(labels), 2 * n_diff)
        keep = labels[i] != labels[j]
        di, dj = np.r_[di, i[keep]], np.r_[dj, j[keep]]
    i = np.r_[si, di[:n_diff]]
    j = np.r_[sj, dj[:n_diff]]
    same = np.r_[np.ones(n_same, bool), np.zeros(n_diff, bool)]
    return i, j, same


def class_balanced_subset(labels: np.ndarray, per_class: int = 25, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded sample of per_class images of every class (all of a smaller class)."""
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))
