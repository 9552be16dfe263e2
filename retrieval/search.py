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
from simsearch.retrieval.rerank import Reranker, pixels, rerank_order

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    rank: int  # 1-based
    path: str
    score: float  # cosine similarity
    rerank_score: float | None = None  # P(same) from the reranker, when the hits were reranked


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

    def query(self, paths: list[str | Path], k: int = 10, reranker: Reranker | None = None,
              depth: int = 100) -> list[QueryResult]:
        """Top k per query image; with a reranker, the top `depth` of the vector search reordered by it."""
        if k < 1:
            raise SimsearchError(f"k must be at least 1 (got {k})")
        if reranker is not None:
            self._check_reranker(reranker)
            if depth < k:
                raise SimsearchError(f"--rerank-depth ({depth}) must be at least k ({k})")
        t0 = time.perf_counter()
        vectors = self.embed_images(paths)
        t1 = time.perf_counter()
        hits = self.search_vectors(vectors, depth if reranker is not None else k)
        t2 = time.perf_counter()
        per = {"load+embed": (t1 - t0) / len(paths), "search": (t2 - t1) / len(paths)}
        results = [QueryResult(str(p), h, dict(per)) for p, h in zip(paths, hits)]
        for result, vector in zip(results, vectors):
            if reranker is not None:
                t = time.perf_counter()
                result.hits = self.rerank(reranker, result.query, vector, result.hits, k)
                result.seconds["rerank"] = time.perf_counter() - t
        return results

    def _check_reranker(self, reranker: Reranker) -> None:
        spec = reranker.spec
        if spec.input == "encoder" and spec.encoder != self.encoder.spec.name:
            raise SimsearchError(f"reranker {spec.name!r} reads {spec.encoder} embeddings; query with --encoder {spec.encoder}")

    def rerank(self, reranker: Reranker, query: str, vector: np.ndarray, hits: list[Hit], k: int) -> list[Hit]:
        """Reorder candidates by the reranker's P(same) (ties: vector score), keep k.

        An "encoder" reranker reads the candidates' embeddings stored in the db: no image is decoded again.
        """
        if not hits:
            return hits
        paths = [h.path for h in hits]
        if reranker.spec.input == "encoder":
            spec = self.encoder.spec
            q, cands = vector[None], self.store.vectors_of(spec.key, paths, spec.dim)  # (1, d), (D, d)
        else:
            q, cands = pixels([query], reranker.spec.image_size), pixels(paths, reranker.spec.image_size)
        bq, bc = reranker.bottleneck(q), reranker.bottleneck(cands)  # (1, 256), (D, 256)
        probs = reranker.score(np.repeat(bq, len(bc), axis=0), bc)  # (D,)
        order = rerank_order(probs, np.array([h.score for h in hits]))
        return [Hit(r, hits[i].path, hits[i].score, float(probs[i])) for r, i in enumerate(order[:k], 1)]
