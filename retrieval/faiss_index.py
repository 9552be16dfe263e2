"""Build, save, load and search the FAISS index of one encoder in a db.

Ids in the index are the store's item ids (IndexIDMap2), so a removed item is simply not in the
next build and a hit maps back to its path through the store. The kind is chosen by collection
size ("auto"): exact inner product while a full scan is cheap, an inverted file (IVF) above that,
because a flat scan reads every vector per query (100k x 1280-d float32 = 512 MB, ~30 ms on 2 cores).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from simsearch.devices import Device, faiss_use_gpu
from simsearch.errors import SimsearchError

log = logging.getLogger(__name__)

# FAISS GPU k-selection is limited to k <= 2048; above it we search on the CPU.
GPU_MAX_K = 2048


@dataclass(frozen=True)
class IndexConfig:
    kind: str = "auto"  # "auto" | "flat" | "ivf"; vectors are L2-normalised, so inner product is cosine
    flat_max: int = 10_000  # "auto" stays exact up to this many vectors
    nlist: int = 0  # IVF lists; 0 = 4 * sqrt(n), the low end of FAISS's guideline (4..16 * sqrt(n))
    nprobe: int = 0  # lists scanned per query; 0 = nlist / 32 (recall@10 ~0.97 on clustered data, see benchmarks/speed.py)
    train_per_list: int = 40  # k-means sample size per list (FAISS warns below 39)
    seed: int = 0

    def resolve(self, count: int) -> str:
        if self.kind not in KINDS:
            raise SimsearchError(f"unknown index kind {self.kind!r} (available: {', '.join(KINDS)})")
        if self.kind == "auto":
            return "flat" if count <= self.flat_max else "ivf"
        return self.kind


KINDS = ("auto", "flat", "ivf")

BlockSource = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


def build_index(blocks: BlockSource, dim: int, count: int, config: IndexConfig = IndexConfig()) -> faiss.Index:
    """blocks(): a fresh iterable of (ids (n,) int64, vectors (n, dim) float32) over all `count` vectors.

    It is called twice for IVF (train on a sample, then add), so vectors never all sit in memory at once
    beyond what FAISS itself stores.
    """
    kind = config.resolve(count)
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    else:
        nlist = config.nlist or max(1, int(4 * np.sqrt(count)))
        nlist = min(nlist, max(1, count // 39))  # k-means needs ~39 points per centroid
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.nprobe = config.nprobe or max(1, nlist // 32)
        ivf.train(_training_sample(blocks, count, nlist * config.train_per_list, config.seed))
        log.info("IVF index: %d lists, nprobe %d, trained on up to %d vectors", nlist, ivf.nprobe,
                 nlist * config.train_per_list)
        index = faiss.IndexIDMap2(ivf)
    for ids, vecs in blocks():
        index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), ids)
    return index


def index_kind(index: faiss.Index) -> str:
    """What build_index made, for the manifest: "flat" or "ivf<nlist>,nprobe<p>"."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return "flat"
    return f"ivf{ivf.nlist},nprobe{ivf.nprobe}"


def _training_sample(blocks: BlockSource, count: int, size: int, seed: int) -> np.ndarray:
    """A seeded uniform sample of about `size` vectors, drawn block by block: (<=size, dim)."""
    rng = np.random.default_rng(seed)
    keep = min(1.0, size / max(count, 1))
    parts = [vecs[rng.random(len(vecs)) < keep] for _, vecs in blocks()]
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def save_index(index: faiss.Index, path: Path) -> None:
    """Atomic: a crash leaves the previous index file intact."""
    fd, tmp = tempfile.mkstemp(suffix=".faiss.tmp", dir=path.parent)
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class LoadedIndex:
    """A FAISS index on the CPU, or on the GPU when asked and possible."""

    def __init__(self, index: faiss.Index, device: Device = Device.auto):
        self.cpu_index = index
        self.index = index
        self.device = "cpu"
        if faiss_use_gpu(device, faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0):
            try:
                self.index = faiss.index_cpu_to_all_gpus(index)
                self.device = "cuda"
            except (RuntimeError, AttributeError) as e:
                log.warning("could not move the FAISS index to the GPU (%s); searching on the CPU", e)

    @classmethod
    def load(cls, path: Path, device: Device = Device.auto) -> LoadedIndex:
        return cls(faiss.read_index(str(path)), device)

    @property
    def ntotal(self) -> int:
        return self.cpu_index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, dim) -> scores (Q, k') and ids (Q, k'), k' = min(k, ntotal), best first."""
        k = min(k, self.ntotal)
        index = self.index if (self.device == "cpu" or k <= GPU_MAX_K) else self.cpu_index
        scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, ids
