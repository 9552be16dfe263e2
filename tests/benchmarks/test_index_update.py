"""The index-update benchmark on a small synthetic db: every step updates the index in place, and the index it
leaves answers as brute force over the store's vectors does."""

import numpy as np

from simsearch.benchmarks.index_update import measure
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import open_index


def test_each_change_is_an_update_in_place_and_the_index_stays_exact(tmp_path):
    root = tmp_path / "db"
    rows = measure(root, 2_000, 16)
    assert rows["build"]["outcome"] == "built" and rows["build"]["kind"] == "flat"
    # Each step changes the store twice (once for the stage timings, once for the timed end-to-end refresh).
    assert rows["add one"]["outcome"] == "updated: 2 added or changed, 0 removed"
    assert rows["change one"]["outcome"] == "updated: 2 added or changed, 0 removed"
    assert rows["remove one"]["outcome"] == "updated: 0 added or changed, 2 removed"
    with Store(root, readonly=True) as store:
        ids, vectors = zip(*store.iter_vector_blocks("synthetic@16", 16))
        ids, vectors = np.concatenate(ids), np.concatenate(vectors)
        assert len(ids) == 2_000 + 2 - 2  # two added, two replaced in place, two removed
        index, _ = open_index(store, "synthetic")
        scores, got = index.search(vectors[:5], 3)
        exact = -np.sort(-(vectors[:5] @ vectors.T), axis=1)[:, :3]
        np.testing.assert_allclose(scores, exact, atol=1e-5)  # ids may tie: the added item went in twice
        row_of = {int(i): r for r, i in enumerate(ids)}
        returned = np.array([[vectors[row_of[int(i)]] @ q for i in row] for q, row in zip(vectors[:5], got)])
        np.testing.assert_allclose(returned, exact, atol=1e-5)  # each returned id's stored vector scores as listed
        index.close()
