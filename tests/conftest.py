"""Shared fixtures: real images from ../shared/data, a per-session model cache, small real dbs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SAMPLES = DATA / "imagenet-samples"
TINY = DATA / "tiny-imagenet-200"


@pytest.fixture(scope="session", autouse=True)
def models_dir(tmp_path_factory) -> Path:
    """One ONNX export per test session (reusing the user's cache would hide export bugs), and caches
    (embeddings, training checkpoints) in the session's own folder, never the user's."""
    path = tmp_path_factory.mktemp("models")
    cache = tmp_path_factory.mktemp("cache")
    old = {k: os.environ.get(k) for k in ("SIMSEARCH_MODELS_DIR", "SIMSEARCH_CACHE_DIR")}
    os.environ["SIMSEARCH_MODELS_DIR"] = str(path)
    os.environ["SIMSEARCH_CACHE_DIR"] = str(cache)
    yield path
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def sample_paths(n: int, start: int = 0) -> list[Path]:
    """The first n imagenet-samples photos (file name = <wnid>_<class name>.JPEG)."""
    files = sorted(SAMPLES.glob("*.JPEG"))
    if len(files) < start + n:
        pytest.skip(f"shared data missing: {SAMPLES}")
    return files[start : start + n]


def copy_samples(dest: Path, n: int, start: int = 0) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(p, dest / p.name)) for p in sample_paths(n, start)]


@pytest.fixture(scope="session")
def lite0():
    from simsearch.encoders.registry import get_encoder

    return get_encoder("efficientnet-lite0")


@pytest.fixture(scope="session")
def encoder(lite0, models_dir):
    from simsearch.encoders.runtime import OnnxEncoder

    return OnnxEncoder(lite0, models_dir=models_dir)


def class_folder(root: Path, n_classes: int, per_class: int) -> Path:
    """<class>/<image> in `root`: the first n_classes real Tiny ImageNet classes, per_class train photos each."""
    if not (TINY / "wnids.txt").is_file():
        pytest.skip(f"shared data missing: {TINY}")
    for w in (TINY / "wnids.txt").read_text().split()[:n_classes]:
        (root / w).mkdir()
        for i in range(per_class):
            shutil.copy2(TINY / "train" / w / "images" / f"{w}_{i}.JPEG", root / w)
    return root


@pytest.fixture(scope="session")
def classes(tmp_path_factory) -> Path:
    """8 classes, 12 photos each (for tiny training runs)."""
    return class_folder(tmp_path_factory.mktemp("classes"), 8, 12)
