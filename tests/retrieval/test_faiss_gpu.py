"""FAISS on the GPU: the CPU fallback (runs everywhere), and GPU-vs-CPU agreement per index kind
(`-m gpu`, on a machine with a CUDA GPU and the [gpu] extra installed)."""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest

from simsearch.devices import Device
from simsearch.errors import SimsearchError
from simsearch.retrieval.faiss_gpu import GPU_MAX_K, GPU_MAX_NPROBE, _gpu_problem, gpu_can_search, num_gpus, to_gpu

DIM = 64
FACTORIES = {  # as index_plan.IndexPlan.factory writes them
    "flat": "IDMap,Flat",
    "ivf": "IVF128,Flat",
    "ivf-hnsw": "IVF128_HNSW32,Flat",  # the coarse quantiser of collections over 2M vectors
    "sq8": "IVF128,SQ8",
    "ivfpq": "OPQ16_64,IVF128,PQ16",
    "hnsw": "IDMap,HNSW32",
}
no_gpu = pytest.mark.skipif(num_gpus() > 0, reason="checks the CPU fallback; this machine has a GPU")
needs_gpu = pytest.mark.skipif(num_gpus() == 0, reason="no GPU visible to FAISS (faiss-cpu, or no device)")


def normalised(n, seed):
    x = np.random.default_rng(seed).standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def empty_index(name):
    return faiss.index_factory(DIM, FACTORIES[name], faiss.METRIC_INNER_PRODUCT)


def test_gpu_can_search_boundaries():
    assert gpu_can_search(1) and gpu_can_search(10, 0)
    assert gpu_can_search(GPU_MAX_K, GPU_MAX_NPROBE)
    assert not gpu_can_search(GPU_MAX_K + 1, 1)
    assert not gpu_can_search(10, GPU_MAX_NPROBE + 1)
    assert not gpu_can_search(0, 1)
    assert GPU_MAX_K == GPU_MAX_NPROBE == 2048


@no_gpu
@pytest.mark.parametrize("name", list(FACTORIES))
def test_to_gpu_without_a_gpu_is_none_with_one_warning(name, caplog):
    kind = name.split("-")[0]
    with caplog.at_level(logging.WARNING):
        assert to_gpu(empty_index(name), kind) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "on the CPU" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()


@no_gpu
def test_to_gpu_quiet_when_not_asked_for(caplog):
    """auto without a GPU and cpu: None, nothing to warn about."""
    with caplog.at_level(logging.WARNING):
        assert to_gpu(empty_index("flat"), "flat", Device.auto) is None
        assert to_gpu(empty_index("ivf"), "ivf", Device.cpu) is None
    assert not caplog.records


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(SimsearchError, match="flat, ivf, sq8, ivfpq, hnsw"):
        to_gpu(empty_index("flat"), "lsh")


def test_settings_the_gpu_refuses_are_named_up_front():
    assert _gpu_problem(empty_index("flat")) is None
    assert _gpu_problem(empty_index("ivfpq")) is None
    ivf = empty_index("ivf")
    ivf.nprobe = GPU_MAX_NPROBE
    assert _gpu_problem(ivf) is None
    ivf.nprobe = GPU_MAX_NPROBE + 1
    assert "nprobe 2049" in _gpu_problem(ivf)
    assert "bytes per code" in _gpu_problem(faiss.index_factory(40, "IVF16,PQ5", faiss.METRIC_INNER_PRODUCT))
    assert "4-bit" in _gpu_problem(faiss.index_factory(DIM, "IVF16,PQ16x4", faiss.METRIC_INNER_PRODUCT))


# ---- on a GPU ----------------------------------------------------------------------------------

N, NQ, K, NPROBE = 20_000, 200, 10, 16


@pytest.fixture(scope="module")
def data():
    return normalised(N, 0), np.arange(N, dtype=np.int64) * 7 + 3, normalised(NQ, 1)  # ids are not positions


def built(name, data):
    vecs, ids, _ = data
    index = empty_index(name)
    if name == "ivfpq":  # training quality is not what is tested here: keep it to seconds
        faiss.downcast_VectorTransform(index.chain.at(0)).niter = 5  # OPQ: 50 by default
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False  # unused by search
    if not index.is_trained:
        index.train(vecs[:10_000])  # 39 per IVF list, 39 * 256 per PQ codebook
    index.add_with_ids(vecs, ids)
    if faiss.try_extract_index_ivf(index) is not None:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", NPROBE)
        if "HNSW" in FACTORIES[name]:
            faiss.ParameterSpace().set_index_parameter(index, "quantizer_efSearch", 64)
    return index


def overlap(a, b):
    """Mean share of each row of a found in the same row of b (recall of a against b)."""
    return np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)])


def rescored(index, queries, vecs, k):
    """ivfpq as the product searches it: 4k candidates re-scored exactly, the best k kept."""
    _, cand = index.search(queries, 4 * k)
    exact = np.einsum("qcd,qd->qc", vecs[(cand - 3) // 7], queries)  # (Q, 4k); id = 7 * position + 3
    return np.take_along_axis(cand, np.argsort(-exact, axis=1)[:, :k], axis=1)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", ["flat", "ivf", "ivf-hnsw", "sq8", "ivfpq"])
def test_gpu_results_match_the_cpu_index(name, data):
    vecs, ids, queries = data
    cpu = built(name, data)
    gpu = to_gpu(cpu, name.split("-")[0])
    assert gpu is not None
    assert gpu.ntotal == N
    if name == "ivfpq":  # float16 lookup tables: compare what the caller ranks after re-scoring
        got, want = rescored(gpu, queries, vecs, K), rescored(cpu, queries, vecs, K)
    else:
        gpu_scores, got = gpu.search(queries, K)
        cpu_scores, want = cpu.search(queries, K)
        # flat is stored as float16 on the GPU: scores agree to ~1e-3
        np.testing.assert_allclose(gpu_scores, cpu_scores, atol=2e-3 if name == "flat" else 1e-4)
    assert np.isin(got, ids).all()
    assert overlap(got, want) >= 0.99


@pytest.mark.gpu
@needs_gpu
def test_k_above_the_gpu_limit_goes_to_the_cpu_copy(data):
    vecs, ids, queries = data
    cpu = built("flat", data)
    gpu = to_gpu(cpu, "flat")
    k = GPU_MAX_K + 500
    with pytest.raises(RuntimeError):  # the limit is real: the GPU index refuses it
        gpu.search(queries[:5], k)
    index = gpu if gpu_can_search(k) else cpu
    assert index is cpu
    scores, got = index.search(queries[:5], k)
    brute = queries[:5] @ vecs.T
    order = np.argsort(-brute, axis=1)[:, :k]
    # 2.5k deep, neighbouring scores differ by ~3e-5: float rounding may swap a few, never the scores
    np.testing.assert_allclose(scores, np.take_along_axis(brute, order, 1), atol=1e-5)
    assert overlap(got, ids[order]) >= 0.999
    assert gpu_can_search(K, NPROBE) and overlap(gpu.search(queries[:5], K)[1], got[:, :K]) >= 0.99


@pytest.mark.gpu
@needs_gpu
def test_refused_on_a_gpu_with_one_warning(caplog):
    ivf = empty_index("ivf")
    ivf.nprobe = GPU_MAX_NPROBE * 2
    with caplog.at_level(logging.WARNING):
        assert to_gpu(empty_index("hnsw"), "hnsw") is None
        assert to_gpu(ivf, "ivf") is None
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 2
    assert "no GPU implementation of hnsw" in messages[0] and "nprobe 4096" in messages[1]


@pytest.mark.gpu
@pytest.mark.skipif(num_gpus() < 2, reason="sharding needs two GPUs or more")
@pytest.mark.parametrize("name", ["flat", "ivf-hnsw"])
def test_sharded_across_gpus_matches_the_cpu_index(name, data):
    _, _, queries = data
    cpu = built(name, data)
    gpu = to_gpu(cpu, name.split("-")[0], shard=True)
    assert gpu is not None and gpu.ntotal == N
    assert overlap(gpu.search(queries, K)[1], cpu.search(queries, K)[1]) >= 0.99
