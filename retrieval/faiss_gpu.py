"""Move a built FAISS index to the GPU(s), or say in one logged line why it stays on the CPU.

The caller keeps the CPU index and searches it whenever the GPU copy cannot: `to_gpu` returns None
(no GPU, a CPU-only faiss build, a kind FAISS's GPU code lacks, a parameter beyond its limits, any
FAISS error while copying), and `gpu_can_search` tells per search whether k and nprobe fit the GPU's
k-selection (FAISS: GPU_MAX_SELECTION_K = 2048 for both). One code path: the GPU index answers the
same `search(queries, k)` as the CPU one, with the same ids.

What each kind becomes (FAISS's GpuCloner, faiss/gpu/GpuCloner.cpp):
  flat   IDMap,Flat            -> IDMap over GpuIndexFlat, stored as float16 (useFloat16): half the GPU
                                  memory, and the scan is a float16 GEMM (tensor cores from Volta on)
  ivf    IVFn[_HNSW32],Flat    -> GpuIndexIVFFlat; lists stay float32 (FAISS 1.15: useFloat16 does not
                                  change IVF-Flat storage). An HNSW coarse quantiser has no GPU version:
                                  it stays on the CPU (allowCpuCoarseQuantizer), the lists are scanned on the GPU
  sq8    IVFn[_HNSW32],SQ8     -> GpuIndexIVFScalarQuantizer (8-bit codes, as on the CPU)
  ivfpq  OPQm_d,IVFn,PQm       -> OPQ rotation on the CPU, GpuIndexIVFPQ with float16 lookup tables
                                  (useFloat16: half the shared memory, needed for M >= 56)
  hnsw   IDMap,HNSW32          -> stays on the CPU: FAISS has no GPU HNSW. The GPU graph index is
                                  CAGRA (GpuIndexCagra, converted from IndexHNSWCagra), only in cuVS
                                  builds (faiss-gpu-cuvs, CUDA 13); not used here.
"""

from __future__ import annotations

import logging

import faiss

from simsearch.devices import Device, faiss_use_gpu
from simsearch.errors import SimsearchError

log = logging.getLogger(__name__)

GPU_KINDS = ("flat", "ivf", "sq8", "ivfpq")
CPU_ONLY_KINDS = ("hnsw",)
# FAISS GPU k-selection (GPU_MAX_SELECTION_K, faiss/gpu/utils/DeviceDefs.cuh) bounds both k and nprobe;
# a GPU index raises above them, so such searches go to the CPU copy.
GPU_MAX_K = 2048
GPU_MAX_NPROBE = 2048
# Bytes per PQ code GpuIndexIVFPQ supports (IVFPQ::isSupportedPQCodeLength); 56, 64 and 96 only with
# float16 lookup tables, which to_gpu always sets. nbits must be 8 (non-interleaved layout).
GPU_PQ_CODE_BYTES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)


def gpu_can_search(k: int, nprobe: int = 0) -> bool:
    """Whether a search for k neighbours scanning nprobe lists (0 for flat) can run on the GPU."""
    return 0 < k <= GPU_MAX_K and 0 <= nprobe <= GPU_MAX_NPROBE


def num_gpus() -> int:
    """GPUs FAISS sees: 0 with a CPU-only faiss build (faiss-cpu) or no CUDA device."""
    if not hasattr(faiss, "GpuMultipleClonerOptions"):  # faiss-cpu: no GPU classes compiled in
        return 0
    return faiss.get_num_gpus()


def to_gpu(index: faiss.Index, kind: str, device: Device = Device.cuda, shard: bool = False) -> faiss.Index | None:
    """A GPU copy of the CPU `index` on all GPUs FAISS sees, or None (logged) when it cannot be made.

    kind: what the index is ("flat", "ivf", "sq8", "ivfpq", "hnsw"; see the module docstring).
    device: Device.cuda (the default: the caller asks for the GPU, so a missing one is warned about),
    Device.auto (quietly None without a GPU), Device.cpu (always None); decided by devices.faiss_use_gpu.
    shard: with several GPUs, split the vectors across them (for an index larger than one GPU's memory)
    instead of copying the whole index to each (the default: each query batch is split across the
    replicas, so throughput grows with the GPUs).
    Search parameters (nprobe, the HNSW quantiser's efSearch) are copied as they are set on `index`.
    """
    if kind not in GPU_KINDS + CPU_ONLY_KINDS:
        raise SimsearchError(f"unknown index kind {kind!r} (available: {', '.join(GPU_KINDS + CPU_ONLY_KINDS)})")
    if not faiss_use_gpu(device, num_gpus()):  # warns itself when the GPU was asked for (Device.cuda)
        return None
    if kind in CPU_ONLY_KINDS:
        log.warning("FAISS has no GPU implementation of %s indexes; searching on the CPU", kind)
        return None
    problem = _gpu_problem(index)
    if problem:
        log.warning("cannot move the %s index to the GPU (%s); searching on the CPU", kind, problem)
        return None
    co = _cloner_options(index, kind, shard)
    gpus = list(range(num_gpus()))
    resources = [faiss.StandardGpuResources() for _ in gpus]
    try:
        gpu_index = faiss.index_cpu_to_gpu_multiple_py(resources, index, co, gpus)
    except RuntimeError as e:  # FAISS's C++ exceptions (out of GPU memory, unsupported settings)
        log.warning("cannot move the %s index to the GPU (%s); searching on the CPU", kind,
                    str(e).strip().splitlines()[-1][:200])
        return None
    # The GPU index holds its resources through shared pointers; keeping the Python handles too costs nothing.
    gpu_index.referenced_objects = resources
    log.info("%s index (%d vectors) on %d GPU(s)%s", kind, index.ntotal, len(gpus),
             (" sharded" if shard else " replicated") if len(gpus) > 1 else "")
    return gpu_index


def _gpu_problem(index: faiss.Index) -> str | None:
    """Why FAISS's GPU code would refuse this index (checked up front for a clear message), or None."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    if ivf.nprobe > GPU_MAX_NPROBE:
        return f"nprobe {ivf.nprobe} > {GPU_MAX_NPROBE}, the GPU maximum"
    ivf = faiss.downcast_index(ivf)
    if isinstance(ivf, faiss.IndexIVFPQ):
        if ivf.pq.nbits != 8:
            return f"PQ with {ivf.pq.nbits}-bit codes (the GPU needs 8)"
        if ivf.pq.M not in GPU_PQ_CODE_BYTES:
            return f"PQ with {ivf.pq.M} bytes per code (the GPU supports {', '.join(map(str, GPU_PQ_CODE_BYTES))})"
    return None


def _cloner_options(index: faiss.Index, kind: str, shard: bool) -> faiss.GpuMultipleClonerOptions:
    co = faiss.GpuMultipleClonerOptions()
    # flat: float16 storage (half the memory, faster GEMM; normalised vectors lose ~1e-3 per score).
    # ivfpq: float16 lookup tables. IVF-Flat and SQ8 storage ignore it.
    co.useFloat16 = kind in ("flat", "ivfpq")
    # Precomputed tables only help IVFPQ under L2; FAISS skips them (with a stderr note) for inner product.
    co.usePrecomputed = kind == "ivfpq" and index.metric_type == faiss.METRIC_L2
    # Store ids are arbitrary int64: keep them 64-bit on the GPU (INDICES_32_BIT would save 4 bytes a
    # vector but needs ids < 2**31; INDICES_CPU keeps them in RAM and translates each result there).
    co.indicesOptions = faiss.INDICES_64_BIT
    # An HNSW coarse quantiser (IVFn_HNSW32 above 2M vectors) has no GPU version: let it stay on the CPU.
    co.allowCpuCoarseQuantizer = True
    co.shard = shard
    # Sharded IVF: one coarse quantiser for all shards (flattened onto the GPU if it was HNSW), only the
    # inverted lists split, so each query is assigned to lists once instead of once per GPU.
    co.common_ivf_quantizer = shard and kind in ("ivf", "sq8", "ivfpq")
    return co
