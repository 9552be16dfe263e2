"""Groups of near-duplicate images over a whole db, found through its index, never an N x N matrix.

Every stored vector is a query: the store is read in blocks (`Store.iter_vector_blocks`), each block is
searched for its k nearest neighbours in the encoder's index (the FAISS file or the Milvus collection the
Searcher uses), and the pairs scoring at least the threshold are kept. A vector whose k-th neighbour is
still above the threshold is searched again with 4x the k, until its list ends below the threshold (or
MAX_NEIGHBOURS is reached: a threshold that low joins everything anyway, and it is logged). The pairs then
go through a union-find, strongest first (Kruskal), so a group's `min_score` does not depend on the order
pairs were found in: it is the highest threshold at which the group would still be one group.

Memory: the index, one block of vectors (BLOCK_BYTES), the kept pairs (near-duplicates are rare: 20 bytes
each) and the ids of the collection (8 bytes each, to drop pairs with items removed since the index was
built). Nothing grows with N^2. (While `load_index` deserialises the file, it holds 2x the index for a moment,
as for any query.)

Recall: the index is approximate for IVF and HNSW kinds (tuned to recall@10 >= 0.95 against exact search,
see faiss_index.py). A near-duplicate is its partner's first neighbour, and the pair is found when either
side finds the other, so far fewer than 5% of pairs are missed: none of 10,000 planted pairs among 1M
vectors with an ivf index tuned to 0.95 (benchmarks/dupes.py --scale). Scores are exact cosines for flat, ivf, hnsw and
ivfpq (re-scored from the stored vectors by LoadedIndex); sq8's 8-bit codes are re-scored here from the
stored vectors for every candidate within the index's `score_error` (faiss_index.SQ8_MARGIN) of the
threshold, so no pair is kept or dropped on a quantisation error. A pair the index never returns is not
recovered: use `--index flat` for exact groups.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from simsearch.devices import Device
from simsearch.encoders.registry import is_builtin
from simsearch.encoders.spec import INT8_SUFFIX
from simsearch.errors import SimsearchError
from simsearch.indexer.images import header_size
from simsearch.indexer.lock import writer_active
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import Progress, VectorIndex, open_index, require_vectors

log = logging.getLogger(__name__)

# Calibrated, not guessed: `python -m simsearch.benchmarks dupes` (results/dupes.json) on the 1,000 imagenet-samples
# photos and 5 seeded augmented copies of each (crop, resize, JPEG quality 15-35, colour shift, mirror) with
# efficientnet-lite0-int8, the default encoder on x86 with AVX2. Chosen on one seeded half of the photos as the highest threshold
# whose grouped pairs reach precision and recall >= 0.95 there (tune: P 1.000, R 0.957); on the other half, never
# tuned on: precision 1.000, recall 0.965. The closest two *different* photos score 0.730 (a silver sedan and a
# silver minivan): the best-F1 threshold, 0.73, would sit right on them. Curve: docs/explain-dupes.md, "Near-duplicates".
DEFAULT_THRESHOLD = 0.86
FIRST_K = 16  # neighbours asked per vector at first (the vector itself is one of them)
MAX_NEIGHBOURS = 4096  # a vector's neighbour list is not widened past this
BLOCK_BYTES = 16 << 20  # vectors searched per block: 16 MiB of float32
FLOAT_SLACK = 1e-6

@dataclass(frozen=True)
class DupeItem:
    id: int
    path: str  # may hold surrogate escapes, as Hit.path
    width: int  # from the file's header; 0, 0 when the file is gone or unreadable
    height: int
    bytes: int  # the file's size when it was indexed
    score: float = 1.0  # cosine to the group's keeper (1.0 for the keeper)


@dataclass(frozen=True)
class DupeGroup:
    keeper: DupeItem  # largest pixel count, then largest file size, then the lowest id
    others: list[DupeItem]  # by descending similarity to the keeper
    min_score: float  # the smallest cosine of a pair that joined the group (strongest pairs joined first)


def find_duplicates(store: Store, encoder: str, threshold: float | None = None, *, on_progress: Progress | None = None,
                    block: int | None = None) -> list[DupeGroup]:
    """Groups of items whose vectors of `encoder` have cosine >= threshold, directly or through each other.

    threshold None: DEFAULT_THRESHOLD (calibrated for the built-in EfficientNet-Lite encoders; a trained
    encoder's cosines are on another scale). block: vectors per search (default: BLOCK_BYTES of them).
    Groups come largest first, then by keeper path.
    """
    if threshold is None and not is_builtin(encoder.removesuffix(INT8_SUFFIX)):
        log.warning("the default threshold %.2f was calibrated on the built-in encoders; %s's cosines are on another "
                    "scale (a CLIP model's especially): pass --threshold", DEFAULT_THRESHOLD, encoder)
    threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    if not 0.0 < threshold <= 1.0:
        raise SimsearchError(f"the threshold is a cosine in (0, 1] (got {threshold:g})")
    # One pass of queries on the CPU: a GPU copy of the index would cost more to make than the
    # one pass saves.
    index, entry = open_index(store, encoder, Device.cpu)
    try:
        require_vectors(index, encoder, store)
        if not entry.up_to_date(store.generation) and not writer_active(store.root):
            log.warning("the index of %s is older than the db: images added since are compared with the indexed "
                        "ones only; re-run `simsearch index` first for complete groups", encoder)
        rows = block or max(256, BLOCK_BYTES // (4 * entry.dim))
        # float32 rounding: an image and an identical copy score 0.99999994, and `--threshold 1` must group them.
        cut = threshold - FLOAT_SLACK
        edges, live = _edges(store, index, entry.key, entry.dim, cut, rows, on_progress)
    finally:
        index.close()  # e.g. Milvus Lite serves one process per file
    edges = _only_between(edges, live)  # ids removed since the index was built are not items any more
    groups = _union(*edges)
    return _describe(store, entry.key, entry.dim, groups, on_progress)


def _edges(store: Store, index: VectorIndex, key: str, dim: int, threshold: float, rows: int,
           on_progress: Progress | None) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """Pairs (a (E,), b (E,), score (E,)) with a < b and score >= threshold, each once; and every id queried (N,)."""
    total, done = index.ntotal, 0  # read once: a Milvus collection counts on the server
    search_cut = threshold - index.score_error  # an approximate score (sq8) may be below the exact one
    found, queried = [], []
    widened = 0
    for ids, vecs in store.iter_vector_blocks(key, dim, rows):  # (n,), (n, dim)
        a, b, s, capped = _neighbours(index, total, ids, vecs, search_cut)
        if index.score_error and len(a):
            a, b, s = _rescore(store, key, dim, ids, vecs, a, b, threshold)
        widened += capped
        found.append((a, b, s))
        queried.append(ids)
        done += len(ids)
        if on_progress:
            on_progress("finding near-duplicates", done, max(total, done))
    if widened:
        log.warning("%d images have over %d neighbours above the threshold %g: groups that large are joined through "
                    "them anyway, but raise the threshold for meaningful ones", widened, MAX_NEIGHBOURS, threshold)
    if not queried:
        raise SimsearchError(f"the db at {store.root} holds no vectors of this encoder: run `simsearch index FOLDER`")
    a, b, s = (np.concatenate(part) for part in zip(*found))
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    # Each pair is usually found from both sides: keep it once (its best score: equal unless sq8 re-scored one side).
    order = np.lexsort((-s, hi, lo))
    lo, hi, s = lo[order], hi[order], s[order]
    first = np.ones(len(lo), dtype=bool)
    first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return (lo[first], hi[first], s[first]), np.concatenate(queried)


def _neighbours(index: VectorIndex, ntotal: int, ids: np.ndarray, vecs: np.ndarray, threshold: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(query id, neighbour id, score) of every neighbour above the threshold for this block, widening k for
    the rows whose list is still above it at its end; and how many rows hit MAX_NEIGHBOURS."""
    a, b, s = [], [], []
    capped, k = 0, FIRST_K
    while len(ids):
        k = min(k, ntotal)
        scores, nbrs = index.search(vecs, k)  # (n, k), (n, k), best first
        keep = (scores >= threshold) & (nbrs >= 0) & (nbrs != ids[:, None])
        rows, cols = np.nonzero(keep)
        full = (scores[:, -1] >= threshold) & (nbrs[:, -1] >= 0) & (k < ntotal)
        if k >= MAX_NEIGHBOURS:
            capped += int(full.sum())
            full[:] = False
        rows, cols = rows[~full[rows]], cols[~full[rows]]  # rows searched again give their whole list next time
        a.append(ids[rows])
        b.append(nbrs[rows, cols])
        s.append(scores[rows, cols])
        ids, vecs, k = ids[full], vecs[full], k * 4
    cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.empty(0, dtype)  # noqa: E731
    return cat(a, np.int64), cat(b, np.int64), cat(s, np.float32), capped


def _rescore(store: Store, key: str, dim: int, ids: np.ndarray, vecs: np.ndarray, a: np.ndarray, b: np.ndarray,
             threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact cosines of candidate pairs from the stored vectors (an sq8 index scores by 8-bit codes)."""
    other = store.vectors_of_ids(key, b.tolist(), dim)  # (E, dim)
    order = np.argsort(ids)  # a block is in path order, not id order
    mine = vecs[order[np.searchsorted(ids, a, sorter=order)]]  # (E, dim)
    s = np.einsum("ed,ed->e", mine, other).astype(np.float32)
    keep = s >= threshold
    return a[keep], b[keep], s[keep]


def _only_between(edges: tuple[np.ndarray, np.ndarray, np.ndarray], live: np.ndarray):
    a, b, s = edges
    keep = np.isin(a, live) & np.isin(b, live)
    return a[keep], b[keep], s[keep]


def _union(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """Connected components of the pairs: [(member ids (m,), min_score)], joined strongest pair first."""
    if not len(a):
        return []
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    ia, ib = inverse[: len(a)], inverse[len(a):]
    parent = list(range(len(nodes)))
    joined_at = [1.0] * len(nodes)  # per root: the score of the last (weakest) pair that joined its group

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for e in np.argsort(-s, kind="stable").tolist():
        ra, rb = root(int(ia[e])), root(int(ib[e]))
        if ra != rb:
            parent[rb] = ra
            joined_at[ra] = float(s[e])  # pairs come strongest first: this is the group's weakest join so far
    roots = np.array([root(x) for x in range(len(nodes))])
    order = np.argsort(roots, kind="stable")
    bounds = np.flatnonzero(np.diff(roots[order])) + 1
    return [(nodes[part], joined_at[int(roots[part[0]])]) for part in np.split(order, bounds)]


def _describe(store: Store, key: str, dim: int, groups: list[tuple[np.ndarray, float]],
              on_progress: Progress | None) -> list[DupeGroup]:
    """Paths, sizes and pixel counts of the grouped items (headers only), the keeper, and cosines to it."""
    total, done = sum(len(m) for m, _ in groups), 0
    out = []
    for members, min_score in groups:
        ids = members.tolist()
        paths = store.paths_of(ids)
        vectors = store.vectors_of_ids(key, ids, dim)  # (m, dim)
        items = []
        for i, path in zip(ids, paths):
            record = store.get_item(path) if path is not None else None
            width, height = header_size(path) if path is not None else (0, 0)
            items.append(DupeItem(i, path or f"item {i}", width, height, record.size if record else 0))
        done += len(ids)
        if on_progress:
            on_progress("reading image headers", done, total)
        best = max(range(len(items)), key=lambda j: (items[j].width * items[j].height, items[j].bytes, -items[j].id))
        scores = vectors @ vectors[best]  # (m,)
        others = sorted((replace(it, score=float(scores[j])) for j, it in enumerate(items) if j != best),
                        key=lambda it: (-it.score, it.path))
        out.append(DupeGroup(items[best], others, min_score))
    out.sort(key=lambda g: (-len(g.others), g.keeper.path))
    return out
