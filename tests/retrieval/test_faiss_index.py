import numpy as np
import pytest

from simsearch.errors import DbCorruptError, SimsearchError
from simsearch.indexer.store import Store
from simsearch.retrieval.faiss_index import (
    IndexConfig,
    LoadedIndex,
    build_index,
    index_kind,
    index_problem,
    load_index,
    publish_index,
    refresh_index,
)


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
    with Store(tmp_path, create=True) as store:
        store.register_encoder("x", "x@1", 64, "crop")
        publish_index(store, "x", built, store.generation)
        index, _ = load_index(store, "x")  # nprobe survives the round trip
    assert index_kind(index.cpu_index) == kind and index.ntotal == len(vecs)
    q = clustered(200, 64, 200, seed=1)
    _, got = index.search(q, 10)
    exact = np.argsort(-(q @ vecs.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)])
    assert recall > 0.9


def test_unknown_kind_is_an_error():
    with pytest.raises(SimsearchError, match="available: auto, flat, ivf"):
        IndexConfig(kind="hnsw").resolve(10)


def _store_with_vectors(root, n=50, dim=8):
    vecs = clustered(n, dim, 5)
    store = Store(root, create=True)
    store.register_encoder("x", "x@1", dim, "crop")
    store.put_items("x@1", [(f"/img/{i}.jpg", f"h{i}", 1, 1, v) for i, v in enumerate(vecs)])
    return store, vecs


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_index_file_is_named_and_rebuilt_without_embedding(tmp_path, damage):
    store, vecs = _store_with_vectors(tmp_path)
    with store:
        assert refresh_index(store, "x") and not refresh_index(store, "x")  # second call: up to date
        entry = store.manifest.encoders["x"]
        path = store.index_file(entry)
        data = bytearray(path.read_bytes())
        if damage == "truncate":
            path.write_bytes(data[: len(data) // 2])
        elif damage == "flip":
            data[-7] ^= 0x10
            path.write_bytes(data)
        else:
            path.unlink()
        assert index_problem(store, "x", entry) is not None
        with pytest.raises(DbCorruptError, match="check --repair") as e:
            load_index(store, "x")
        assert str(path) in str(e.value)
        generation = store.generation
        assert refresh_index(store, "x")  # rebuilt from the stored vectors
        assert store.generation == generation  # nothing was written to the store
        index, _ = load_index(store, "x")
        _, ids = index.search(vecs[:5], 1)
        assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_publish_replaces_the_old_file_and_readers_follow(tmp_path):
    store, vecs = _store_with_vectors(tmp_path)
    with store:
        refresh_index(store, "x")
        old = store.manifest.encoders["x"].index_file
        before, _ = load_index(store, "x")
        store.remove_items(["/img/0.jpg"])
        assert store.paths_of([0]) == ["/img/0.jpg"]  # the published index still returns id 0: resolvable
        refresh_index(store, "x")
        new = store.manifest.encoders["x"].index_file
        assert new != old and sorted(p.name for p in store.index_dir().iterdir()) == [new]
        assert store.paths_of([0]) == [None]  # every published index is newer than the removal
        after, entry = load_index(store, "x")  # re-reads the manifest: follows the new build
        assert (before.ntotal, after.ntotal, entry.index_file) == (50, 49, new)
