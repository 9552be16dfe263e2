"""The index-update benchmark on a small synthetic db: every one-image change is written as a delta, compaction folds
them, the index it leaves answers as brute force over the store's vectors does, and the cold query and delta cost
are measured on real processes and real indexes."""

import numpy as np

from simsearch.benchmarks.index_update import DELTA_SIZES, IndexUpdateConfig, render, run
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import open_index


def test_each_change_is_a_delta_and_the_index_stays_exact(tmp_path):
    result = run(IndexUpdateConfig(count=2_000, dim=16, work_dir=tmp_path))
    rows = result["rows"]
    assert rows["build"]["outcome"] == "built" and rows["build"]["kind"] == "flat"
    assert rows["add one"]["outcome"] == "updated: 1 added or changed, 0 removed"
    assert rows["change one"]["outcome"] == "updated: 1 added or changed, 0 removed"
    assert rows["remove one"]["outcome"] == "updated: 0 added or changed, 1 removed"
    assert [rows[s]["deltas"] for s in ("add one", "change one", "remove one")] == [1, 2, 3]
    assert rows["add one"]["written_bytes"] == 32 + 8 + 8 + 4 * 16  # header, replaced id, id, vector
    assert rows["remove one"]["written_bytes"] == 32 + 8
    assert rows["compact"]["outcome"] == "compacted: deltas folded into the base"
    for name in ("db", "demo"):
        cold = result["cold"][name]
        assert cold["found_itself"] and cold["peak_rss_bytes"] > 0 and cold["process_s"] > cold["open_s"] > 0
    assert result["cold"]["db"]["ntotal"] == 2_001 and result["cold"]["demo"]["ntotal"] == 1_000
    assert set(result["delta_ms"]) == {"base_ms", *DELTA_SIZES} and all(v > 0 for v in result["delta_ms"].values())
    assert len(render(result)) == 3
    with Store(tmp_path / "db-2000x16", readonly=True) as store:
        ids, vectors = zip(*store.iter_vector_blocks("synthetic@16", 16))
        ids, vectors = np.concatenate(ids), np.concatenate(vectors)
        assert len(ids) == 2_000 + 1 - 1 + 1  # added, changed in place, removed, and one more added after compaction
        index, _ = open_index(store, "synthetic")
        scores, got = index.search(vectors[:5], 3)
        exact = -np.sort(-(vectors[:5] @ vectors.T), axis=1)[:, :3]
        np.testing.assert_allclose(scores, exact, atol=1e-5)  # ids may tie: the added vector went in twice
        row_of = {int(i): r for r, i in enumerate(ids)}
        returned = np.array([[vectors[row_of[int(i)]] @ q for i in row] for q, row in zip(vectors[:5], got)])
        np.testing.assert_allclose(returned, exact, atol=1e-5)  # each returned id's stored vector scores as listed
        index.close()
