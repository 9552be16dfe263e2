"""The manifest's migration ladder: a manifest of every older schema is read as schema 6 and written back as it;
a schema-4 or schema-5 db keeps working (read, query, update in place) with its index file as it is: a base with
no deltas."""

import json

import numpy as np
import pytest

from simsearch.errors import DbCorruptError, EmptyDbError
from simsearch.indexer.manifest import MANIFEST, SCHEMA_VERSION, EncoderEntry, Manifest
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import get_backend, open_index, refresh
from simsearch.retrieval.faiss_index import FaissState
from simsearch.retrieval.milvus_backend import MilvusState

FLAT_STATE = {"kind": "flat", "params": {}, "recall": 1.0, "recall_target": None, "trained_count": 3, "count": 3,
              "file": "lite.4.abcdef012345.faiss", "sha256": "ab" * 32, "bytes": 1234, "ids": None, "deltas": []}
SCHEMA_5 = {k: v for k, v in FLAT_STATE.items() if k not in ("ids", "deltas")}

# What each schema wrote for one encoder (from `git log -p indexer/manifest.py`), and what schema 6 makes of it.
CASES = {
    "1": ({"key": "k", "dim": 4, "metric": "inner_product", "index_type": "flat", "count": 3, "index_generation": 1},
          EncoderEntry("k", 4, "crop", "inner_product", "faiss", 1, {
              "kind": "flat", "params": {}, "recall": None, "recall_target": None, "trained_count": 0, "count": 3,
              "file": "lite.faiss", "sha256": None, "bytes": 0, "ids": None, "deltas": []})),
    "1-never-built": ({"key": "k", "dim": 4, "metric": "inner_product", "index_type": "none", "count": 0,
                       "index_generation": -1},
                      EncoderEntry("k", 4, "crop", "inner_product", "faiss", -1, {})),
    "2": ({"key": "k", "dim": 4, "metric": "inner_product", "index_type": "ivf64,nprobe8", "count": 3,
           "index_generation": 2, "index_file": "lite.2.abcdef012345.faiss", "index_sha256": "ab" * 32,
           "index_bytes": 1234},
          EncoderEntry("k", 4, "crop", "inner_product", "faiss", 2, {
              "kind": "ivf", "params": {"nlist": 64, "nprobe": 8}, "recall": None, "recall_target": None,
              "trained_count": 0, "count": 3, "file": "lite.2.abcdef012345.faiss", "sha256": "ab" * 32,
              "bytes": 1234, "ids": None, "deltas": []})),
    "3": ({"key": "k", "dim": 4, "preprocess": "pad", "metric": "inner_product", "index_type": "flat", "count": 3,
           "index_generation": 3, "index_file": "lite.3.abcdef012345.faiss", "index_sha256": "ab" * 32,
           "index_bytes": 1234},
          EncoderEntry("k", 4, "pad", "inner_product", "faiss", 3, {
              "kind": "flat", "params": {}, "recall": None, "recall_target": None, "trained_count": 0, "count": 3,
              "file": "lite.3.abcdef012345.faiss", "sha256": "ab" * 32, "bytes": 1234, "ids": None, "deltas": []})),
    "4": ({"key": "k", "dim": 4, "preprocess": "resize", "metric": "inner_product", "index_type": "flat",
           "index_params": {}, "recall": 1.0, "recall_target": None, "trained_count": 3, "count": 3,
           "index_generation": 4, "index_file": "lite.4.abcdef012345.faiss", "index_sha256": "ab" * 32,
           "index_bytes": 1234, "backend": "faiss", "backend_uri": None},
          EncoderEntry("k", 4, "resize", "inner_product", "faiss", 4, FLAT_STATE)),
    "4-milvus": ({"key": "k", "dim": 4, "preprocess": "crop", "metric": "inner_product", "index_type": "hnsw",
                  "index_params": {"collection": "simsearch_lite_0123456789ab", "M": 16, "efConstruction": 200,
                                   "ef": 128},
                  "recall": None, "recall_target": None, "trained_count": 0, "count": 3, "index_generation": 4,
                  "index_file": None, "index_sha256": None, "index_bytes": 0, "backend": "milvus",
                  "backend_uri": "milvus.db"},
                 EncoderEntry("k", 4, "crop", "inner_product", "milvus", 4, {
                     "uri": "milvus.db", "collection": "simsearch_lite_0123456789ab",
                     "params": {"M": 16, "efConstruction": 200, "ef": 128}, "count": 3})),
    "4-never-built": ({"key": "k", "dim": 4, "preprocess": "crop", "metric": "inner_product", "index_type": "none",
                       "index_params": {}, "recall": None, "recall_target": None, "trained_count": 0, "count": 0,
                       "index_generation": -1, "index_file": None, "index_sha256": None, "index_bytes": 0,
                       "backend": "faiss", "backend_uri": None},
                      EncoderEntry("k", 4, "crop", "inner_product", "faiss", -1, {})),
    "5": ({"key": "k", "dim": 4, "preprocess": "resize", "metric": "inner_product", "backend": "faiss",
           "index_generation": 4, "index": SCHEMA_5},
          EncoderEntry("k", 4, "resize", "inner_product", "faiss", 4, FLAT_STATE)),
    "5-milvus": ({"key": "k", "dim": 4, "preprocess": "crop", "metric": "inner_product", "backend": "milvus",
                  "index_generation": 4, "index": {"uri": "milvus.db", "collection": "simsearch_lite_0123456789ab",
                                                   "params": {"M": 16}, "count": 3}},
                 EncoderEntry("k", 4, "crop", "inner_product", "milvus", 4, {
                     "uri": "milvus.db", "collection": "simsearch_lite_0123456789ab", "params": {"M": 16},
                     "count": 3})),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_older_schema_is_read_as_6_and_written_back_as_6(tmp_path, case):
    old, want = CASES[case]
    Store(tmp_path, create=True).close()
    version = int(case.split("-")[0])
    (tmp_path / MANIFEST).write_text(json.dumps({"schema_version": version, "default_encoder": "lite",
                                                 "encoders": {"lite": old}}))
    with Store(tmp_path, readonly=True) as s:
        assert s.manifest.schema_version == version and s.manifest.encoders == {"lite": want}
    with Store(tmp_path) as s:  # a writer saves what it read, as the current schema
        s.save_manifest()
    written = json.loads((tmp_path / MANIFEST).read_text())
    assert written["schema_version"] == SCHEMA_VERSION == 6
    assert written["encoders"]["lite"] == {"key": "k", "dim": 4, "preprocess": want.preprocess,
                                           "metric": "inner_product", "backend": want.backend,
                                           "index_generation": want.index_generation, "index": want.index}
    with Store(tmp_path, readonly=True) as s:  # and reads back the same
        assert s.manifest.encoders == {"lite": want}


def test_each_backend_reads_its_own_state_and_refuses_a_bad_one():
    faiss_entry = CASES["4"][1]
    assert FaissState.of(faiss_entry, "lite").file == "lite.4.abcdef012345.faiss"
    assert MilvusState.of(faiss_entry, "lite") is None  # not its backend
    assert MilvusState.of(CASES["4-milvus"][1], "lite").collection == "simsearch_lite_0123456789ab"
    assert FaissState.of(CASES["4-never-built"][1], "lite") is None
    bad = EncoderEntry("k", 4, index_generation=4, index={**FLAT_STATE, "count": "3"})
    with pytest.raises(DbCorruptError, match=r"'encoders.lite.index.count'.*check --repair"):
        FaissState.of(bad, "lite")


def test_the_default_encoder_and_the_empty_db_error():
    assert Manifest(default_encoder="a").encoder_name(None, "db") == "a"
    assert Manifest(default_encoder="a").encoder_name("b", "db") == "b"
    with pytest.raises(EmptyDbError, match="holds no images yet"):
        Manifest().encoder_name(None, "db")


def test_up_to_date_means_published_at_the_store_generation():
    assert EncoderEntry("k", 4, index_generation=7).up_to_date(7)
    assert not EncoderEntry("k", 4, index_generation=6).up_to_date(7)
    assert not EncoderEntry("k", 4).up_to_date(0)  # never published: never up to date, even on an empty store


def _unit(n, seed):
    x = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _old_manifest(version: int, entry: EncoderEntry) -> dict:
    """The manifest schema `version` wrote for this FAISS entry (schema 4's flat fields, or schema 5's `index`)."""
    st = entry.index
    if version == 5:
        fields = {"backend": "faiss", "index_generation": entry.index_generation,
                  "index": {k: v for k, v in st.items() if k not in ("ids", "deltas")}}
    else:
        fields = {"index_type": st["kind"], "index_params": st["params"], "recall": st["recall"],
                  "recall_target": st["recall_target"], "trained_count": st["trained_count"], "count": st["count"],
                  "index_generation": entry.index_generation, "index_file": st["file"], "index_sha256": st["sha256"],
                  "index_bytes": st["bytes"], "backend": "faiss", "backend_uri": None}
    return {"schema_version": version, "default_encoder": "lite", "encoders": {"lite": {
        "key": "k", "dim": 8, "preprocess": "crop", "metric": "inner_product", **fields}}}


@pytest.mark.parametrize("version", [4, 5])
def test_an_older_db_with_its_index_file_is_queried_then_updated_as_segments(tmp_path, version):
    """A db as schema 4 or 5 left it: the manifest in that layout, the single index file as it was written. It opens
    as a base with no deltas; its first update rewrites it with its id list, the next ones write deltas."""
    vecs = _unit(40, 0)
    with Store(tmp_path, create=True) as s:
        s.register_encoder("lite", "k", 8, "crop")
        s.put_items("k", [(f"/p/{i}.jpg", f"h{i}", 1, 1, v) for i, v in enumerate(vecs)])
        refresh(s, "lite")
        entry = s.manifest.encoders["lite"]
        file = entry.index["file"]
    (tmp_path / MANIFEST).write_text(json.dumps(_old_manifest(version, entry)))
    with Store(tmp_path, readonly=True) as s:
        index, entry = open_index(s, "lite")
        assert FaissState.of(entry, "lite").ids is None and FaissState.of(entry, "lite").deltas == []
        scores, ids = index.search(vecs[:5], 3)
        brute = vecs[:5] @ vecs.T  # (5, 40)
        np.testing.assert_array_equal(ids, np.argsort(-brute, axis=1, kind="stable")[:, :3])
        np.testing.assert_allclose(scores, np.sort(brute, axis=1)[:, ::-1][:, :3], atol=1e-5)
        assert get_backend("faiss").status(s, "lite", entry, verify=True).problem is None
    with Store(tmp_path) as s:
        assert refresh(s, "lite").action == "unchanged"  # nothing changed since it was built: kept as it is
        assert (tmp_path / "index" / file).is_file()
        s.remove_items(["/p/0.jpg"])
        outcome = refresh(s, "lite")
        assert (outcome.action, outcome.removed, outcome.count) == ("updated", 1, 39)
        state = FaissState.of(s.manifest.encoders["lite"], "lite")
        assert state.ids is not None and state.deltas == []  # the base rewritten once, with its id list
        s.remove_items(["/p/1.jpg"])
        assert refresh(s, "lite").count == 38
        assert len(FaissState.of(s.manifest.encoders["lite"], "lite").deltas) == 1  # then an update is a delta
    assert json.loads((tmp_path / MANIFEST).read_text())["schema_version"] == 6
    assert not (tmp_path / "index" / file).exists()  # the old build was replaced
    with Store(tmp_path, readonly=True) as s:
        index, _ = open_index(s, "lite")
        brute = vecs[:5] @ vecs[2:].T  # (5, 38): what is left
        np.testing.assert_array_equal(index.search(vecs[:5], 3)[1], 2 + np.argsort(-brute, axis=1)[:, :3])
