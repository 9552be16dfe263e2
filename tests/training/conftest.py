"""Training data big enough to show learning: real Tiny ImageNet classes, and held-out photos of the same classes."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ..conftest import TINY

N_CLASSES, N_TRAIN = 20, 40


@dataclass(frozen=True)
class Subset:
    train: Path  # <class>/<image>: N_TRAIN train-split photos of each class (a trainer's train split: 4/5 of them)
    test: list[Path]  # the same classes' val-split photos (50 each): never trained on, never used to pick an epoch
    test_labels: np.ndarray  # (len(test),) class index


@pytest.fixture(scope="session")
def subset(tmp_path_factory) -> Subset:
    if not (TINY / "val" / "val_annotations.txt").is_file():
        pytest.skip(f"shared data missing: {TINY}")
    wnids = (TINY / "wnids.txt").read_text().split()[:N_CLASSES]
    root = tmp_path_factory.mktemp("subset")
    for w in wnids:
        (root / w).mkdir()
        for i in range(N_TRAIN):
            shutil.copy2(TINY / "train" / w / "images" / f"{w}_{i}.JPEG", root / w)
    label = {w: c for c, w in enumerate(wnids)}
    rows = [line.split("\t")[:2] for line in (TINY / "val" / "val_annotations.txt").read_text().splitlines()]
    test = sorted((label[w], TINY / "val" / "images" / f) for f, w in rows if w in label)
    return Subset(root, [p for _, p in test], np.array([c for c, _ in test]))


@pytest.fixture(scope="session")
def held_out_features(subset, lite0, models_dir) -> np.ndarray:
    """(len(subset.test), 1280) efficientnet-lite0 embeddings of the held-out photos (the session's cache)."""
    from simsearch.devices import Device
    from simsearch.training.features import base_features

    return base_features(lite0, subset.test, models_dir, Device.cpu)


class Interrupted(Exception):
    """What Ctrl-C is to a real run: raised from the progress callback in the middle of an epoch."""


def _interrupt_in_epoch(n: int):
    """A progress callback that interrupts the run at the first step of epoch n (1-based)."""

    def on_progress(message: str, done: int, total: int) -> None:
        if message.startswith(f"epoch {n}/"):
            raise Interrupted(message)

    return on_progress


def _comparable(history: list[dict]) -> list[dict]:
    """A card's per-epoch rows without their wall-clock times."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def interrupted_and_resumed(train, straight_cfg, cfg, models_dir: Path):
    """Train straight_cfg without a break, and cfg (the same run under another name) interrupted in epoch 3
    and then run again: the second run resumes from the checkpoint of epoch 2 and trains exactly as the
    first (the same rows: losses, counts, held-out figures), and a finished run leaves no checkpoint.
    Returns both cards."""
    from simsearch.training.loop import checkpoint_path

    straight = train(straight_cfg, models_dir)
    with pytest.raises(Interrupted):
        train(cfg, models_dir, _interrupt_in_epoch(3))
    assert checkpoint_path(cfg).is_file()
    resumed = train(cfg, models_dir)
    assert _comparable(resumed.validation["history"]) == _comparable(straight.validation["history"])
    assert resumed.validation["best"] == {**straight.validation["best"], "seconds": resumed.validation["best"]["seconds"]}
    assert not checkpoint_path(cfg).exists()
    return straight, resumed
