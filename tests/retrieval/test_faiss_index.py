import numpy as np
import pytest

from simsearch.errors import DbCorruptError
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import RefreshConfig, RefreshOutcome, get_backend
from simsearch.retrieval.faiss_index import FaissState, LoadedIndex, build_index, load_index
from simsearch.retrieval.index_plan import FLAT_MAX, HNSW_AUTO_DIM, IndexConfig


def refresh_index(store, name, config=IndexConfig(), verify=False) -> RefreshOutcome:
    return get_backend("faiss").refresh(store, name, RefreshConfig(config, verify=verify))


def state(store, name="x") -> FaissState:
    return FaissState.of(store.manifest.encoders[name], name)


def clustered(n, dim, centers, seed=0, spread=0.6):
    """L2-normalised vectors around `centers` random directions: structure like real embeddings.
    The same seed gives the same centres, so `clustered(n + q)[n:]` are held-out queries."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim), dtype=np.float32)
    x = c[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def blocks_of(vecs, ids, size=700):
    return lambda: ((ids[i:i + size], vecs[i:i + size]) for i in range(0, len(vecs), size))


def recall_at_10(got_ids, queries, vecs, ids):
    exact = ids[np.argsort(-(queries @ vecs.T), axis=1)[:, :10]]
    return np.mean([len(set(a) & set(e)) / 10 for a, e in zip(got_ids, exact)])


def test_flat_equals_brute_force_with_item_ids():
    vecs = clustered(2000, 32, 20)
    ids = np.arange(2000, dtype=np.int64) * 7 + 3  # store ids are not positions
    built = build_index(blocks_of(vecs, ids), 32, len(vecs), IndexConfig(kind="flat"))
    index = LoadedIndex(built.index)
    q = vecs[:50] + 0.01
    scores, got = index.search(q, 10)
    brute = q @ vecs.T
    order = np.argsort(-brute, axis=1)[:, :10]
    np.testing.assert_array_equal(got, ids[order])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, order, 1), rtol=1e-5, atol=1e-5)
    assert (built.plan.kind, built.params, built.recall) == ("flat", {}, 1.0)


@pytest.mark.parametrize("kind", ["ivf", "sq8", "ivfpq", "hnsw"])
def test_each_kind_is_tuned_to_the_recall_target_and_holds_it_on_held_out_queries(kind):
    everything = clustered(12_300, 32, 120, spread=0.9)
    vecs, queries = everything[:12_000], everything[12_000:]
    ids = np.arange(len(vecs), dtype=np.int64) * 3 + 1
    fetch = lambda i: vecs[(i - 1) // 3]  # noqa: E731  exact vectors by id, for sq8's and ivfpq's re-scoring
    built = build_index(blocks_of(vecs, ids, 4096), 32, len(vecs), IndexConfig(kind=kind, recall=0.95), fetch)
    assert built.plan.kind == kind and built.recall >= 0.95
    name = "efSearch" if kind == "hnsw" else "nprobe"
    assert set(built.params) == {name} and built.params[name] >= 1
    index = LoadedIndex(built.index, params=built.params, fetch=fetch)  # used by the compressed kinds only
    scores, got = index.search(queries, 10)
    assert recall_at_10(got, queries, vecs, ids) >= 0.9  # tuned on the collection, checked on new queries
    # exact inner products for every kind: sq8 and ivfpq re-score their candidates from the exact vectors
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", fetch(got), queries), rtol=1e-5, atol=1e-5)


def test_a_lower_recall_target_gives_cheaper_parameters():
    vecs = clustered(20_000, 32, 400, spread=1.0)
    ids = np.arange(len(vecs), dtype=np.int64)
    low, high = (build_index(blocks_of(vecs, ids, 4096), 32, len(vecs), IndexConfig(kind="ivf", recall=r)) for r in (0.5, 0.99))
    assert low.params["nprobe"] < high.params["nprobe"] and low.recall >= 0.5 and high.recall >= 0.99


def _store_of(root, vecs, start=0):
    store = Store(root, create=True)
    store.register_encoder("x", "x@1", vecs.shape[1], "crop")
    _put(store, vecs, start)
    return store


def _put(store, vecs, start=0):
    store.put_items("x@1", [(f"/img/{start + i}.jpg", f"h{start + i}", 1, 1, v) for i, v in enumerate(vecs)])


def _live(store):
    return np.sort(np.concatenate([ids for ids, _ in store.iter_vector_blocks("x@1", store.manifest.encoders["x"].dim)]))


@pytest.mark.parametrize("kind", ["auto", "hnsw"])
def test_added_changed_and_removed_items_update_the_index_in_place(tmp_path, kind):
    vecs = clustered(FLAT_MAX + 610, 16, 50)  # the last 10: the new content of 10 changed items
    config = IndexConfig(kind=kind)
    with _store_of(tmp_path, vecs[:FLAT_MAX + 500]) as store:
        built = refresh_index(store, "x", config)
        assert (built.action, built.count, built.added) == ("built", FLAT_MAX + 500, FLAT_MAX + 500)
        assert refresh_index(store, "x", config).action == "unchanged"
        s = state(store)
        assert s.kind == ("ivf" if kind == "auto" else "hnsw") and s.recall >= 0.95
        assert s.trained_count == FLAT_MAX + 500 and s.recall_target == 0.95
        _put(store, vecs[FLAT_MAX + 500:FLAT_MAX + 600], FLAT_MAX + 500)  # 100 new
        moved = vecs[FLAT_MAX + 600:]  # 10 changed: new content (from the same distribution), same path, same id
        store.put_items("x@1", [(f"/img/{i}.jpg", f"new{i}", 2, 2, v) for i, v in enumerate(moved)])
        store.remove_items([f"/img/{i}.jpg" for i in range(20, 70)])  # 50 removed
        outcome = refresh_index(store, "x", config)
        assert (outcome.action, outcome.added, outcome.removed, outcome.count) == ("updated", 110, 50, FLAT_MAX + 550)
        assert str(outcome) == "updated: 110 added or changed, 50 removed"
        index, entry = load_index(store, "x")
        assert np.array_equal(index.live_ids(), _live(store)) and state(store).count == FLAT_MAX + 550
        assert index.ntotal == FLAT_MAX + 550
        _, top = index.search(moved, 1)  # a changed item is found by its new vector
        assert top[:, 0].tolist() == list(range(10))
        _, got = index.search(vecs[20:70], 10)
        assert not np.isin(got, np.arange(20, 70)).any()  # removed items are never returned
        assert store.paths_of([20]) == [None]  # their tombstones are gone: no published index holds them


def test_auto_gives_wide_vectors_a_graph_whose_removed_items_are_tombstones(tmp_path):
    """HNSW_AUTO_DIM-wide vectors past the exact-search limit: auto builds HNSW (index_plan), tuned to recall 0.95;
    a removal is a tombstone (updated, not rebuilt), and answers match brute force over the live vectors."""
    n, dim = FLAT_MAX + 1000, HNSW_AUTO_DIM
    everything = clustered(n + 200, dim, 200, spread=1.2)
    vecs, queries = everything[:n], everything[n:]
    with _store_of(tmp_path, vecs) as store:
        refresh_index(store, "x")
        assert state(store).kind == "hnsw" and state(store).recall >= 0.95
        gone = np.arange(0, n, 20)  # every 20th item removed: 5%, under the rebuild threshold of 10%
        store.remove_items([f"/img/{i}.jpg" for i in gone])
        assert refresh_index(store, "x").action == "updated"
        index, _ = load_index(store, "x")
        live = np.setdiff1d(np.arange(n), gone)
        assert np.array_equal(index.live_ids(), live) and index.ntotal == len(live)
        _, got = index.search(queries, 10)
        assert not np.isin(got, gone).any()
        assert recall_at_10(got, queries, vecs[live], live) >= 0.9


def test_hnsw_is_rebuilt_once_a_tenth_of_its_nodes_are_removed(tmp_path):
    vecs = clustered(2000, 16, 20)
    with _store_of(tmp_path, vecs) as store:
        refresh_index(store, "x", IndexConfig(kind="hnsw"))
        store.remove_items([f"/img/{i}.jpg" for i in range(150)])
        assert refresh_index(store, "x", IndexConfig(kind="hnsw")).action == "updated"  # 7.5% marked
        store.remove_items([f"/img/{i}.jpg" for i in range(150, 250)])
        assert "HNSW graph are removed items" in refresh_index(store, "x", IndexConfig(kind="hnsw")).reason
        index, _ = load_index(store, "x")
        assert index.marked == 0 and index.ntotal == 1750


def test_growing_past_the_flat_limit_or_twice_the_training_set_rebuilds(tmp_path):
    vecs = clustered(2 * FLAT_MAX + 2200, 8, 40)
    with _store_of(tmp_path, vecs[:FLAT_MAX]) as store:
        refresh_index(store, "x")
        assert state(store).kind == "flat"
        _put(store, vecs[FLAT_MAX:FLAT_MAX + 1000], FLAT_MAX)
        assert str(refresh_index(store, "x")) == f"rebuilt: {FLAT_MAX + 1000} vectors call for ivf, not flat"
        _put(store, vecs[FLAT_MAX + 1000:2 * FLAT_MAX + 2000], FLAT_MAX + 1000)
        assert refresh_index(store, "x").action == "updated"  # exactly 2x what it was trained on: kept
        _put(store, vecs[2 * FLAT_MAX + 2000:], 2 * FLAT_MAX + 2000)
        assert "retraining" in refresh_index(store, "x").reason
        assert state(store).trained_count == 2 * FLAT_MAX + 2200


def test_a_new_recall_target_or_a_pruned_change_log_rebuilds(tmp_path):
    with _store_of(tmp_path, clustered(FLAT_MAX + 100, 8, 30)) as store:
        refresh_index(store, "x")
        assert str(refresh_index(store, "x", IndexConfig(recall=0.99))).startswith("rebuilt: --recall 0.99 asked")
        assert state(store).recall_target == 0.99 and state(store).recall >= 0.99
        status = get_backend("faiss").status(store, "x", store.manifest.encoders["x"])
        assert "recall@10" in status.description and "nprobe" in status.params and status.up_to_date
        assert refresh_index(store, "x").action == "unchanged"  # the db's target is kept when none is asked
        store.remove_items(["/img/0.jpg"])
        store.prune_changes(store.generation)  # as if the log had been lost
        assert str(refresh_index(store, "x")) == "rebuilt: the store's change log does not reach back to this index"


def test_the_change_log_lists_ids_touched_since_a_generation(tmp_path):
    with _store_of(tmp_path, clustered(5, 4, 2)) as store:
        g = store.generation
        assert store.changed_ids(0).tolist() == [0, 1, 2, 3, 4] and store.changed_ids(g).tolist() == []
        store.remove_items(["/img/1.jpg"])
        _put(store, clustered(1, 4, 2, seed=3), start=9)
        assert store.changed_ids(g).tolist() == [1, 5]
        store.prune_changes(g)
        assert store.changed_ids(g - 1) is None and store.changed_ids(g).tolist() == [1, 5]


def _check_errors(store, name="x") -> list[str]:
    """What `check` finds wrong with the index (in this process, where the store is already open)."""
    known = {i for i, _, _ in store.iter_ids()}
    found, _ = get_backend("faiss").check(store, name, store.manifest.encoders[name], known)
    return [f.message for f in found if f.level == "error"]


@pytest.mark.parametrize("segment", ["base", "ids", "delta"])
@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_segment_is_named_and_rebuilt_without_embedding(tmp_path, damage, segment):
    """A truncated or deleted file is seen by every open (its size is checked); a flipped bit by `check`,
    `info` and `check --repair` (sha256), and on open for the deltas, which are read whole."""
    vecs = clustered(50, 8, 5)
    store = _store_of(tmp_path, vecs)
    with store:
        assert refresh_index(store, "x").changed and not refresh_index(store, "x").changed  # second: up to date
        store.remove_items(["/img/49.jpg"])
        assert refresh_index(store, "x").action == "updated" and len(state(store).deltas) == 1
        entry = store.manifest.encoders["x"]
        st = state(store)
        file = {"base": st.file, "ids": st.ids["file"], "delta": st.deltas[0]["file"]}[segment]
        path = store.index_dir() / file
        data = bytearray(path.read_bytes())
        if damage == "truncate":
            path.write_bytes(data[: len(data) // 2])
        elif damage == "flip":
            data[-7] ^= 0x10
            path.write_bytes(data)
        else:
            path.unlink()
        problem = get_backend("faiss").status(store, "x", entry, verify=True).problem
        assert problem is not None and str(path) in problem
        errors = _check_errors(store)
        assert len(errors) == 1 and str(path) in errors[0] and "check --repair" in errors[0]
        if segment == "delta" or (segment == "base" and damage != "flip"):
            with pytest.raises(DbCorruptError, match="check --repair") as e:
                load_index(store, "x")
            assert str(path) in str(e.value)
        generation = store.generation
        outcome = refresh_index(store, "x", verify=damage == "flip")  # `check --repair` verifies every checksum
        assert outcome.action == "rebuilt" and str(path) in outcome.reason  # from the stored vectors
        assert store.generation == generation  # nothing was written to the store
        index, _ = load_index(store, "x")
        _, ids = index.search(vecs[:5], 1)
        assert ids[:, 0].tolist() == [0, 1, 2, 3, 4] and index.ntotal == 49
        assert not _check_errors(store)


def test_publish_replaces_the_old_files_and_readers_follow(tmp_path):
    vecs = clustered(50, 8, 5)
    store = _store_of(tmp_path, vecs)
    with store:
        refresh_index(store, "x")
        old = state(store)
        before, _ = load_index(store, "x")
        store.remove_items(["/img/0.jpg"])
        assert store.paths_of([0]) == ["/img/0.jpg"]  # the published index still returns id 0: resolvable
        refresh_index(store, "x")  # a delta beside the same base
        new = state(store)
        assert new.file == old.file and {p.name for p in store.index_dir().iterdir()} == new.files() != old.files()
        assert store.paths_of([0]) == [None]  # every published index is newer than the removal
        after, entry = load_index(store, "x")  # re-reads the manifest: follows the new state
        assert (before.ntotal, after.ntotal, after.state) == (50, 49, new)
        outcome = get_backend("faiss").refresh(store, "x", RefreshConfig(compact=True))
        assert (str(outcome), outcome.count) == ("compacted: deltas folded into the base", 49)
        compacted = state(store)
        assert compacted.file != old.file and not compacted.deltas
        assert {p.name for p in store.index_dir().iterdir()} == compacted.files()
        # The old base is gone from the folder but still mapped by the reader that opened it: it still answers.
        assert before.search(vecs[:1], 1)[1].tolist() == [[0]]
        assert load_index(store, "x")[0].search(vecs[:1], 1)[1].tolist() != [[0]]
        assert refresh_index(store, "x").action == "unchanged"


def test_a_compressed_index_re_scores_deeper_when_its_codes_cannot_reach_the_target():
    """64-d vectors in 16-byte PQ codes: 40 candidates for 10 results do not hold recall@10 0.99 at any nprobe, so
    the tuning re-scores more of them (the "rescore" parameter, which a loaded index follows)."""
    everything = clustered(20_300, 64, 120, spread=0.9)
    vecs, queries = everything[:20_000], everything[20_000:]
    ids = np.arange(len(vecs), dtype=np.int64)
    fetch = lambda i: vecs[i]  # noqa: E731
    built = build_index(blocks_of(vecs, ids, 4096), 64, len(vecs), IndexConfig(kind="ivfpq", recall=0.99), fetch)
    assert built.params.get("rescore", 4) > 4 and built.recall >= 0.99
    deep = LoadedIndex(built.index, params=built.params, fetch=fetch)
    shallow = LoadedIndex(built.index, params={k: v for k, v in built.params.items() if k != "rescore"}, fetch=fetch)
    got_deep = recall_at_10(deep.search(queries, 10)[1], queries, vecs, ids)
    got_shallow = recall_at_10(shallow.search(queries, 10)[1], queries, vecs, ids)
    assert got_deep >= 0.98 and got_deep > got_shallow, (got_deep, got_shallow)
