"""Query a db: image -> encoder (ONNX Runtime) -> the db's vector backend, top k -> (path, score). No torch on this path.

A combined query (query.py: weighted images, words, db items) is one vector, normalize(sum_i w_i e_i), searched the
same way; its filters (`min_score`, `under`) are applied here.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from simsearch.devices import Device
from simsearch.encoders.preprocess import decode_side, to_input
from simsearch.encoders.registry import get_encoder
from simsearch.encoders.runtime import OnnxEncoder
from simsearch.encoders.spec import INT8_SUFFIX
from simsearch.errors import ImageLoadError, SimsearchError
from simsearch.indexer.images import load_rgb
from simsearch.indexer.lock import writer_active
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import VectorIndex, open_index, require_vectors
from simsearch.retrieval.dupes import FLOAT_SLACK
from simsearch.retrieval.query import PathFilter, Query, Term, describe
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
# `under` matching at most this many items is searched exactly over their stored vectors: 4096 x 1280 float32 is
# 21 MB read from LMDB and one small matrix product, about one search of a large approximate index; a bigger
# subset makes the approximate search go deeper instead (its cost does not grow with the subset). Finding the
# subset reads at most SCAN_FACTOR times as many item records (a sparse glob over a big folder is searched deeper).
EXACT_SUBSET = 4096
SCAN_FACTOR = 16
DEEPEN = 4  # each deeper search asks this many times more candidates, from max(4 k, FIRST_DEPTH)
FIRST_DEPTH = 64


class Searcher:
    """Answers top-k queries against one encoder's index in a db.

    The index and the id -> path mapping are one consistent snapshot: ids are resolved in one LMDB
    read transaction, and the store keeps the path of every id a published index can return. An id
    that cannot be resolved means a writer has published a newer index since: it is loaded and the
    search repeated. It holds its store open until `close()` (or the end of a `with Searcher.open(...)` block).
    """

    def __init__(self, store: Store, encoder: OnnxEncoder, index: VectorIndex, name: str | None = None,
                 device: Device = Device.auto, text_encoder=None):
        self.store = store
        self.encoder = encoder
        self.index = index
        self.name = name or encoder.spec.name
        self.device = device
        self.exact_subset = EXACT_SUBSET  # see EXACT_SUBSET (a test sets 0 to take the deeper-search path)
        self._text = text_encoder  # encoders.text.TextEncoder of this encoder, made on the first text term
        self._text_lock = threading.Lock()

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
        hits = self.search_vectors(self.item_vectors([item_id]), k)[0]
        own = next((h for h in hits if h.id == item_id), None)
        if own is not None and hits[0] is not own:  # an exact duplicate tied with it: the item itself comes first
            hits = _ranked([own] + [h for h in hits if h is not own])
        return hits

    def item_vectors(self, ids: list[int]) -> np.ndarray:
        """(len(ids), dim) stored vectors of the db's items `ids` (no image decoded); NotFoundError names an id the
        db does not hold."""
        spec = self.encoder.spec
        return self.store.vectors_of_ids(spec.key, ids, spec.dim, live=True)

    def text_encoder(self):
        """The text tower of this searcher's encoder (encoders.text.TextEncoder), loaded once, on first use;
        ModelError when the encoder has none."""
        with self._text_lock:
            if self._text is None:
                from simsearch.encoders.text import TextEncoder

                self._text = TextEncoder(self.encoder.spec, self.device)
            return self._text

    def query_vector(self, terms: tuple[Term, ...]) -> np.ndarray:
        """normalize(sum_i w_i e_i) (dim,) float32, e_i the unit vector of term i: an image through the image tower,
        words through the text tower, an item's stored vector. ImageLoadError for an unreadable image,
        SimsearchError when the weighted sum is zero (the terms cancel out)."""
        if not terms:
            raise SimsearchError("a query needs at least one image, text or item")
        kinds = {t.kind for t in terms} - {"image", "text", "item"}
        if kinds:
            raise SimsearchError(f"unknown query term kind {kinds.pop()!r} (image, text or item)")
        weights = np.array([t.weight for t in terms], dtype=np.float64)  # (T,)
        if not np.isfinite(weights).all():
            raise SimsearchError(f"a query term's weight is not a number: {describe(terms)}")
        e = np.empty((len(terms), self.encoder.spec.dim), dtype=np.float32)  # (T, dim)
        of = {kind: [i for i, t in enumerate(terms) if t.kind == kind] for kind in ("image", "text", "item")}
        if of["image"]:
            vectors, errors = self._embed_images([terms[i].value for i in of["image"]])
            if any(errors):
                raise ImageLoadError(next(error for error in errors if error))
            e[of["image"]] = vectors
        if of["text"]:
            e[of["text"]] = self.text_encoder().embed([str(terms[i].value) for i in of["text"]])
        if of["item"]:
            e[of["item"]] = self.item_vectors([int(terms[i].value) for i in of["item"]])
        combined = weights @ e.astype(np.float64)  # (dim,)
        norm = float(np.linalg.norm(combined))
        if norm < 1e-6:
            raise SimsearchError(f"the query's terms cancel out (their weighted sum is zero): {describe(terms)}")
        return (combined / norm).astype(np.float32)

    def search(self, query: Query, k: int = 10, reranker: Reranker | None = None, depth: int = 100) -> QueryResult:
        """Top k items for a combined query (query.py), cut at query.min_score and kept to query.under.

        With a reranker, the top `depth` that pass the filters are reordered by it: an "encoder" reranker reads the
        combined vector; a "pixels" reranker needs the query to be one image (SimsearchError otherwise).
        """
        self._check_request(k, reranker, depth)
        first = query.terms[0] if query.terms else None
        if reranker is not None and reranker.spec.input == "pixels" and (
                len(query.terms) != 1 or first.kind != "image" or first.weight <= 0):
            raise SimsearchError(f"reranker {reranker.spec.name!r} compares the query image's pixels with each "
                                 f"candidate's: it reranks a query of one image, not {describe(query.terms)!r}")
        t0 = time.perf_counter()
        vector = self.query_vector(query.terms)
        t1 = time.perf_counter()
        where = PathFilter.of(query.under) if query.under else None
        hits = self._hits(vector[None], depth if reranker is not None else k, query.min_score, where)[0]
        t2 = time.perf_counter()
        result = QueryResult(describe(query.terms), hits, {"load+embed": t1 - t0, "search": t2 - t1})
        if reranker is not None:
            result.hits = self.rerank(reranker, str(first.value), vector, hits, k)
            result.seconds["rerank"] = time.perf_counter() - t2
        return result

    def query(self, paths: list[str | Path], k: int = 10, reranker: Reranker | None = None, depth: int = 100,
              min_score: float | None = None, under: str | None = None) -> list[QueryResult]:
        """Top k per query image (each image its own query; `search` combines terms into one), cut at min_score and
        kept to under as `search` does; with a reranker, the top `depth` of the vector search reordered by it.

        Images are embedded QUERY_BATCH at a time; one that cannot be read gets an `error` and no hits.
        """
        self._check_request(k, reranker, depth)
        where = PathFilter.of(under) if under else None
        results = []
        for start in range(0, len(paths), QUERY_BATCH):
            results += self._query_batch(paths[start:start + QUERY_BATCH], k, reranker, depth, min_score, where)
        return results

    def _check_request(self, k: int, reranker: Reranker | None, depth: int) -> None:
        if k < 1:
            raise SimsearchError(f"k must be at least 1 (got {k})")
        require_vectors(self.index, self.name, self.store)
        if reranker is not None:
            self._check_reranker(reranker)
            if depth < k:
                raise SimsearchError(f"--rerank-depth ({depth}) must be at least k ({k})")

    def _embed_images(self, paths: list[str | Path]) -> tuple[np.ndarray, list[str | None]]:
        """(readable images, dim) vectors, in order, and per path the reason it could not be read (None: read)."""
        spec = self.encoder.spec
        arrays, errors = [], []
        for p in paths:
            try:
                arrays.append(to_input(load_rgb(p, decode_side(spec)), spec))  # (3, S, S)
                errors.append(None)
            except ImageLoadError as e:
                errors.append(str(e))
        if not arrays:
            return np.empty((0, spec.dim), dtype=np.float32), errors
        return self.encoder.embed(np.stack(arrays)), errors  # (Q, 3, S, S) -> (Q, dim)

    def _query_batch(self, paths: list[str | Path], k: int, reranker: Reranker | None, depth: int,
                     min_score: float | None, where: PathFilter | None) -> list[QueryResult]:
        t0 = time.perf_counter()
        vectors, errors = self._embed_images(paths)
        results = [QueryResult(str(p), [], error=e) for p, e in zip(paths, errors)]
        ok = [r for r in results if r.error is None]
        if not ok:
            return results
        t1 = time.perf_counter()
        hits = self._hits(vectors, depth if reranker is not None else k, min_score, where)
        t2 = time.perf_counter()
        for result, vector, h in zip(ok, vectors, hits):
            result.hits = h
            result.seconds = {"load+embed": (t1 - t0) / len(ok), "search": (t2 - t1) / len(ok)}
            if reranker is not None:
                t = time.perf_counter()
                result.hits = self.rerank(reranker, result.query, vector, result.hits, k)
                result.seconds["rerank"] = time.perf_counter() - t
        return results

    def _hits(self, vectors: np.ndarray, n: int, min_score: float | None, where: PathFilter | None) -> list[list[Hit]]:
        """The top n hits of each query vector (Q, dim) that score at least min_score and whose path `where` keeps."""
        if where is None:
            return [self._cut(hits, min_score) for hits in self.search_vectors(vectors, n)]
        return [self._under(vector, n, min_score, where) for vector in vectors]

    @staticmethod
    def _cut(hits: list[Hit], min_score: float | None) -> list[Hit]:
        """The hits scoring at least min_score (every index's scores are exact cosines: VectorIndex.search)."""
        if min_score is None:
            return hits
        # float32 rounding: an identical image scores 0.99999994, and `--min-score 1` must keep it
        return _ranked([h for h in hits if h.score >= min_score - FLOAT_SLACK])

    def _under(self, vector: np.ndarray, n: int, min_score: float | None, where: PathFilter) -> list[Hit]:
        """Top n of one query vector (dim,) among the items `where` keeps: exact over their stored vectors when they
        are few (EXACT_SUBSET), else the index searched ever deeper until n of its hits pass or it has no more."""
        subset = self._subset(where)
        if subset is not None:
            spec = self.encoder.spec
            ids, vectors = self.store.vectors_by_id(spec.key, np.asarray([i for i, _ in subset], dtype=np.int64),
                                                    spec.dim)  # live items with a vector: (m,), (m, dim)
            path_of = dict(subset)
            scores = vectors @ vector  # (m,)
            best = np.argsort(-scores, kind="stable")[:n]
            hits = [Hit(r, path_of[int(ids[i])], float(scores[i]), id=int(ids[i])) for r, i in enumerate(best, 1)]
            return self._cut(hits, min_score)
        total = self.index.ntotal  # read once: a Milvus collection counts on the server
        asked = min(total, max(DEEPEN * n, FIRST_DEPTH))
        while True:
            found = self.search_vectors(vector[None], asked)[0]
            hits = self._cut([h for h in found if where(h.path)], min_score)
            floor = None if min_score is None else min_score - FLOAT_SLACK
            below = floor is not None and found and found[-1].score < floor
            if len(hits) >= n or asked >= total or below:  # below: every deeper hit scores less still
                return _ranked(hits[:n])
            log.debug("%d of the top %d pass the filters: searching deeper", len(hits), asked)
            asked = min(total, asked * DEEPEN)

    def _subset(self, where: PathFilter) -> list[tuple[int, str]] | None:
        """(id, path) of every item `where` keeps, or None when there are over exact_subset of them (or finding
        them would read over SCAN_FACTOR times as many records)."""
        found, scanned = [], 0
        items = self.store.iter_items(where.folder)  # one read transaction, closed below
        try:
            for path, record in items:
                scanned += 1
                if where(path):
                    found.append((record.id, path))
                if len(found) > self.exact_subset or scanned > SCAN_FACTOR * self.exact_subset:
                    return None
        finally:
            items.close()
        return found

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


def _ranked(hits: list[Hit]) -> list[Hit]:
    """The hits numbered 1.. in their order."""
    return [h if h.rank == r else replace(h, rank=r) for r, h in enumerate(hits, 1)]
