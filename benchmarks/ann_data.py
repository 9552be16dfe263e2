"""Vectors, queries and exact ground truth for the ANN benchmark (`benchmarks/ann.py`).

Every data set is a raw little-endian float32 file of (n, dim) rows in the work dir, read block by block
(`VectorFile.blocks`, plain reads into fresh arrays: they do not stay mapped, so a process's RSS holds
one block) and by row (`VectorFile.fetch`, a read-only memmap: what sq8's and ivfpq's re-scoring reads, as the
db's LMDB is read through a map), plus a (q, dim) query file and the exact top-k of every query.

Synthetic vectors (`Mixture`): uniform random vectors have no neighbourhoods, so an IVF or a graph index
looks either perfect or hopeless on them. Image embeddings instead sit in many clusters of very different
sizes and spreads, clusters nest (breeds inside "dog" inside "animal"), and inside a cluster the vectors
vary along a few directions only (local intrinsic dimension ~10-30 for 256-1280-d CNN features). The
mixture has all of that: `tops` top-level directions, each with `subs` sub-clusters around it; every
sub-cluster has its own size (Zipf weights) and spread (log-uniform), and its points vary inside a
`rank`-dimensional subspace shared by its top-level cluster (decaying spectrum) plus a little isotropic
noise; rows are L2-normalised. `benchmarks/ann.py --calibrate`-style statistics (relative contrast, IVF
recall at a fixed nprobe, LID) of the defaults are recorded in the results next to the real embeddings'.

Row i of a stream depends only on (seed, stream, i // rows_per_block): the 100k base is the first 100k
rows of the 1M base, a 10M x 256 file is written block by block without ever holding more than a block,
and queries come from their own stream of the same mixture (never rows of the base).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

BASE_STREAM, QUERY_STREAM = 0, 1
BLOCK_BYTES = 32 << 20  # rows per generated/read block: 32 MiB of float32


def rows_per_block(dim: int) -> int:
    return max(1024, BLOCK_BYTES // (4 * dim))


class Throttle:
    """Calls `log_fn` at most every `seconds` (and always for the last step): progress for long work."""

    def __init__(self, seconds: float = 5.0):
        self.seconds = seconds
        self.last = time.monotonic()

    def due(self, final: bool = False) -> bool:
        now = time.monotonic()
        if final or now - self.last >= self.seconds:
            self.last = now
            return True
        return False


@dataclass(frozen=True)
class MixtureSpec:
    dim: int
    seed: int = 0
    tops: int = 32  # top-level clusters ("animal", "vehicle", ...)
    subs: int = 16  # sub-clusters per top-level one: tops * subs clusters in all
    common: float = 0.8  # weight of the direction all clusters share (0: clusters anywhere on the sphere)
    sub_spread: float = 0.5  # distance scale of a sub-cluster's centre from its top-level direction
    rank: int = 32  # directions a cluster varies along (its local intrinsic dimension)
    spread: tuple[float, float] = (0.5, 1.5)  # per-sub-cluster scale of that variation (log-uniform)
    noise: float = 0.35  # isotropic noise, relative to the cluster's spread
    zipf: float = 0.8  # cluster sizes ~ 1 / rank^zipf

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


class Mixture:
    """The clustered generator: parameters are drawn once from spec.seed (a few MB), rows block by block."""

    def __init__(self, spec: MixtureSpec):
        self.spec = spec
        d, r = spec.dim, min(spec.rank, spec.dim)
        rng = np.random.default_rng([spec.seed, 12345])
        # All top-level directions share one component: embeddings fill a cone, not the sphere (ReLU features
        # of a CNN have cosine ~0.35 between unrelated images).
        tops = _unit(spec.common * _unit(rng.standard_normal((1, d))) + _unit(rng.standard_normal((spec.tops, d))))
        k = spec.tops * spec.subs
        offsets = rng.standard_normal((k, d)) * (spec.sub_spread / math.sqrt(d))
        self.centres = _unit(np.repeat(tops, spec.subs, axis=0) + offsets).astype(np.float32)  # (K, d)
        # An (r, d) basis per top-level cluster, its sub-clusters vary along the same directions: random unit
        # rows are near-orthogonal in d >> r dimensions (and a QR of 64 (d, r) matrices is slow for nothing).
        self.bases = _unit(rng.standard_normal((spec.tops * r, d))).reshape(spec.tops, r, d).astype(np.float32)
        spectrum = np.arange(1, r + 1, dtype=np.float64) ** -0.5
        self.spectrum = (spectrum / np.linalg.norm(spectrum)).astype(np.float32)  # (r,), unit total variance
        lo, hi = spec.spread
        self.scales = np.exp(rng.uniform(math.log(lo), math.log(hi), k)).astype(np.float32)  # (K,)
        w = 1.0 / np.arange(1, k + 1) ** spec.zipf
        self.cdf = np.cumsum(rng.permutation(w / w.sum()))
        self.rows = rows_per_block(d)

    def block(self, stream: int, index: int) -> np.ndarray:
        """Rows [index * self.rows, (index + 1) * self.rows) of `stream`: (rows, dim) float32, unit norm."""
        s, m, d = self.spec, self.rows, self.spec.dim
        rng = np.random.default_rng([s.seed, stream, index])
        # Draw the clusters, then work on rows sorted by cluster (contiguous slices, no scatter), and shuffle
        # at the end: the rows are i.i.d. draws either way, and insertion order stays random for graph indexes.
        labels = np.sort(np.minimum(np.searchsorted(self.cdf, rng.random(m)), len(self.cdf) - 1))
        scale = self.scales[labels][:, None]  # (m, 1)
        z = rng.standard_normal((m, len(self.spectrum)), dtype=np.float32) * self.spectrum * scale  # (m, r)
        x = self.centres[labels]  # (m, d), a copy
        bounds = np.searchsorted(labels // s.subs, np.arange(s.tops + 1))
        for t in range(s.tops):  # (m_t, r) @ (r, d): the cluster's own directions
            a, b = bounds[t], bounds[t + 1]
            if b > a:
                x[a:b] += z[a:b] @ self.bases[t]
        x += (s.noise / math.sqrt(d)) * scale * rng.standard_normal((m, d), dtype=np.float32)
        return _unit(x)[rng.permutation(m)]

    def rows_of(self, stream: int, count: int) -> Iterator[np.ndarray]:
        """The first `count` rows of `stream`, block by block."""
        for b in range(math.ceil(count / self.rows)):
            x = self.block(stream, b)
            yield x[: count - b * self.rows] if (b + 1) * self.rows > count else x


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class VectorFile:
    """A raw (n, dim) float32 file: blocks read into fresh arrays, rows fetched through a read-only map."""

    def __init__(self, path: Path, n: int, dim: int):
        self.path, self.n, self.dim = Path(path), n, dim
        need = n * dim * 4
        if self.path.stat().st_size < need:
            raise ValueError(f"{self.path}: {self.path.stat().st_size:,} bytes, {n:,} x {dim} needs {need:,}")
        self._map: np.memmap | None = None

    def blocks(self, count: int | None = None, rows: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids (m,) int64, vectors (m, dim) float32) over the first `count` rows (ids = row numbers)."""
        count = self.n if count is None else count
        rows = rows or rows_per_block(self.dim)
        with open(self.path, "rb", buffering=0) as f:
            for start in range(0, count, rows):
                m = min(rows, count - start)
                x = np.empty((m, self.dim), dtype=np.float32)
                f.seek(start * self.dim * 4)
                got = f.readinto(memoryview(x).cast("B"))
                if got != x.nbytes:
                    raise OSError(f"{self.path}: short read at row {start}")
                yield np.arange(start, start + m, dtype=np.int64), x

    def fetch(self, ids: np.ndarray) -> np.ndarray:
        """(m,) row numbers -> (m, dim) float32 copies."""
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.n, self.dim))
        return np.asarray(self._map[np.asarray(ids, dtype=np.int64)], dtype=np.float32)


def write_synthetic(work: Path, spec: MixtureSpec, n: int, queries: int,
                    on_log: Callable[[str], None] = log.info) -> tuple[VectorFile, np.ndarray]:
    """The base file (n rows of the base stream) and the queries ((queries, dim), the query stream).

    A file already written for the same spec and at least n rows is reused (its sidecar JSON says so).
    """
    work.mkdir(parents=True, exist_ok=True)
    mix = None
    path = work / f"synth-{spec.dim}d-{spec.key()}.f32"
    meta = path.with_suffix(".json")
    have = json.loads(meta.read_text())["rows"] if meta.is_file() and path.is_file() else 0
    if have < n:
        mix = Mixture(spec)
        meta.unlink(missing_ok=True)
        t0, throttle, done = time.perf_counter(), Throttle(), 0
        with open(path, "wb") as f:
            for x in mix.rows_of(BASE_STREAM, n):
                f.write(x.tobytes())
                done += len(x)
                if throttle.due(done == n):
                    on_log(f"synthetic {spec.dim}-d: {done:,}/{n:,} vectors written ({time.perf_counter() - t0:.0f} s)")
        meta.write_text(json.dumps({"rows": n, "spec": asdict(spec)}))
        have = n
    qpath = work / f"synth-{spec.dim}d-{spec.key()}-q{queries}.npy"
    if qpath.is_file():
        q = np.load(qpath)
    else:
        mix = mix or Mixture(spec)
        q = np.concatenate(list(mix.rows_of(QUERY_STREAM, queries)))
        np.save(qpath, q)
    return VectorFile(path, have, spec.dim), q


def ground_truth(base: VectorFile, n: int, queries: np.ndarray, k: int, cache: Path | None = None,
                 on_log: Callable[[str], None] = log.info, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product of every query over the first n rows: (scores (q, k), ids (q, k)), best first.

    Computed block by block (faiss.knn per block, merged in a ResultHeap): memory is one block plus (q, k).
    Cached in `cache` (.npz) when given.
    """
    import faiss

    if cache is not None and cache.is_file():
        z = np.load(cache)
        return z["scores"], z["ids"]
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    t0, throttle, done = time.perf_counter(), Throttle(), 0
    for ids, x in base.blocks(n, rows):
        kk = min(k, len(x))
        d, i = faiss.knn(q, x, kk, metric=faiss.METRIC_INNER_PRODUCT)
        if kk < k:  # a last block smaller than k: pad with "nothing"
            d = np.pad(d, ((0, 0), (0, k - kk)), constant_values=-np.inf)
            i = np.pad(i, ((0, 0), (0, k - kk)), constant_values=-1)
        heap.add_result(np.ascontiguousarray(d, dtype=np.float32), np.where(i >= 0, i + ids[0], -1).astype(np.int64))
        done += len(x)
        if throttle.due(done == n):
            on_log(f"ground truth: {done:,}/{n:,} vectors scanned ({time.perf_counter() - t0:.0f} s)")
    heap.finalize()
    scores, ids = heap.D.copy(), heap.I.copy()
    if cache is not None:
        np.savez(cache, scores=scores, ids=ids)
    return scores, ids


def recall_at_k(found: np.ndarray, gt_ids: np.ndarray, gt_scores: np.ndarray, base: VectorFile,
                queries: np.ndarray, tol: float = 1e-5) -> float:
    """Mean |found ∩ exact top-k| / k. A returned id outside the exact list still counts when its exact score
    ties the k-th exact score (within `tol`): with duplicates or float ties either id is a correct answer."""
    k = gt_ids.shape[1]
    found = found[:, :k]
    hits = 0
    for qi in range(len(found)):
        f = found[qi][found[qi] >= 0]
        inside = np.isin(f, gt_ids[qi])
        hits += int(inside.sum())
        out = f[~inside]
        if len(out):
            s = base.fetch(out) @ queries[qi]
            hits += int((s >= gt_scores[qi, -1] - tol).sum())
    return hits / (len(found) * k)


def export_db(db: Path, encoder: str, work: Path, queries: int, seed: int = 0, preprocess: str | None = None,
              on_log: Callable[[str], None] = log.info) -> tuple[VectorFile, np.ndarray, dict]:
    """The vectors of one encoder in a simsearch db, split into a base file and held-out queries.

    `encoder`: a name in the db's manifest, else a registry name (with `preprocess`) whose vectors the db
    holds (a benchmark cache db stores vectors without manifest entries). A seeded sample of `queries` rows
    is held out: they are queries, not in the base. Items sharing one vector (the same image under two paths)
    count once. Returns (base, queries (q, dim), facts).
    """
    from simsearch.indexer.store import Store

    with Store(db, readonly=True) as store:
        entry = store.manifest.encoders.get(encoder)
        if entry is not None:
            key, dim = entry.key, entry.dim
        else:
            from simsearch.encoders.registry import get_encoder

            spec = get_encoder(encoder).with_preprocess(preprocess)
            key, dim = spec.key, spec.dim
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{db.resolve()}-{key}")
        tag = hashlib.sha256(safe.encode()).hexdigest()[:12]
        path, meta = work / f"db-{tag}-q{queries}-s{seed}.f32", work / f"db-{tag}-q{queries}-s{seed}.json"
        if meta.is_file() and path.is_file():
            facts = json.loads(meta.read_text())
            return VectorFile(path, facts["n"], dim), np.load(meta.with_suffix(".npy")), facts
        seen: set[bytes] = set()
        distinct = []  # per block: a mask of the rows seen for the first time
        for _, x in store.iter_vector_blocks(key, dim):
            keep = np.zeros(len(x), dtype=bool)
            for i, row in enumerate(x):
                h = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
                if h not in seen:
                    seen.add(h)
                    keep[i] = True
            distinct.append(keep)
        total = len(seen)
        if total <= queries:
            raise ValueError(f"{db}: {total} vectors of {key}: too few to hold out {queries} queries")
        held = np.zeros(total, dtype=bool)
        held[np.random.default_rng(seed).choice(total, queries, replace=False)] = True
        work.mkdir(parents=True, exist_ok=True)
        q, pos = [], 0
        with open(path, "wb") as f:
            for (_, x), keep in zip(store.iter_vector_blocks(key, dim), distinct):
                x = x[keep]
                h = held[pos:pos + len(x)]
                f.write(np.ascontiguousarray(x[~h], dtype=np.float32).tobytes())
                q.append(x[h])
                pos += len(x)
        q = np.ascontiguousarray(np.concatenate(q), dtype=np.float32)
    facts = {"db": str(db), "encoder": encoder, "key": key, "dim": dim, "n": total - queries, "queries": queries,
             "seed": seed, "duplicates_dropped": sum(len(m) for m in distinct) - total}
    np.save(meta.with_suffix(".npy"), q)
    meta.write_text(json.dumps(facts))
    on_log(f"db {db}: {total:,} vectors of {key} ({dim}-d), {queries} held out as queries")
    return VectorFile(path, facts["n"], dim), q, facts


def data_stats(base: VectorFile, n: int, queries: np.ndarray, gt_scores: np.ndarray, sample: int = 20_000) -> dict:
    """How hard the data is: mean top-1 and top-10 similarity of the queries vs the mean similarity to a random
    base vector (relative contrast), and the local intrinsic dimension (MLE over the exact top-10)."""
    rng = np.random.default_rng(0)
    rand = base.fetch(np.sort(rng.choice(n, min(sample, n), replace=False)))
    mean_sim = float((queries[:200] @ rand.T).mean())
    dist = np.sqrt(np.maximum(2 - 2 * gt_scores.astype(np.float64), 1e-12))  # unit vectors: L2 from inner product
    lid = -1.0 / np.mean(np.log(dist[:, :-1] / dist[:, -1:]), axis=1)
    return {"top1_sim": float(gt_scores[:, 0].mean()), "top10_sim": float(gt_scores[:, -1].mean()),
            "random_sim": mean_sim, "lid_mle": float(np.median(lid))}
