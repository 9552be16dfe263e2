"""Shared fixtures: real images from ../shared/data, a per-session model cache, small real dbs."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


@dataclass
class QueryTally:
    queries: int = 0
    failures: int = 0  # a query (or the open before it) raised
    empty: int = 0  # answered nothing
    wrong: int = 0  # answered, but not with the photo itself first


def query_while(writer: subprocess.Popen, db: Path, encoder, photos: list[Path], rounds: int,
                timeout_s: float) -> QueryTally:
    """Until `writer` exits (or timeout_s passes): open the db afresh, as every `simsearch query` does, and search
    each photo's own vector `rounds` times; what the queries met."""
    from simsearch.encoders.preprocess import decode_side, to_input
    from simsearch.indexer.images import load_rgb
    from simsearch.retrieval.search import Searcher

    spec = encoder.spec
    vectors = encoder.embed(np.stack([to_input(load_rgb(p, decode_side(spec)), spec) for p in photos]))
    tally = QueryTally()
    deadline = time.monotonic() + timeout_s
    while writer.poll() is None and time.monotonic() < deadline:
        try:
            with Searcher.open(db, encoder) as searcher:
                for _ in range(rounds):
                    for photo, hits in zip(photos, searcher.search_vectors(vectors, 3)):
                        tally.queries += 1
                        tally.empty += not hits
                        tally.wrong += bool(hits) and hits[0].path != str(photo)
        except Exception as e:  # noqa: BLE001 - any failure of a query is what the callers count
            tally.failures += 1
            logging.getLogger("test").error("query failed: %r", e)
    return tally
