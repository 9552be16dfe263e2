"""Does a trained encoder still know what its base knew? Three checks, each measured against the base.

    in_domain   the val split's pair sets over the classes it trained on (a pair folder: its val pairs)
    unseen      the val split's pair sets over the classes left out of its training (the deep metric
                learning protocol: train on a seeded subset of the classes, measure on the others)
    near_dup    each of a folder of generic photos against a seeded augmented copy of itself: crop 60-90%,
                mirror, +-30% colour. Only where the caller names the photos: `bench` uses the shared
                imagenet-samples; training uses TrainingConfig.check_photos, and without them the card
                notes the check as skipped

Fine-tuning on one domain tends to forget the others; these checks make that visible on every trained
encoder's card (`train`) and in `simsearch bench`. Pair sets are those of the bench
(`datasets.make_pair_sets`): each left image ranked against its set's rights, one per class.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from simsearch.atomic import staged_dir
from simsearch.errors import DatasetError
from simsearch.evaluation import datasets, metrics
from simsearch.indexer.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

Embed = Callable[[list[Path]], np.ndarray]  # images -> (N, dim) L2-normalised vectors
CHECKS = ("in_domain", "unseen", "near_dup")
# Photos in the near-duplicate check: a near-duplicate is found ~99.8% of the time, so 500 queries pin it to
# about +-0.4 points, well inside the 2 points the check is read at, at half the embedding cost of 1,000.
NEAR_DUP_PHOTOS = 500


@dataclass(frozen=True)
class Check:
    name: str  # one of CHECKS
    description: str
    paths: list[Path]
    sets: list[datasets.PairSet]  # indices into paths


def split_classes(classes: list[str], share: float, seed: int) -> list[str]:
    """The classes a training run leaves out: a seeded `share` of them (at least one, and never all but one),
    none when share is 0."""
    if share <= 0:
        return []
    if not share < 1 or len(classes) < 3:
        raise DatasetError(f"leaving {share:.0%} of {len(classes)} classes out of training leaves too few to train on "
                           f"(--unseen-classes 0 trains on every class)")
    n = min(len(classes) - 2, max(1, round(len(classes) * share)))
    return sorted(classes[i] for i in np.random.default_rng(seed).permutation(len(classes))[:n])


def augmented_copy(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A crop of 60-90% of each side, a coin-flip mirror, brightness/contrast/colour within +-30%."""
    w, h = im.size
    cw, ch = int(w * rng.uniform(0.6, 0.9)), int(h * rng.uniform(0.6, 0.9))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = im.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        im = ImageOps.mirror(im)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        im = enhance(im).enhance(rng.uniform(0.7, 1.3))
    return im


def write_near_dups(out: Path, photos: Path, seed: int = 0, limit: int | None = None) -> None:
    """A pair folder: right/ the photos (symlinks; a seeded sample of `limit` of them), left/ a seeded augmented
    copy of each (`augmented_copy`)."""
    rng = np.random.default_rng(seed)
    for side in ("left", "right"):
        (out / side).mkdir(parents=True, exist_ok=True)
    found = sorted(q for q in photos.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS)
    if limit is not None and len(found) > limit:
        found = [found[i] for i in sorted(rng.permutation(len(found))[:limit])]
    for p in found:
        os.symlink(os.path.abspath(p), out / "right" / p.name)
        with Image.open(p) as im:
            augmented_copy(im.convert("RGB"), rng).save(out / "left" / f"{p.stem}.jpg", quality=90)


def near_dup_folder(photos: Path, cache: Path, seed: int = 0, limit: int = NEAR_DUP_PHOTOS) -> Path:
    """The near-duplicate pair folder of `photos`, made once under `cache` (atomically: a killed run leaves none)."""
    folder = cache / f"near-dups-{photos.resolve().name}-{seed}-{limit}"
    if not folder.is_dir():
        with staged_dir(folder) as work:
            write_near_dups(work, photos, seed, limit)
    return folder


def _pair_check(name: str, description: str, left: list[Path], right: list[Path]) -> Check:
    n = len(left)
    return Check(name, description, left + right, [datasets.PairSet(np.arange(n), np.arange(n, 2 * n))])


def build_checks(data: Path, split: str, unseen_classes: list[str], photos: Path | None, cache: Path,
                 val_fraction: float | None = None, seed: int = 0) -> list[Check]:
    """The checks a model trained on `data` (leaving `unseen_classes` out) can be measured on.

    photos: the near-duplicate check's photos (None or missing: that check is left out, logged).
    """
    out = []
    if datasets.detect_layout(data) == "pairs":
        pairs = datasets.load_pair_folder(data, split, val_fraction, seed)
        out.append(_pair_check("in_domain", f"{len(pairs.left)} {split} pairs of {data.name}", pairs.left, pairs.right))
    else:
        ds = datasets.load_class_dataset(data, split, val_fraction, seed)
        left_out = np.isin(np.asarray(ds.classes)[ds.labels], unseen_classes)
        for name, mask in (("in_domain", ~left_out), ("unseen", left_out)):
            if mask.any():
                sets = datasets.make_pair_sets(ds.labels[mask], seed)
                out.append(Check(name, f"{split} pair sets of {len(np.unique(ds.labels[mask]))} "
                                       f"{'trained' if name == 'in_domain' else 'left-out'} classes",
                                 [p for p, m in zip(ds.paths, mask) if m], sets))
    if photos is not None and photos.is_dir():
        dups = datasets.load_pair_folder(near_dup_folder(photos, cache, seed), "val", 1.0)
        out.append(_pair_check("near_dup", f"{len(dups.left)} photos of {photos.name} vs an augmented copy",
                               dups.left, dups.right))
    else:
        log.warning("no near-duplicate check: %s", near_dup_skipped(photos))
    return out


def near_dup_skipped(photos: Path | None) -> str:
    """Why the near-duplicate check is left out (photos None or not a folder)."""
    return "no photos were given for it" if photos is None else f"no photos at {photos}"


def hits(check: Check, vectors: np.ndarray) -> dict:
    """hit@1 and hit@10 (fractions) of a check's pair sets, from vectors (len(check.paths), dim)."""
    ranks = np.concatenate([metrics.hit_ranks(vectors[s.left_idx], vectors[s.right_idx], np.arange(len(s.left_idx)))
                            for s in check.sets])
    return {"hit1": float(np.mean(ranks < 1)), "hit10": float(np.mean(ranks < 10)), "queries": int(len(ranks)),
            "gallery": int(len(check.sets[0].right_idx))}


def compare(checks: list[Check], embed: Embed, embed_base: Embed) -> dict:
    """{check: {"description", "model": hits, "base": hits}} for a model and its base on the same images."""
    return {c.name: {"description": c.description, "model": hits(c, embed(c.paths)), "base": hits(c, embed_base(c.paths))}
            for c in checks}


def against_base(data: Path, trained_split: str, unseen_classes: list[str], embed: Embed, embed_base: Embed,
                 near_dup_photos: Path | None = None) -> dict:
    """A model trained on `trained_split` of `data` (leaving `unseen_classes` out) against its base, on the other
    split: {"split", "unseen_classes", check: {"description", "model", "base"}}, and "skipped": {check: why} for
    a check left out. What a trained encoder's card records (training) and what `bench` re-measures through ONNX
    Runtime. near_dup_photos: the near-duplicate check's photos (there is no default: a user's own run reads
    nothing of the project's data)."""
    from simsearch.paths import checks_cache

    split = "val" if trained_split == "train" else "train"
    checks = build_checks(data, split, unseen_classes, near_dup_photos, checks_cache())
    result = {"split": split, "unseen_classes": unseen_classes, **compare(checks, embed, embed_base)}
    if "near_dup" not in result:
        result["skipped"] = {"near_dup": near_dup_skipped(near_dup_photos)}
    return result
