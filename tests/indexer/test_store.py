"""The LMDB store: round trips, float32 little-endian vectors, schema refusal, atomic manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simsearch.errors import DbNotFoundError, NotFoundError, SchemaError
from simsearch.indexer.manifest import MANIFEST, SCHEMA_VERSION
from simsearch.indexer.store import Store


def test_round_trip_and_ids(tmp_path):
    v = np.arange(4, dtype=np.float32)
    with Store(tmp_path / "db", create=True) as s:
        s.put_items("enc@1", [("/a.jpg", "sha-a", 10, 1, v), ("/b.jpg", "sha-b", 20, 2, v + 1)])
        assert s.get_item("/a.jpg").id == 0 and s.get_item("/b.jpg").id == 1
        s.put_items("enc@1", [("/a.jpg", "sha-a2", 11, 3, v * 2)])  # changed file keeps its id
        assert s.get_item("/a.jpg").id == 0 and s.get_item("/a.jpg").sha256 == "sha-a2"
        np.testing.assert_array_equal(s.get_vector("enc@1", "sha-a2"), v * 2)
        assert s.has_vector("enc@1", "sha-b") and not s.has_vector("other@1", "sha-b")
        assert s.paths_of([1, 0, 7]) == ["/b.jpg", "/a.jpg", None]
        blocks = list(s.iter_vector_blocks("enc@1", 4, block=1))
        assert [b[0].tolist() for b in blocks] == [[0], [1]]
        assert s.sweep_vectors() == 1  # "sha-a" is referenced by no item any more
        gen = s.generation
        assert s.remove_items(["/b.jpg", "/nope.jpg"]) == 1 and s.generation == gen + 1
        # A tombstone: an index built before the removal may still return id 1, so it stays resolvable
        assert s.paths_of([1]) == ["/b.jpg"] and s.item_count() == 1 and s.get_item("/b.jpg") is None
        np.testing.assert_array_equal(s.vectors_of_ids("enc@1", [1], 4)[0], v + 1)
        with pytest.raises(NotFoundError, match="no item with id 1 in the db"):  # ... but it is not an item any more
            s.vectors_of_ids("enc@1", [0, 1], 4, live=True)
        s.put_items("enc@1", [("/b.jpg", "sha-b", 20, 4, None)])  # the path is back, as a new item (id 2)
        with pytest.raises(NotFoundError, match="id 1 "):
            s.vectors_of_ids("enc@1", [1], 4, live=True)
        np.testing.assert_array_equal(s.vectors_of_ids("enc@1", [2, 0], 4, live=True), [v + 1, v * 2])
        s.remove_items(["/b.jpg"])
        assert s.collect_tombstones() == 2  # no index built: nothing can return it
        assert s.paths_of([1]) == [None] and s.has_vector("enc@1", "sha-b")  # vectors are swept in bulk, later
        assert s.sweep_vectors() == 1 and not s.has_vector("enc@1", "sha-b")


def test_vectors_of_forgotten_items_are_swept_once_there_are_enough(tmp_path, monkeypatch):
    monkeypatch.setattr("simsearch.indexer.store.SWEEP_MIN", 3)
    v = np.ones(4, dtype=np.float32)
    with Store(tmp_path / "db", create=True) as s:
        s.put_items("enc@1", [(f"/{i}.jpg", f"sha-{i}", 1, 1, v * i) for i in range(10)])
        for i in range(3):
            s.remove_items([f"/{i}.jpg"])
            s.collect_tombstones()
            assert s.has_vector("enc@1", "sha-0") == (i < 2)  # the third forgotten item triggers the sweep
        assert not any(s.has_vector("enc@1", f"sha-{i}") for i in range(3)) and s.has_vector("enc@1", "sha-3")


def test_vectors_are_float32_little_endian(tmp_path):
    with Store(tmp_path, create=True) as s:
        s.put_items("e", [("/x", "h", 1, 1, np.array([1.5, -2.0], dtype=">f8"))])
        with s.env.begin(db=s._vectors) as txn:
            raw = txn.get(b"e\0h")
    assert raw == np.array([1.5, -2.0], dtype="<f4").tobytes()


def test_items_under_a_folder_only(tmp_path):
    with Store(tmp_path, create=True) as s:
        s.put_items("e", [(p, p, 1, 1, None) for p in ["/a/1.jpg", "/a/b/2.jpg", "/ab/3.jpg", "/b/4.jpg"]])
        assert [p for p, _ in s.iter_items(under="/a")] == ["/a/1.jpg", "/a/b/2.jpg"]


def test_missing_db_and_newer_schema_are_refused(tmp_path):
    with pytest.raises(DbNotFoundError, match="simsearch index"):
        Store(tmp_path / "none", readonly=True)
    Store(tmp_path / "db", create=True).close()
    manifest = tmp_path / "db" / MANIFEST
    data = json.loads(manifest.read_text())
    data["schema_version"] = SCHEMA_VERSION + 1
    manifest.write_text(json.dumps(data))
    with pytest.raises(SchemaError, match="newer simsearch"):
        Store(tmp_path / "db")


def test_manifest_written_atomically(tmp_path):
    with Store(tmp_path, create=True) as s:
        s.manifest.default_encoder = "x"
        s.save_manifest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "lock", "manifest.json", "store.lmdb"]
    assert json.loads((tmp_path / MANIFEST).read_text())["default_encoder"] == "x"
