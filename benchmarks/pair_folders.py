"""Build the benchmark's extra domains from the shared data:

    python -m simsearch.benchmarks pair-folders low-data OUT    # 1,225 same-class pairs from Tiny ImageNet train
    python -m simsearch.benchmarks pair-folders ood OUT         # imagenet-samples photos <-> augmented copies
    python -m simsearch.benchmarks pair-folders aspect OUT      # Tiny ImageNet with 2:3 and 3:2 val images

low-data: the research's regime — a triplet fine-tune on 900 matched pairs (the pair folder's default
train split; the other 325 are its val). Train on it with `simsearch train triplet --data OUT`, then
measure on the class benchmark's val pair sets as usual.

ood: does a fine-tuned encoder still know unrelated photos? Each of the 1,000 full-size ImageNet
photos is paired with a seeded random crop + flip + colour change of itself; `simsearch bench
--data OUT --val-fraction 1` ranks every copy against all 1,000 originals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from simsearch.benchmarks.common import option
from simsearch.errors import UnknownNameError
from simsearch.evaluation import datasets, generalisation
from simsearch.paths import shared_data


def low_data(out: Path, root: Path | None = None, n_pairs: int = 1225, seed: int = 0) -> None:
    """n_pairs same-class pairs of distinct train images, classes taken in turn; symlinks, no copies."""
    ds = datasets.load_class_dataset(root or shared_data() / "tiny-imagenet-200", "train")
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(ds.labels == c))) for c in range(len(ds.classes))]
    for side in ("left", "right"):
        (out / side).mkdir(parents=True, exist_ok=True)
    for k in range(n_pairs):
        pool = pools[k % len(pools)]
        a, b = pool.pop(), pool.pop()
        os.symlink(os.path.abspath(ds.paths[a]), out / "left" / f"{k:05d}{ds.paths[a].suffix}")
        os.symlink(os.path.abspath(ds.paths[b]), out / "right" / f"{k:05d}{ds.paths[b].suffix}")


def ood(out: Path, root: Path | None = None, seed: int = 0) -> None:
    generalisation.write_near_dups(out, root or shared_data() / "imagenet-samples", seed)


def aspect_window(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The largest 2:3 (portrait) or 3:2 (landscape) window of the image, at a random place; a coin flip picks which."""
    w, h = im.size
    ratio = 2 / 3 if rng.random() < 0.5 else 3 / 2  # width / height
    ch = min(h, round(w / ratio))
    cw = min(w, round(ch * ratio))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return im.crop((x, y, x + cw, y + ch))


def aspect(out: Path, root: Path | None = None, seed: int = 0) -> None:
    """Tiny ImageNet whose val images are cut to non-square windows, so that the preprocessing policy matters.

    Same layout (wnids.txt, val_annotations.txt, train linked unchanged), so `simsearch bench --data OUT
    --task pairs` draws the same pair sets from the same val images as on the original.
    """
    root = root or shared_data() / "tiny-imagenet-200"
    rng = np.random.default_rng(seed)
    (out / "val" / "images").mkdir(parents=True, exist_ok=True)
    for name in ("wnids.txt", "words.txt"):
        if (root / name).is_file():
            (out / name).write_bytes((root / name).read_bytes())
    if not (out / "train").exists():
        os.symlink(os.path.abspath(root / "train"), out / "train")
    (out / "val" / "val_annotations.txt").write_bytes((root / "val" / "val_annotations.txt").read_bytes())
    for p in sorted((root / "val" / "images").iterdir()):
        with Image.open(p) as im:
            aspect_window(im.convert("RGB"), rng).save(out / "val" / "images" / p.name, quality=95)


KINDS = {"low-data": low_data, "ood": ood, "aspect": aspect}


@dataclass(frozen=True)
class PairFoldersConfig:
    kind: str = option(help=f"which folder to build: {', '.join(KINDS)}.")
    out: Path = option(help="the folder to write.")
    seed: int = option(0, "seed of every random choice.")

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UnknownNameError(f"unknown kind {self.kind!r} (choose from {', '.join(KINDS)})")


def run(cfg: PairFoldersConfig) -> None:
    KINDS[cfg.kind](cfg.out, seed=cfg.seed)
