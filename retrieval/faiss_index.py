"""Build, save, load and search the FAISS index of one encoder in a db.

Ids in the index are the store's item ids (IndexIDMap2), so a removed item is simply not in the
next build and a hit maps back to its path through the store. The index kind is chosen by
`IndexConfig`; only exact inner product ("flat") exists today, and the interface is the one an
IVF/HNSW/PQ choice by collection size will plug into.
"""

from __future__ import annotations

import logging
import os
import tempfile
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
    kind: str = "flat"  # exact inner product; vectors are L2-normalised, so this is cosine


def build_index(blocks, dim: int, config: IndexConfig = IndexConfig()) -> faiss.Index:
    """blocks: iterable of (ids (n,) int64, vectors (n, dim) float32)."""
    if config.kind != "flat":
        raise SimsearchError(f"unknown index kind {config.kind!r} (available: flat)")
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    for ids, vecs in blocks:
        index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), ids)
    return index


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
