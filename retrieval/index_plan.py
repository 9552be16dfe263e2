"""Which FAISS index a collection gets: a pure function of (vector count, dimension, memory budget).

In the spirit of autofaiss's `get_optimal_index_keys_v2`: exact search while a scan is cheap, then the
most accurate inverted-file index that fits the memory budget, compressing the vectors only when it
must. Vectors are L2-normalised, so every index uses inner product (= cosine).

| collection                                    | kind    | bytes per vector        |
|-----------------------------------------------|---------|-------------------------|
| up to FLAT_MAX vectors                        | flat    | 4*dim + 8               |
| dim >= HNSW_AUTO_DIM, up to HNSW_AUTO_MAX     | hnsw    | 4*dim + 8 + 8*hnsw_m    |
| IVF-Flat fits the budget                      | ivf     | 4*dim + 8               |
| else IVF + 8-bit scalar quantiser fits        | sq8     | dim + 8, re-scored      |
| else OPQ + IVF + PQ, the largest M that fits  | ivfpq   | M + 8, re-scored        |

The compressed kinds (RESCORED) rank approximately: a search takes RESCORE * k candidates from their codes and
re-scores them exactly from the float32 vectors the store keeps (which stay on disk, read through LMDB's map), so
every score a caller sees is an exact cosine and the index's RAM is the codes alone (10M x 256 as sq8: 2.6 GB).

IVF lists: 4*sqrt(n) (the low end of FAISS's 4..16*sqrt(n) guideline: k-means training costs
nlist^2, and on 2 cores that is the build's largest term), rounded to a power of two, and halved while
nlist^2 * dim passes KMEANS_BUDGET (k-means and the assignment of every vector both cost ~nlist * dim per
vector: 1M x 1280 gets 1024 lists, not 4096, and builds in well under half the time). Above
HNSW_QUANTIZER_FROM vectors the coarse quantiser is an HNSW graph over the centroids (FAISS's
`IVFx_HNSW32` for 1M-10M), because assigning 10M vectors to 16k centroids by brute force costs more
than the rest of the build.

HNSW is chosen for wide vectors (dim >= HNSW_AUTO_DIM) up to HNSW_AUTO_MAX of them: an IVF-Flat search reads
nprobe whole lists of 4*dim-byte vectors, a graph search a few hundred of them, and on the real 1280-d
embeddings of `python -m simsearch.benchmarks ann` the graph is ~2x the QPS of IVF at recall 0.95 (and ahead of
hnswlib). Above HNSW_AUTO_MAX its build passes the IVF's by minutes; at 256-d IVF is as fast to search. It cannot
remove vectors, only mark them (tombstones: the segments' search skips them, and past 10% the graph is rebuilt).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from simsearch.errors import SimsearchError

log = logging.getLogger(__name__)

KINDS = ("auto", "flat", "ivf", "sq8", "ivfpq", "hnsw")
FLAT_MAX = 10_000  # exact search up to here: a 10k x 1280 scan is ~1 ms on 2 cores
HNSW_QUANTIZER_FROM = 2_000_000
# nlist^2 * dim at most (below HNSW_QUANTIZER_FROM): 1M x 256's 4096 lists (its build: 42 s on 2 cores). 1M x 1280
# with 4096 lists built in 190 s; under load 2048 lists still took 163 s (100 s of it assigning the vectors), 1024
# take well under 120 s (docs/scale.md, the ANN benchmark). A search costs about the same: nlist centroids plus
# nprobe lists of n / nlist vectors each, and fewer, longer lists trade the first for the second.
KMEANS_BUDGET = 4096**2 * 256
HNSW_AUTO_DIM = 512  # auto picks HNSW for vectors this wide...
HNSW_AUTO_MAX = 200_000  # ... up to this many (100k x 1280: built in 34 s, vs IVF's 11 s)
HNSW_M = 32  # graph links per node (FAISS's and hnswlib's common default for 0.9+ recall)
# Beam width while an HNSW graph is built (hnswlib's and usearch's 128 in benchmarks/ann.py). FAISS's default of 40
# built a graph of 100k synthetic 1280-d vectors that needed efSearch 515 for recall@10 0.95, where hnswlib's
# needed 32.
HNSW_EF_CONSTRUCTION = 128
TRAIN_PER_LIST = 39  # k-means sample per IVF list (FAISS warns below 39)
PQ_BYTES = (64, 48, 32, 24, 16, 12, 8, 4)  # candidate M (bytes per vector) for ivfpq, best first
RESCORE = 4  # a compressed index fetches RESCORE * k candidates and re-scores them exactly from the stored vectors
# ... deeper when its codes cannot reach the recall target at any nprobe with RESCORE * k (tuned at build, recorded
# as the "rescore" parameter): 10M x 256 as PQ64 stopped at recall@10 0.897 with 40 candidates
RESCORE_LADDER = (RESCORE, 8, 16, 32)
RESCORED = frozenset({"sq8", "ivfpq"})  # the kinds whose codes approximate the vectors
BUDGET_FRACTION = 0.5  # default --max-index-memory: this share of the machine's RAM


@dataclass(frozen=True)
class IndexPlan:
    kind: str
    nlist: int = 0  # IVF lists (ivf, sq8, ivfpq)
    pq_m: int = 0  # PQ bytes per vector (ivfpq)
    hnsw_m: int = 0  # links per node (hnsw; the coarse quantiser of a large IVF)

    def factory(self, dim: int) -> str:
        """The faiss.index_factory string. Flat and HNSW get an IDMap (store ids); IVF lists store ids themselves."""
        coarse = f"IVF{self.nlist}" + (f"_HNSW{self.hnsw_m}" if self.hnsw_m else "")
        return {
            "flat": "IDMap,Flat",
            "hnsw": f"IDMap,HNSW{self.hnsw_m}",
            "ivf": f"{coarse},Flat",
            "sq8": f"{coarse},SQ8",
            # OPQ rotates (and for dim > 4M reduces) to 4M dims: 4 dims per PQ sub-quantizer.
            "ivfpq": f"OPQ{self.pq_m}_{self.pq_m * 4},{coarse},PQ{self.pq_m}",
        }[self.kind]

    def bytes_per_vector(self, dim: int) -> int:
        code = {"flat": 4 * dim, "ivf": 4 * dim, "hnsw": 4 * dim + 8 * self.hnsw_m, "sq8": dim, "ivfpq": self.pq_m}
        return code[self.kind] + 8  # + the 8-byte id

    def memory_bytes(self, count: int, dim: int) -> int:
        """The index in RAM: codes and ids, plus centroids (and the OPQ rotation and PQ codebooks)."""
        fixed = self.nlist * dim * 4 + (self.nlist * self.hnsw_m * 8 if self.kind != "hnsw" else 0)
        if self.kind == "ivfpq":
            fixed += dim * self.pq_m * 4 * 4 + 256 * self.pq_m * 4 * 4  # OPQ matrix (dim x 4M), PQ codebooks
        return count * self.bytes_per_vector(dim) + fixed

    def train_count(self, count: int) -> int:
        """Vectors sampled to train it: k-means needs ~39 per list, PQ codebooks 39 * 256 per sub-quantiser."""
        if self.kind in ("flat", "hnsw"):
            return 0
        need = self.nlist * TRAIN_PER_LIST
        if self.kind == "ivfpq":
            need = max(need, 256 * TRAIN_PER_LIST)
        return min(count, need)


def ivf_lists(count: int, dim: int = 0) -> int:
    """4*sqrt(n) rounded to a power of two, with at least 39 training vectors per list; below HNSW_QUANTIZER_FROM
    halved while nlist^2 * dim passes KMEANS_BUDGET (dim 0: no cap)."""
    n = max(1, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(count)))))
    while count < HNSW_QUANTIZER_FROM and n > 1 and n * n * dim > KMEANS_BUDGET:
        n //= 2
    return max(1, min(n, count // TRAIN_PER_LIST))


def choose_index(count: int, dim: int, budget: int, kind: str = "auto") -> IndexPlan:
    """The index for `count` vectors of `dim` within `budget` bytes (pure: same inputs, same plan).

    kind="auto" follows the table in the module docstring; another kind is built as asked (its
    parameters still sized to the collection). SimsearchError when nothing fits the budget.
    """
    if kind not in KINDS:
        raise SimsearchError(f"unknown index kind {kind!r} (available: {', '.join(KINDS)})")
    nlist = ivf_lists(count, dim)
    coarse_m = HNSW_M if count >= HNSW_QUANTIZER_FROM else 0
    candidates = {
        "flat": [IndexPlan("flat")],
        "hnsw": [IndexPlan("hnsw", hnsw_m=HNSW_M)],
        "ivf": [IndexPlan("ivf", nlist, hnsw_m=coarse_m)],
        "sq8": [IndexPlan("sq8", nlist, hnsw_m=coarse_m)],
        "ivfpq": [IndexPlan("ivfpq", nlist, m, coarse_m) for m in PQ_BYTES if 4 * m <= dim],
    }
    if kind != "auto":
        plans = candidates[kind]
        if not plans:
            raise SimsearchError(f"ivfpq needs at least {4 * PQ_BYTES[-1]} dimensions (got {dim})")
        fitting = [p for p in plans if p.memory_bytes(count, dim) <= budget]
        return (fitting or plans[-1:])[0]  # asked for explicitly: built even over the budget (the caller warns)
    if count <= FLAT_MAX:
        return IndexPlan("flat")
    graph = candidates["hnsw"] if dim >= HNSW_AUTO_DIM and count <= HNSW_AUTO_MAX else []
    for plan in graph + candidates["ivf"] + candidates["sq8"] + candidates["ivfpq"]:
        if plan.memory_bytes(count, dim) <= budget:
            return plan
    smallest = (candidates["ivfpq"] or candidates["sq8"])[-1]
    raise SimsearchError(f"{count:,} vectors of {dim} dims need at least {smallest.memory_bytes(count, dim) / 2**30:.1f} GiB "
                         f"even as {smallest.kind} (M={smallest.pq_m}); the budget is {budget / 2**30:.1f} GiB: "
                         "raise --max-index-memory")


def default_budget() -> int:
    """BUDGET_FRACTION of this machine's physical RAM, in bytes."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a small laptop
        ram = 8 << 30
    return int(ram * BUDGET_FRACTION)


def parse_bytes(text: str) -> int:
    """'8G', '512M', '1.5GiB', '1000000' -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t)
    except ValueError:
        raise SimsearchError(f"not a memory size: {text!r} (e.g. 8G, 512M)") from None
    if value <= 0:
        raise SimsearchError(f"a memory size must be positive (got {text!r})")
    return int(value * scale)


@dataclass(frozen=True)
class IndexConfig:
    """How a FAISS index is built: its kind (or auto), the memory it may take, the recall it is tuned to."""

    kind: str = "auto"  # auto | flat | ivf | sq8 | ivfpq | hnsw (see above)
    max_memory: int = 0  # bytes the index may take in RAM; 0 = default_budget()
    recall: float | None = None  # recall@10 the search parameters are tuned to; None: the db's, else DEFAULT_RECALL
    tune_queries: int = 500  # sampled from the collection itself
    niter: int = 10  # k-means iterations: 10 is within ~1% of FAISS's 25 for IVF recall, at 40% of the cost
    seed: int = 0

    def plan(self, count: int, dim: int) -> IndexPlan:
        budget = self.max_memory or default_budget()
        plan = choose_index(count, dim, budget, self.kind)
        if plan.memory_bytes(count, dim) > budget:
            log.warning("--index %s: %d vectors take ~%.1f GiB, over the --max-index-memory budget of %.1f GiB",
                        plan.kind, count, plan.memory_bytes(count, dim) / 2**30, budget / 2**30)
        return plan
