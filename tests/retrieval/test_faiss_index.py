import numpy as np
import pytest

from simsearch.errors import SimsearchError
from simsearch.retrieval.faiss_index import IndexConfig, LoadedIndex, build_index, index_kind, save_index


def clustered(n, dim, centers, seed=0):
    """L2-normalised vectors around `centers` random directions: structure like real embeddings."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim), dtype=np.float32)
    x = c[rng.integers(0, centers, n)] + 0.6 * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def blocks_of(vecs, ids, size=700):
    return lambda: ((ids[i:i + size], vecs[i:i + size]) for i in range(0, len(vecs), size))


def test_flat_equals_brute_force_with_item_ids():
    vecs = clustered(2000, 32, 20)
    ids = np.arange(2000, dtype=np.int64) * 7 + 3  # store ids are not positions
    index = LoadedIndex(build_index(blocks_of(vecs, ids), 32, len(vecs), IndexConfig(kind="flat")))
    q = vecs[:50] + 0.01
    scores, got = index.search(q, 10)
    brute = q @ vecs.T
    order = np.argsort(-brute, axis=1)[:, :10]
    np.testing.assert_array_equal(got, ids[order])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, order, 1), rtol=1e-5, atol=1e-5)
    assert index_kind(index.cpu_index) == "flat"


def test_auto_switches_to_ivf_with_high_recall(tmp_path):
    vecs = clustered(20_000, 64, 200)
    ids = np.arange(len(vecs), dtype=np.int64)
    config = IndexConfig(flat_max=10_000)
    assert config.resolve(10_000) == "flat" and config.resolve(10_001) == "ivf"
    built = build_index(blocks_of(vecs, ids, 4096), 64, len(vecs), config)
    kind = index_kind(built)
    assert kind == "ivf512,nprobe16"  # 4*sqrt(n) = 565, capped at n / 39 points per centroid
    save_index(built, tmp_path / "x.faiss")
    index = LoadedIndex.load(tmp_path / "x.faiss")  # nprobe survives the round trip
    assert index_kind(index.cpu_index) == kind and index.ntotal == len(vecs)
    q = clustered(200, 64, 200, seed=1)
    _, got = index.search(q, 10)
    exact = np.argsort(-(q @ vecs.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)])
    assert recall > 0.9


def test_unknown_kind_is_an_error():
    with pytest.raises(SimsearchError, match="available: auto, flat, ivf"):
        IndexConfig(kind="hnsw").resolve(10)
