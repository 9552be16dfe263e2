"""Every default location simsearch reads or writes, in one place.

Nothing here is relative to the current folder, and the environment is read when a function is
called, never at import, so a variable set later (by a shell, a test) counts.

    cache_dir()          $SIMSEARCH_CACHE_DIR, else $XDG_CACHE_HOME/simsearch, else ~/.cache/simsearch
    models_dir(given)    --models-dir, else $SIMSEARCH_MODELS_DIR, else <cache>/models: exported ONNX files
      trained_dir()      <models>/trained/<name>/      the registry of trained encoders
      rerankers_dir()    <models>/rerankers/<name>/    the registry of rerankers
    embedding_cache()    <cache>/embeddings            a db of encoder vectors shared by bench and training
    training_cache()     <cache>/training              checkpoints and augmented views (never in a registry)
    shared_data()        the shared/data folder beside the checkout (tests, benchmarks, the demo)
    calibration_dir()    $SIMSEARCH_CALIBRATION_DIR, else shared_data()/imagenet-samples: the photos the built-in
                         encoders' int8 variants are calibrated on
    default_data_dir()   $SIMSEARCH_DATA, else shared_data()/tiny-imagenet-200
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from simsearch.errors import DatasetError

DATA_ENV = "SIMSEARCH_DATA"


def cache_dir() -> Path:
    env = os.environ.get("SIMSEARCH_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "simsearch"


def models_dir(given: str | os.PathLike | None = None) -> Path:
    if given:
        return Path(given)
    env = os.environ.get("SIMSEARCH_MODELS_DIR")
    return Path(env).expanduser() if env else cache_dir() / "models"


def trained_dir(models: str | os.PathLike | None = None) -> Path:
    return models_dir(models) / "trained"


def rerankers_dir(models: str | os.PathLike | None = None) -> Path:
    return models_dir(models) / "rerankers"


def embedding_cache() -> Path:
    return cache_dir() / "embeddings"


def training_cache() -> Path:
    return cache_dir() / "training"


def checks_cache() -> Path:
    """Made once: the near-duplicate check's augmented copies (evaluation/generalisation.py)."""
    return cache_dir() / "checks"


def shared_data() -> Path:
    """The project's shared data, beside the checkout (the `simsearch` package folder is the repository root)."""
    return Path(__file__).resolve().parent.parent / "shared" / "data"


def calibration_dir() -> Path:
    env = os.environ.get("SIMSEARCH_CALIBRATION_DIR")
    return Path(env).expanduser() if env else shared_data() / "imagenet-samples"


def default_data_dir(environ: Mapping[str, str] = os.environ, shared: Path | None = None) -> Path:
    """The dataset to use when none is given: the folder in $SIMSEARCH_DATA if set (and not empty), else
    tiny-imagenet-200 in the shared data; DatasetError names both when neither exists."""
    shared = shared or shared_data() / "tiny-imagenet-200"
    value = environ.get(DATA_ENV)
    if value:
        path = Path(value).expanduser()
        if not path.is_dir():
            raise DatasetError(f"{DATA_ENV}={value}: no such folder")
        return path.resolve()
    if not shared.is_dir():
        raise DatasetError(f"no dataset: {DATA_ENV} is not set and the default {shared} does not exist; "
                           f"pass --data or set {DATA_ENV} to a dataset folder")
    return shared
