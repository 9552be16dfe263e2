"""Query a db: image -> encoder (ONNX Runtime) -> the db's vector backend, top k -> (path, score). No torch on this path."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from simsearch.devices import Device
from simsearch.encoders.preprocess import decode_side, to_input
from simsearch.encoders.registry import get_encoder
from simsearch.encoders.runtime import OnnxEncoder
from simsearch.encoders.spec import INT8_SUFFIX
from simsearch.errors import ImageLoadError, NotFoundError, SimsearchError
from simsearch.indexer.images import load_rgb
from simsearch.indexer.lock import writer_active
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import VectorIndex, open_index, require_vectors
from simsearch.retrieval.rerank import Reranker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    rank: int  # 1-based
    path: str  # may hold surrogate escapes: os.fsencode(path) gives the file's exact bytes
    score: float  # cosine similarity
    rerank_score: float | None = None  # P(same) from the reranker, when the hits were reranked
    id: int = -1  # the item's id in the db


@dataclass
class QueryResult:
    query: str
    hits: list[Hit]
    seconds: dict[str, float] = field(default_factory=dict)  # per stage: load+embed, search, rerank
    error: str | None = None  # this query image could not be read (the others still answer)


# Query images decoded and embedded together: memory stays bounded however many are asked.
QUERY_BATCH = 32


class Searcher:
    """Answers top-k queries against one encoder's index in a db.

    The index and the id -> path mapping are one consistent snapshot: ids are resolved in one LMDB
    read transaction, and the store keeps the path of every id a published index can return. An id
    that cannot be resolved means a writer has published a newer index since: it is loaded and the
    search repeated. It holds its store open until `close()` (or the end of a `with Searcher.open(...)` block).
    """

    def __init__(self, store: Store, encoder: OnnxEncoder, index: VectorIndex, name: str | None = None,
                 device: Device = Device.auto):
        self.store = store
        self.encoder = encoder
        self.index = index
        self.name = name or encoder.spec.name
        self.device = device

    @classmethod
    def open(cls, db: str | Path | Store, encoder: str | OnnxEncoder | None = None, device: Device = Device.auto,
             models_dir: Path | None = None, backend: str | None = None, uri: str | None = None) -> Searcher:
        """A searcher over the db's published index of `encoder` (a name, the db's default, or a session
        already made — a server or a loop of queries reuses it).

        db: a db folder, or a Store already open read-only (a server shares one between its searchers: LMDB
        must not be opened twice in one process, as closing either copy drops the process's locks on it);
        a Store passed in is left open if this fails.
        The index is the one the manifest names, with the backend it records (`uri` overrides where a backend
        outside the db is, e.g. a Milvus server). `backend`, when given, must be the one the db uses.
        """
        store = db if isinstance(db, Store) else Store(db, readonly=True)
        try:
            name = encoder.spec.name if isinstance(encoder, OnnxEncoder) else store.manifest.encoder_name(encoder,
                                                                                                         store.root)
            spec = encoder.spec if isinstance(encoder, OnnxEncoder) else get_encoder(name, models_dir)
            index, entry = open_index(store, name, device, backend, uri)
            if not isinstance(encoder, OnnxEncoder):  # queries are embedded as the db's vectors were
                spec = spec.with_preprocess(entry.preprocess)
            if entry.key != spec.key:
                raise SimsearchError(f"the db's {name} vectors were made by {entry.key}, not by this encoder "
                                     f"({spec.key}): re-run `simsearch index FOLDER --encoder {name}`")
            if not entry.up_to_date(store.generation) and not writer_active(store.root):
                log.warning("the index of %s is older than the db (an interrupted `index`?): re-run `simsearch index` "
                            "or `simsearch check --repair` to refresh it", name)
            session = encoder if isinstance(encoder, OnnxEncoder) else OnnxEncoder(spec, device, models_dir)
            return cls(store, session, index, name, device)
        except BaseException:
            if store is not db:
                store.close()
            raise

    def close(self) -> None:
        self.index.close()  # e.g. Milvus Lite serves one process per file: let the next `index` open it
        self.store.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def search_vectors(self, vectors: np.ndarray, k: int, attempts: int = 3) -> list[list[Hit]]:
        if k < 1:
            raise SimsearchError(f"k must be at least 1 (got {k})")
        for attempt in range(attempts):
            scores, ids = self.index.search(vectors, k)  # (Q, k'), (Q, k')
            valid = ids >= 0
            paths = self.store.paths_of(ids[valid])  # one read transaction: one state of the db
            if None not in paths or attempt + 1 == attempts:
                break
            log.debug("a newer index was published during the search: reloading it")
            self.index = self.index.reload()
        found = iter(paths)
        out = []
        for row_scores, row_ids in zip(scores, ids):
            row = [(int(i), float(s), next(found)) for i, s in zip(row_ids, row_scores) if i >= 0]
            out.append([Hit(r, p, s, id=i) for r, (i, s, p) in enumerate((h for h in row if h[2] is not None), 1)])
        return out

    def similar(self, item_id: int, k: int = 10) -> list[Hit]:
        """The k items most similar to the db's item `item_id`, itself first: its stored vector (as it was indexed,
        no image decoded) searched against the index. NotFoundError when the db holds no such item."""
        (path,) = self.store.paths_of([item_id])
        record = self.store.get_item(path) if path is not None else None
        if record is None or record.id != item_id:  # a removed item's path may hold a new item since
            raise NotFoundError(f"no item with id {item_id} in the db")
        spec = self.encoder.spec
        vector = self.store.vectors_of_ids(spec.key, [item_id], spec.dim)  # (1, dim)
        hits = self.search_vectors(vector, k)[0]
        own = next((h for h in hits if h.id == item_id), None)
        if own is not None and hits[0] is not own:  # an exact duplicate tied with it: the item itself comes first
            hits = [replace(h, rank=r) for r, h in enumerate([own] + [h for h in hits if h is not own], 1)]
        return hits

    def query(self, paths: list[str | Path], k: int = 10, reranker: Reranker | None = None,
              depth: int = 100) -> list[QueryResult]:
        """Top k per query image; with a reranker, the top `depth` of the vector search reordered by it.

        Images are embedded QUERY_BATCH at a time; one that cannot be read gets an `error` and no hits.
        """
        if k < 1:
            raise SimsearchError(f"k must be at least 1 (got {k})")
        require_vectors(self.index, self.name, self.store)
        if reranker is not None:
            self._check_reranker(reranker)
            if depth < k:
                raise SimsearchError(f"--rerank-depth ({depth}) must be at least k ({k})")
        results = []
        for start in range(0, len(paths), QUERY_BATCH):
            results += self._query_batch(paths[start:start + QUERY_BATCH], k, reranker, depth)
        return results

    def _query_batch(self, paths: list[str | Path], k: int, reranker: Reranker | None, depth: int) -> list[QueryResult]:
        spec = self.encoder.spec
        t0 = time.perf_counter()
        results, arrays = [], []
        for p in paths:
            results.append(QueryResult(str(p), []))
            try:
                arrays.append(to_input(load_rgb(p, decode_side(spec)), spec))  # (3, S, S)
            except ImageLoadError as e:
                results[-1].error = str(e)
        ok = [r for r in results if r.error is None]
        if not ok:
            return results
        vectors = self.encoder.embed(np.stack(arrays))  # (Q, 3, S, S) -> (Q, dim)
        t1 = time.perf_counter()
        hits = self.search_vectors(vectors, depth if reranker is not None else k)
        t2 = time.perf_counter()
        for result, vector, h in zip(ok, vectors, hits):
            result.hits = h
            result.seconds = {"load+embed": (t1 - t0) / len(ok), "search": (t2 - t1) / len(ok)}
            if reranker is not None:
                t = time.perf_counter()
                result.hits = self.rerank(reranker, result.query, vector, result.hits, k)
                result.seconds["rerank"] = time.perf_counter() - t
        return results

    def _check_reranker(self, reranker: Reranker) -> None:
        spec = reranker.spec
        # An encoder's int8 variant approximates its embeddings (cosine ~0.99): a reranker of either reads both.
        if spec.input == "encoder" and spec.encoder.removesuffix(INT8_SUFFIX) != self.encoder.spec.fp32().name:
            raise SimsearchError(f"reranker {spec.name!r} reads {spec.encoder} embeddings; query with --encoder {spec.encoder}")

    def rerank(self, reranker: Reranker, query: str, vector: np.ndarray, hits: list[Hit], k: int) -> list[Hit]:
        """Reorder candidates by the reranker's P(same) (ties: vector score), keep k.

        An "encoder" reranker reads the query's `vector` (dim,) and the candidates' embeddings stored in the
        db: no image is decoded again.
        """
        if not hits:
            return hits
        spec = self.encoder.spec
        q = reranker.represent_images([query], lambda: vector[None])  # (1, ...)
        cands = reranker.represent_images([h.path for h in hits],  # (D, ...)
                                          lambda: self.store.vectors_of_ids(spec.key, [h.id for h in hits], spec.dim))
        order, probs = reranker.rerank(q[0], cands, np.array([h.score for h in hits]))
        return [Hit(r, hits[i].path, hits[i].score, float(probs[i]), hits[i].id) for r, i in enumerate(order[:k], 1)]
