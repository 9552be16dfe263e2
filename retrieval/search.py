"""Query a db: image -> encoder (ONNX Runtime) -> FAISS top-k -> (path, score). No torch on this path."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simsearch.devices import Device
from simsearch.encoders.preprocess import resize_side, to_input
from simsearch.encoders.runtime import OnnxEncoder
from simsearch.encoders.spec import get_encoder
from simsearch.errors import SimsearchError
from simsearch.indexer.images import load_rgb
from simsearch.indexer.store import Store
from simsearch.retrieval.faiss_index import LoadedIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    rank: int  # 1-based
    path: str
    score: float  # cosine similarity


@dataclass
class QueryResult:
    query: str
    hits: list[Hit]
    seconds: dict[str, float] = field(default_factory=dict)  # per stage: load, embed, search


class Searcher:
    """Answers top-k queries against one encoder's index in a db."""

    def __init__(self, store: Store, encoder: OnnxEncoder, index: LoadedIndex):
        self.store = store
        self.encoder = encoder
        self.index = index

    @classmethod
    def open(cls, db: str | Path, encoder: str | None = None, device: Device = Device.auto,
             models_dir: Path | None = None) -> Searcher:
        store = Store(db, readonly=True)
        name = encoder or store.manifest.default_encoder
        spec = get_encoder(name, models_dir) if name else None
        entry = store.manifest.encoders.get(name) if name else None
        if spec is None or entry is None or not store.index_path(name).is_file():
            have = ", ".join(store.manifest.encoders) or "none"
            raise SimsearchError(f"the db at {store.root} has no index for encoder {name!r} (indexed: {have}); "
                                 f"run `simsearch index FOLDER --encoder {name}`")
        if entry.key != spec.key:
            raise SimsearchError(f"the db's {name} vectors were made with other weights ({entry.key}); re-run `simsearch index`")
        if entry.index_generation != store.generation:
            log.warning("the index of %s is older than the db (an interrupted `index`?); re-run `simsearch index` to refresh it", name)
        return cls(store, OnnxEncoder(spec, device, models_dir), LoadedIndex.load(store.index_path(name), device))

    def embed_images(self, paths: list[str | Path]) -> np.ndarray:
        """(len(paths), dim) query vectors; raises ImageLoadError naming a bad file."""
        spec = self.encoder.spec
        batch = np.stack([to_input(load_rgb(p, resize_side(spec)), spec) for p in paths])  # (Q, 3, S, S)
        return self.encoder.embed(batch)

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        if k < 1:
            raise SimsearchError(f"k must be at least 1 (got {k})")
        scores, ids = self.index.search(vectors, k)  # (Q, k'), (Q, k')
        out = []
        for row_scores, row_ids in zip(scores, ids):
            valid = row_ids >= 0
            paths = self.store.paths_of(row_ids[valid])
            hits = [(p, float(s)) for p, s in zip(paths, row_scores[valid]) if p is not None]
            out.append([Hit(r, p, s) for r, (p, s) in enumerate(hits, 1)])
        return out

    def query(self, paths: list[str | Path], k: int = 10) -> list[QueryResult]:
        if k < 1:
            raise SimsearchError(f"k must be at least 1 (got {k})")
        t0 = time.perf_counter()
        vectors = self.embed_images(paths)
        t1 = time.perf_counter()
        hits = self.search_vectors(vectors, k)
        t2 = time.perf_counter()
        per = {"load+embed": (t1 - t0) / len(paths), "search": (t2 - t1) / len(paths)}
        return [QueryResult(str(p), h, dict(per)) for p, h in zip(paths, hits)]
