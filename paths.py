"""Every default location simsearch reads or writes, in one place.

Nothing here is relative to the current folder, and the environment is read when a function is
called, never at import, so a variable set later (by a shell, a test) counts.

    cache_dir()          $SIMSEARCH_CACHE_DIR, else $XDG_CACHE_HOME/simsearch, else ~/.cache/simsearch
    models_dir(given)    --models-dir, else $SIMSEARCH_MODELS_DIR, else <cache>/models: exported ONNX files
      trained_dir()      <models>/trained/<name>/      the registry of trained encoders
      rerankers_dir()    <models>/rerankers/<name>/    the registry of rerankers
    embedding_cache()    <cache>/embeddings            a db of encoder vectors shared by bench and training
    training_cache()     <cache>/training              checkpoints and augmented views (never in a registry)
    default_data_dir()   $SIMSEARCH_DATA: the dataset `train` uses when --data is not given (else an error)
    shared_data()        the shared/data folder beside a checkout: only the benchmarks, the tests and the demo read it
    benchmark_data_dir() $SIMSEARCH_DATA, else shared_data()/tiny-imagenet-200: the dataset `bench` measures on

Library code never defaults to shared_data(): installed from a wheel there is none, and a user's run must not
depend on the project's data.
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
    """The project's shared data beside a checkout (the `simsearch` package folder is the repository root); for the
    benchmarks, the tests and the demo only."""
    return Path(__file__).resolve().parent.parent / "shared" / "data"


def _from_environ(environ: Mapping[str, str]) -> Path | None:
    """The folder in $SIMSEARCH_DATA (an empty variable counts as unset)."""
    value = environ.get(DATA_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DatasetError(f"{DATA_ENV}={value}: no such folder")
    return path.resolve()


def default_data_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The dataset to train on when none is given: the folder in $SIMSEARCH_DATA; DatasetError if it is not set."""
    found = _from_environ(environ)
    if found is None:
        raise DatasetError(f"no dataset: pass --data with a folder of your images (or set {DATA_ENV} to one)")
    return found


def benchmark_data_dir(environ: Mapping[str, str] = os.environ, shared: Path | None = None) -> Path:
    """The dataset to benchmark on when none is given: the folder in $SIMSEARCH_DATA if set, else Tiny ImageNet in
    the shared data beside a checkout; DatasetError says where to get one when neither exists."""
    found = _from_environ(environ)
    if found is not None:
        return found
    shared = shared or shared_data() / "tiny-imagenet-200"
    if not shared.is_dir():
        raise DatasetError(f"no dataset: {DATA_ENV} is not set and {shared} does not exist; pass --data or set {DATA_ENV} "
                           f"to Tiny ImageNet (http://cs231n.stanford.edu/tiny-imagenet-200.zip, unzipped) or to any "
                           f"<class>/<image> or left/ right/ pair folder")
    return shared
