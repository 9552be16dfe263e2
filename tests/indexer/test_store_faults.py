"""The store under faults: any file name, wrong-shaped manifests, truncated or garbage LMDB files, two writers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from simsearch.errors import DbBusyError, DbCorruptError, DbNotFoundError
from simsearch.indexer.lock import writer_active
from simsearch.indexer.manifest import MANIFEST
from simsearch.indexer.store import Store


def test_non_utf8_paths_round_trip_exactly(tmp_path):
    odd = os.fsdecode(b"/photos/Fotos_M\xfcnchen/latin1_\xe9\xff.jpg")  # surrogate escapes
    with Store(tmp_path, create=True) as s:
        s.put_items("e", [(odd, "h", 1, 1, np.ones(2, np.float32)), ("/photos/ok.jpg", "h2", 1, 1, None)])
        rec = s.get_item(odd)
        assert rec is not None and s.paths_of([rec.id]) == [odd]
        assert [p for p, _ in s.iter_items(under=os.fsdecode(b"/photos/Fotos_M\xfcnchen"))] == [odd]
        with s.env.begin(db=s._items) as txn:  # stored as the file system's bytes
            assert txn.get(b"/photos/Fotos_M\xfcnchen/latin1_\xe9\xff.jpg") is not None
        assert s.remove_items([odd]) == 1


@pytest.mark.parametrize("manifest, field", [
    ({"schema_version": 2, "encoders": []}, "'encoders'"),
    ({"schema_version": 2, "encoders": {"lite": {"key": "k"}}}, "'encoders.lite.dim' is missing"),
    ({"schema_version": 2, "encoders": {"lite": {"key": "k", "dim": "8"}}}, "'encoders.lite.dim' has the wrong type"),
    ({"schema_version": 3, "encoders": {"lite": {"key": "k", "dim": 8, "preprocess": "squash"}}},
     r"'encoders.lite.preprocess' is not a policy \(resize, pad, crop\)"),
    ({"encoders": {}}, "'schema_version'"),
    ([1, 2], "expected a JSON object"),
])
def test_wrong_shaped_manifest_names_the_field(tmp_path, manifest, field):
    Store(tmp_path, create=True).close()
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    for readonly in (True, False):
        with pytest.raises(DbCorruptError, match=field) as e:
            Store(tmp_path, readonly=readonly)
        assert "--rebuild" in str(e.value)


def test_a_folder_that_is_not_a_db_gets_no_lock_file(tmp_path):
    with pytest.raises(DbNotFoundError):
        Store(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_db_path_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    for kw in ({"readonly": True}, {"create": True}):
        with pytest.raises(DbNotFoundError, match="is a file, not a db folder"):
            Store(tmp_path / "f", **kw)


def _filled_db(root):
    with Store(root, create=True) as s:
        s.put_items("e", [(f"/p/{i}.jpg", f"h{i}", 1, 1, np.random.default_rng(i).random(256, dtype=np.float32))
                          for i in range(400)])
    return root / "store.lmdb" / "data.mdb"


# Each open runs in a child: if the check failed to catch the damage, LMDB would kill it with SIGBUS.
_OPEN = "import sys; from simsearch.indexer.store import Store; Store(sys.argv[1], readonly=sys.argv[2] == 'r').close()"


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_lmdb_gives_a_message_not_sigbus(tmp_path, damage):
    data = _filled_db(tmp_path)
    size = data.stat().st_size
    if damage == "truncate":
        os.truncate(data, size // 3)
    else:
        with open(data, "r+b") as f:
            f.write(os.urandom(8192))  # both meta pages
    for mode in ("r", "w"):
        child = subprocess.run([sys.executable, "-c", _OPEN, str(tmp_path), mode], capture_output=True, text=True)
        assert child.returncode == 1, (child.returncode, child.stderr)  # an exception, not a signal
        assert "DbCorruptError" in child.stderr and "data.mdb" in child.stderr
        assert ("truncated" if damage == "truncate" else "not an LMDB file") in child.stderr


def test_rebuild_moves_a_broken_db_aside_and_starts_empty(tmp_path):
    data = _filled_db(tmp_path)
    os.truncate(data, 4096 * 3)
    with pytest.raises(DbCorruptError, match="--rebuild"):
        Store(tmp_path)
    with Store(tmp_path, rebuild=True) as s:
        assert s.item_count() == 0 and s.moved_to is not None
        kept = s.moved_to
    assert (kept / "store.lmdb" / "data.mdb").stat().st_size == 4096 * 3  # the user's broken files are kept
    assert (kept / MANIFEST).is_file()


_HOLD = """
import sys, time
from simsearch.indexer.store import Store
with Store(sys.argv[1], create=True) as s:
    s.register_encoder("first", "first@1", 8, "crop")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_second_writer_waits_or_fails_fast(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path), "2"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert writer_active(tmp_path)
        with pytest.raises(DbBusyError, match=f"pid {holder.pid}"):
            Store(tmp_path, wait=False)
        t = time.monotonic()
        with Store(tmp_path) as s:  # waits for the holder, then reads the manifest it wrote
            assert time.monotonic() - t > 0.5 and s.manifest.default_encoder == "first"
            s.register_encoder("second", "second@1", 4, "crop")
    finally:
        holder.wait(10)
    assert not writer_active(tmp_path)
    with Store(tmp_path, readonly=True) as s:  # no writer lost the other's entry
        assert sorted(s.manifest.encoders) == ["first", "second"]


def test_lock_is_released_when_the_writer_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path), "60"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait(10)
    with Store(tmp_path, wait=False) as s:
        assert s.manifest.default_encoder == "first"
