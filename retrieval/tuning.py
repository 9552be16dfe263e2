"""Search parameters tuned to a recall target against exact search, at build time.

The queries are a seeded sample of the collection's own vectors, held out of the index while it is
tuned (build_index adds them afterwards), so they stand for new images. Exact answers are computed
block by block (the collection never sits in memory twice).
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

K = 10  # recall@10: what `--recall` means

Searcher = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]  # (queries, k) -> (scores, ids)


class ExactTopK:
    """Exact top-k by inner product of a few queries, accumulated over the blocks of a collection."""

    def __init__(self, queries: np.ndarray, k: int = K):
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, dim)
        self.k = k
        self.heap = faiss.ResultHeap(len(queries), self.k, keep_max=True)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(self.queries) == 0 or len(ids) == 0:
            return
        scores, rows = faiss.knn(self.queries, np.ascontiguousarray(vectors, dtype=np.float32),
                                 min(self.k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)  # (Q, k) each
        found = np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)
        if found.shape[1] < self.k:  # a small block: pad with empty slots
            pad = self.k - found.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            found = np.pad(found, ((0, 0), (0, pad)), constant_values=-1)
        self.heap.add_result(scores, found)

    def ids(self) -> np.ndarray:
        """(Q, k) ids of the exact answers, best first."""
        self.heap.finalize()
        return self.heap.I


# A value is accepted when its recall reaches the target with 95% confidence (one-sided) over the sampled queries,
# not just on average: tuned on the sample's mean alone, 1M clustered vectors got 0.950 at build and 0.946 on new
# queries (benchmarks/ann.py). With 500 queries the margin is ~0.005-0.01.
Z = 1.645
PLATEAU = 0.005  # recall@10 given up, when the target is out of reach, for the cheapest rung near the best


def per_query_recall(approx: np.ndarray, exact: np.ndarray, k: int = K) -> np.ndarray:
    """(Q,) |approx top-k ∩ exact top-k| / k per query (empty slots, id -1, left out)."""
    out = np.zeros(len(exact))
    for q, (a, e) in enumerate(zip(approx, exact)):
        want = {i for i in e[:k] if i >= 0}
        out[q] = len({i for i in a[:k] if i >= 0} & want) / max(1, len(want))
    return out


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int = K) -> float:
    """Mean |approx top-k ∩ exact top-k| / k (empty slots, id -1, left out)."""
    return float(per_query_recall(approx, exact, k).mean()) if len(exact) else 0.0


def tune(search: Searcher, set_param: Callable[[int], None], ladder: list[int], queries: np.ndarray,
         exact: np.ndarray, target: float) -> tuple[int, float]:
    """The smallest ladder value whose recall@10 reaches `target` with 95% confidence (mean - Z standard errors
    over the queries; then refined by bisection between it and the previous rung), and its mean recall. If none
    does, the first rung within PLATEAU of the best recall any rung reached, and its recall.

    Recall grows with nprobe / efSearch and so does the cost: the smallest value reaching the target
    is the fastest one that keeps the promise. A target out of reach is one compressed codes cap: recall stops
    growing long before the last rung (10M x 256 as ivfpq: 0.897 at every one of 16,384 lists, a full scan), while
    each rung costs about twice the one before.
    """
    def recall(value: int) -> tuple[float, bool]:
        set_param(value)
        _, ids = search(queries, K)
        per = per_query_recall(ids, exact)
        spread = Z * per.std(ddof=1) / np.sqrt(len(per)) if len(per) > 1 else 0.0
        return float(per.mean()), float(per.mean()) - spread >= target

    low, best, seen = None, None, []
    for value in ladder:
        r, reached = recall(value)
        if reached:
            best = (value, r)
            break
        low = value
        seen.append((value, r))
    if best is None:
        top = max(r for _, r in seen)
        value, r = next((v, r) for v, r in seen if r >= top - PLATEAU)
        set_param(value)
        return value, r
    lo, (hi, r_hi) = (low or 0), best
    while hi - lo > 1 and hi > 2:  # bisection: recall is monotone in practice
        mid = (lo + hi) // 2
        r, reached = recall(mid)
        if reached:
            hi, r_hi = mid, r
        else:
            lo = mid
    set_param(hi)
    return hi, r_hi
