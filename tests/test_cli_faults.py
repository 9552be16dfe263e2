"""The CLI on ordinary faults: odd file names, damaged db files, missing folders, bad query images, two writers.

Every case is a real db (LMDB, FAISS, the real ONNX model) in tmp_path; damage is done to the real files.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.encoders.registry import default_encoder
from simsearch.indexer.lock import LOCK_FILE
from simsearch.indexer.manifest import MANIFEST

from .conftest import copy_samples, sample_paths

DEFAULT = default_encoder()  # what a command uses when no --encoder is given (int8 where it is faster)
runner = CliRunner()
GOLDFISH = "n01443537_goldfish.JPEG"


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def base(tmp_path_factory, models_dir):
    """8 photos (the goldfish among them) and their db; tests copy the db before damaging it."""
    root = tmp_path_factory.mktemp("faults")
    copy_samples(root / "imgs", 8)
    assert invoke("index", root / "imgs", "--db", root / "db").exit_code == 0
    return root


@pytest.fixture
def db(base, tmp_path):
    shutil.copytree(base / "db", tmp_path / "db")
    return tmp_path / "db"


def _index_file(db):
    entry = json.loads((db / MANIFEST).read_text())["encoders"][DEFAULT]
    return db / "index" / entry["index"]["file"]


def test_names_that_are_not_utf8_or_hold_markup_are_indexed_and_returned_exactly(tmp_path):
    folder = tmp_path / "imgs"
    photos = sample_paths(3)
    odd_dir = os.path.join(os.fsencode(folder), b"Fotos_M\xfcnchen")
    os.makedirs(odd_dir)
    odd = os.path.join(odd_dir, b"latin1_\xe9\xff.jpg")
    shutil.copy(photos[0], os.fsdecode(odd))
    shutil.copy(photos[1], folder / "holiday [edited].jpg")
    (folder / "set[").mkdir()
    shutil.copy(photos[2], folder / "set[" / "]bold.jpg")  # the path holds "[/]", rich's closing tag
    result = invoke("index", folder, "--db", tmp_path / "db")
    assert result.exit_code == 0 and "3 items in the db" in result.output

    result = invoke("query", os.fsdecode(odd), "-k", "3", "--db", tmp_path / "db", "--json")
    assert result.exit_code == 0, result.output
    hit = json.loads(result.stdout)["results"][0]["hits"][0]
    assert hit["path"].endswith("Fotos_M\\xfcnchen/latin1_\\xe9\\xff.jpg") and base64.b64decode(hit["path_bytes"]) == odd

    result = invoke("query", folder / "holiday [edited].jpg", "-k", "3", "--db", tmp_path / "db")
    assert result.exit_code == 0, result.output
    assert "holiday [edited].jpg" in result.stdout and "set[/]bold.jpg" in result.stdout
    assert "Fotos_M\\xfcnchen/latin1_\\xe9\\xff.jpg" in result.stdout  # the bytes, shown escaped


def test_skip_lines_keep_brackets(tmp_path):
    folder = tmp_path / "imgs"
    copy_samples(folder, 1)
    (folder / "bad [x].jpg").write_text("not an image")
    (folder / "notes.txt").write_text("ignored")
    result = invoke("index", folder, "--db", tmp_path / "db")
    assert result.exit_code == 0
    assert "bad [x].jpg: not an image" in result.output and "ignored 1 files with other extensions" in result.output


def test_damaged_index_file_query_info_index_check(db, base):
    path = _index_file(db)
    path.write_bytes(path.read_bytes()[:100])
    result = invoke("query", base / "imgs" / GOLDFISH, "--db", db)
    assert result.exit_code == 1 and result.output.startswith("error:") and "check --repair" in result.output
    assert str(path) in result.output
    doc = json.loads(invoke("info", "--db", db, "--json").stdout)
    assert "damaged index file" in doc["encoders"][DEFAULT]["index_problem"]
    result = invoke("check", "--db", db)
    assert result.exit_code == 1 and "damaged index file" in result.output
    result = invoke("index", base / "imgs", "--db", db)  # rebuilt from the stored vectors, nothing embedded
    assert result.exit_code == 0 and "nothing to embed: 8 unchanged" in result.output and "the index was rebuilt" in result.output
    assert invoke("check", "--db", db).exit_code == 0
    assert invoke("query", base / "imgs" / GOLDFISH, "--db", db).exit_code == 0


def test_check_repair_rebuilds_a_deleted_index(db, base):
    _index_file(db).unlink()
    result = invoke("query", base / "imgs" / GOLDFISH, "--db", db)
    assert result.exit_code == 1 and "index file missing" in result.output and "check --repair" in result.output
    result = invoke("check", "--db", db, "--repair")
    assert result.exit_code == 0 and f"the index of {DEFAULT}: rebuilt" in result.output
    doc = json.loads(invoke("query", base / "imgs" / GOLDFISH, "--db", db, "--json").stdout)
    assert doc["results"][0]["hits"][0]["path"] == str(base / "imgs" / GOLDFISH)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_lmdb_is_one_line_and_rebuild_recovers(db, base, damage):
    data = db / "store.lmdb" / "data.mdb"
    if damage == "truncate":
        os.truncate(data, 3 * 4096)
    else:
        data.write_bytes(os.urandom(data.stat().st_size))
    for args in (["query", base / "imgs" / GOLDFISH], ["info"], ["index", base / "imgs"]):
        # In a child process: undetected damage would kill it with SIGBUS (exit -7) instead of exit 1.
        child = subprocess.run([sys.executable, "-m", "simsearch.cli", *map(str, args), "--db", str(db)],
                               capture_output=True, text=True, timeout=120)
        assert child.returncode == 1, (args, child.returncode, child.stderr)
        assert "error:" in child.stderr and "data.mdb" in child.stderr and "--rebuild" in child.stderr
    assert invoke("check", "--db", db).exit_code == 1
    result = invoke("index", base / "imgs", "--db", db, "--rebuild")
    assert result.exit_code == 0 and "moved the old db files to" in result.output and "embedded 8" in result.output
    assert invoke("check", "--db", db).exit_code == 0
    assert len(list(db.glob("broken-*/store.lmdb/data.mdb"))) == 1  # the broken files are kept


@pytest.mark.parametrize("manifest, field", [
    ({"schema_version": 2, "encoders": []}, "'encoders'"),
    ({"schema_version": 2, "default_encoder": "efficientnet-lite0", "encoders": {"efficientnet-lite0": {"key": "k"}}},
     "'encoders.efficientnet-lite0.dim' is missing"),
])
def test_wrong_shaped_manifest_names_the_field(db, base, manifest, field):
    (db / MANIFEST).write_text(json.dumps(manifest))
    for args in (["query", base / "imgs" / GOLDFISH], ["info"], ["index", base / "imgs"], ["check"]):
        result = invoke(*args, "--db", db)
        assert result.exit_code == 1 and field in result.output, (args, result.output)


def test_interrupted_first_index_names_its_encoder(tmp_path, encoder):
    from simsearch.indexer.pipeline import Indexer
    from simsearch.indexer.store import Store

    copy_samples(tmp_path / "imgs", 2)
    with Store(tmp_path / "db", create=True) as store:  # the run, killed before its index was built
        Indexer(encoder, store).run(tmp_path / "imgs")
    result = invoke("query", tmp_path / "imgs" / GOLDFISH, "--db", tmp_path / "db")
    assert result.exit_code == 1 and "index of efficientnet-lite0 " in result.output and "never built" in result.output
    assert "None" not in result.output
    result = invoke("check", "--db", tmp_path / "db", "--repair")
    assert result.exit_code == 0
    assert invoke("query", tmp_path / "imgs" / GOLDFISH, "--db", tmp_path / "db").exit_code == 0


def test_empty_db_file_paths_and_folders(tmp_path, base):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "bad.jpg").write_text("no image")
    assert invoke("index", tmp_path / "imgs", "--db", tmp_path / "db").exit_code == 0
    result = invoke("query", base / "imgs" / GOLDFISH, "--db", tmp_path / "db")
    assert result.exit_code == 1 and "is empty" in result.output
    (tmp_path / "file").write_text("x")
    result = invoke("query", base / "imgs" / GOLDFISH, "--db", tmp_path / "file")
    assert result.exit_code == 1 and "is a file, not a db folder" in result.output
    result = invoke("index", base / "imgs", "--db", tmp_path / "file")
    assert result.exit_code == 1 and "is a file, not a db folder" in result.output
    result = invoke("index", base / "imgs", "--db", tmp_path / "db2", "--models-dir", tmp_path / "file")
    assert result.exit_code == 1 and "is a file, not a models folder" in result.output


def test_query_a_folder_batches_and_reports_bad_images_per_query(db, base, tmp_path, monkeypatch):
    import simsearch.retrieval.search as search

    monkeypatch.setattr(search, "QUERY_BATCH", 3)  # 8 photos + 1 bad: three batches
    queries = tmp_path / "q"
    shutil.copytree(base / "imgs", queries)
    (queries / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    result = invoke("query", queries, "-k", "100000", "--db", db, "--json")
    assert result.exit_code == 1  # one query failed, the others answered
    doc = json.loads(result.stdout)
    assert doc["k"] == 8 and doc["k_requested"] == 100000
    by_name = {os.path.basename(r["query"]): r for r in doc["results"]}
    assert len(by_name) == 9 and "broken.jpg" in by_name["broken.jpg"]["error"]
    assert by_name["broken.jpg"]["hits"] == []
    for name, r in by_name.items():
        if name != "broken.jpg":
            assert "error" not in r and len(r["hits"]) == 8
            assert os.path.basename(r["hits"][0]["path"]) == name  # each finds its own copy first


def test_moved_folder_prune_and_symlinked_alias(tmp_path):
    real = tmp_path / "real"
    copy_samples(real / "a", 3)
    copy_samples(real / "b", 2, start=3)
    alias = tmp_path / "alias"
    alias.symlink_to(real)
    db = tmp_path / "db"
    assert invoke("index", alias, "--db", db).exit_code == 0
    result = invoke("index", real, "--db", db)  # the same files under their real path: one item each
    assert result.exit_code == 0 and "nothing to embed: 5 unchanged" in result.output and "5 items" in result.output

    shutil.move(real / "b", tmp_path / "moved-b")
    result = invoke("index", real / "b", "--db", db)
    assert result.exit_code == 1 and "2 items under it" in result.output and "simsearch prune" in result.output
    result = invoke("prune", "--db", db, "--dry-run")
    assert result.exit_code == 0 and "2 items would be dropped" in result.output
    assert json.loads(invoke("info", "--db", db, "--json").stdout)["items"] == 5
    result = invoke("prune", "--db", db)
    assert result.exit_code == 0 and "dropped 2 items; 3 items in the db" in result.output
    doc = json.loads(invoke("info", "--db", db, "--json").stdout)
    assert doc["encoders"][DEFAULT]["vectors_in_index"] == 3
    assert invoke("check", "--db", db).exit_code == 0


def test_unlistable_subfolder_keeps_its_items(tmp_path, encoder, monkeypatch):
    """A folder that cannot be listed (permissions, a dropped mount) is not a deletion."""
    from simsearch.indexer import scan as scan_module
    from simsearch.indexer.pipeline import Indexer
    from simsearch.indexer.store import Store

    copy_samples(tmp_path / "imgs" / "ok", 2)
    copy_samples(tmp_path / "imgs" / "locked", 3, start=2)
    with Store(tmp_path / "db", create=True) as store:
        assert Indexer(encoder, store).run(tmp_path / "imgs").embedded == 5
    locked = str(tmp_path / "imgs" / "locked")
    if os.geteuid() != 0:
        os.chmod(locked, 0)
    else:  # root reads any folder: inject the error the kernel gives everyone else
        real_scandir = os.scandir

        def scandir(path):
            if os.fspath(path) == locked:
                raise PermissionError(13, "Permission denied", locked)
            return real_scandir(path)

        monkeypatch.setattr(scan_module.os, "scandir", scandir)
    try:
        with Store(tmp_path / "db") as store:
            report = Indexer(encoder, store).run(tmp_path / "imgs")
            assert (report.removed, report.not_checked, store.item_count()) == (0, 3, 5)
    finally:
        os.chmod(locked, 0o755)


def test_two_index_runs_on_one_folder_embed_each_image_once(tmp_path):
    copy_samples(tmp_path / "imgs", 12)
    cmd = [sys.executable, "-m", "simsearch.cli", "index", str(tmp_path / "imgs"), "--db", str(tmp_path / "db")]
    runs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [r.communicate(timeout=300)[1] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outputs
    embedded = sorted("embedded 12" in o for o in outputs)
    assert embedded == [False, True], outputs  # the second waited for the lock (or came after), then found all 12
    # and a run that finds the db being written waits, says so, and goes on once it is free: the writer is
    # this test, holding the lock, so the run cannot come too late to see it (two real runs can, on a busy machine)
    with open(tmp_path / "db" / LOCK_FILE, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiting = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        # if it never says so, the lock is let go anyway: the run ends, the loop below too, and the test fails
        give_up = threading.Timer(120, fcntl.flock, (held.fileno(), fcntl.LOCK_UN))
        give_up.start()
        said = False
        for line in waiting.stderr:  # up to the message: it blocks on the lock right after saying so
            if "waiting for it to finish" in line:
                said = True
                break
        give_up.cancel()
        fcntl.flock(held, fcntl.LOCK_UN)
    waiting.communicate(timeout=300)
    assert said and waiting.returncode == 0
    busy = [sys.executable, "-m", "simsearch.cli", "index", str(tmp_path / "imgs"), "--db", str(tmp_path / "db"), "--no-wait"]
    assert subprocess.run(busy, capture_output=True, timeout=300).returncode == 0  # free again
