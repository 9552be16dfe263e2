"""A full disk during `index`, the publish of an index, compaction or `check --repair`: one `error:` line giving the
space needed and free, nothing half-written, the db intact and usable once there is space again.

Real refusals, no injected failures: the commands run in child processes whose file size limit (RLIMIT_FSIZE, with
SIGXFSZ ignored, so a write past it fails with EFBIG) is below what they must write; and, where this machine lets
a process mount in a mount namespace of its own (`unshare`), on a small tmpfs filled up (ENOSPC).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from simsearch.encoders.registry import default_encoder
from simsearch.indexer.manifest import MANIFEST

from .conftest import copy_samples

ENCODER = default_encoder()
GOLDFISH = "n01443537_goldfish.JPEG"


def cli(*args, fsize: int | None = None) -> subprocess.CompletedProcess:
    """`simsearch ARGS` in a child process; fsize: the largest file it may write."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", "simsearch.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, preexec_fn=limit if fsize is not None else None)


def one_error_line(result: subprocess.CompletedProcess, names: str) -> str:
    """The command failed with exactly one `error:` line, no traceback, naming `names`; that line."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "no space left to write" in errors[0] and names in errors[0] and "needed" in errors[0], errors[0]
    return errors[0]


def manifest(db: Path) -> dict:
    return json.loads((db / MANIFEST).read_text())["encoders"][ENCODER]


def assert_intact(db: Path, imgs: Path, files: set[str] | None = None) -> None:
    """Nothing half-written (no temp file, index/ holds what the manifest names), `check` passes, a query answers."""
    state = manifest(db)["index"]
    named = {state["file"], state["ids"]["file"], *(d["file"] for d in state["deltas"])}
    assert {p.name for p in (db / "index").iterdir()} == named
    assert not list(db.rglob("*.tmp"))
    if files is not None:
        assert named == files
    check = cli("check", "--db", db)
    assert check.returncode == 0 and "error" not in check.stderr, check.stderr
    query = cli("query", imgs / GOLDFISH, "--db", db, "--json", "-k", "1")
    assert query.returncode == 0, query.stderr
    assert json.loads(query.stdout)["results"][0]["hits"][0]["path"].endswith(GOLDFISH)  # itself, or its copy


@pytest.fixture(scope="module")
def base(tmp_path_factory, models_dir):
    """30 photos and their db (one base, no deltas); then a 31st, written as a delta (1 of 30 changed: compaction
    waits for 10%)."""
    root = tmp_path_factory.mktemp("disk-full")
    copy_samples(root / "imgs", 30)
    assert cli("index", root / "imgs", "--db", root / "db").returncode == 0
    copy_samples(root / "imgs", 1, start=30)
    assert cli("index", root / "imgs", "--db", root / "db").returncode == 0
    assert len(manifest(root / "db")["index"]["deltas"]) == 1
    return root


@pytest.fixture
def db(base, tmp_path):
    shutil.copytree(base / "db", tmp_path / "db")
    return tmp_path / "db"


def test_compaction_past_the_file_size_limit_leaves_the_db_as_it_was(db, base):
    before = manifest(db)
    files = {p.name for p in (db / "index").iterdir()}
    line = one_error_line(cli("compact", "--db", db, fsize=before["index"]["bytes"] // 2), "/index/")
    assert "files may not exceed" in line and "ulimit -f" in line
    assert manifest(db) == before
    assert_intact(db, base / "imgs", files)
    result = cli("compact", "--db", db)  # room again: it goes through
    assert result.returncode == 0 and "compacted" in result.stderr, result.stderr
    assert not manifest(db)["index"]["deltas"]
    assert_intact(db, base / "imgs")


def test_index_storing_past_the_limit_stores_nothing_half_and_runs_again(db, base, tmp_path):
    imgs = tmp_path / "imgs"
    shutil.copytree(base / "imgs", imgs)
    copy_samples(imgs, 20, start=31)  # 100 KB of new vectors: the store must grow
    data = db / "store.lmdb" / "data.mdb"
    one_error_line(cli("index", imgs, "--db", db, fsize=data.stat().st_size), "data.mdb")
    findings = json.loads(cli("check", "--db", db, "--json").stdout)
    assert findings["ok"] and findings["facts"]["items"] == 31  # the batch was undone whole
    assert_intact(db, base / "imgs")
    result = cli("index", imgs, "--db", db)
    assert result.returncode == 0 and "embedded 20" in result.stderr, result.stderr
    assert_intact(db, imgs)


def test_publishing_a_delta_past_the_limit_leaves_the_index_as_it_was(db, base):
    """A change is stored but not indexed (as an `index` killed after storing leaves it); publishing it (a delta of one
    1280-d vector, what `index` and `check --repair` write) finds no room."""
    from simsearch.indexer.store import Store

    with Store(db) as store:
        rec = store.get_item(str(base / "imgs" / GOLDFISH))
        key = store.manifest.encoders[ENCODER].key
        store.put_items(key, [("/elsewhere/copy.JPEG", rec.sha256, rec.size, rec.mtime_ns,
                               store.get_vector(key, rec.sha256))])
    before = manifest(db)
    line = one_error_line(cli("check", "--repair", "--db", db, fsize=2048), ".delta")
    assert "(5 KiB needed" in line  # the delta: one 1280-d vector and its id
    assert manifest(db) == before
    assert_intact(db, base / "imgs", {before["index"]["file"], before["index"]["ids"]["file"],
                                      *(d["file"] for d in before["index"]["deltas"])})
    result = cli("index", base / "imgs", "--db", db)
    assert result.returncode == 0, result.stderr
    assert len(manifest(db)["index"]["deltas"]) == 2
    assert_intact(db, base / "imgs")


def test_check_repair_past_the_limit_leaves_the_damage_named_and_repairs_later(db, base):
    state = manifest(db)["index"]
    (db / "index" / state["file"]).unlink()
    one_error_line(cli("check", "--db", db, "--repair", fsize=state["bytes"] // 2), "/index/")
    assert manifest(db)["index"] == state
    assert {p.name for p in (db / "index").iterdir()} == {state["ids"]["file"], *(d["file"] for d in state["deltas"])}
    check = cli("check", "--db", db)
    assert check.returncode == 1 and "index file missing" in check.stderr  # what it was: nothing new broke
    result = cli("check", "--db", db, "--repair")
    assert result.returncode == 0 and "rebuilt" in result.stderr, result.stderr
    assert_intact(db, base / "imgs")


def _can_mount() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


_ON_TMPFS = r"""
import json, os, shutil, subprocess, sys
mnt, src, imgs, more = sys.argv[1:5]
db = os.path.join(mnt, "db")
shutil.copytree(src, db)
out = {}

def cli(*args):
    r = subprocess.run([sys.executable, "-m", "simsearch.cli", *args], capture_output=True, text=True)
    return {"rc": r.returncode, "stderr": r.stderr, "stdout": r.stdout}

def fill(leave):
    # a file that leaves `leave` bytes free on the tmpfs
    free = shutil.disk_usage(mnt).free
    with open(os.path.join(mnt, "filler"), "wb") as f:
        f.write(b"\0" * max(free - leave, 0))

state = json.load(open(os.path.join(db, "manifest.json")))["encoders"]
base = next(iter(state.values()))["index"]["bytes"]
fill(base // 2)
out["compact_full"] = cli("compact", "--db", db)
out["files_after"] = sorted(os.listdir(os.path.join(db, "index")))
out["check_full"] = cli("check", "--db", db)
os.remove(os.path.join(mnt, "filler"))
out["compact"] = cli("compact", "--db", db)
fill(0)
out["index_full"] = cli("index", more, "--db", db)
out["query_full"] = cli("query", os.path.join(imgs, "n01443537_goldfish.JPEG"), "--db", db, "--json", "-k", "1")
os.remove(os.path.join(mnt, "filler"))
out["index"] = cli("index", more, "--db", db)
out["check"] = cli("check", "--db", db)
print(json.dumps(out))
"""


@pytest.mark.skipif(not _can_mount(), reason="cannot mount a tmpfs in a mount namespace here (unshare -rm)")
def test_a_full_tmpfs_during_compaction_and_index(base, tmp_path):
    """The real thing: ENOSPC on a 24 MiB tmpfs, filled to leave half the base free (compaction) or nothing (index)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    more = tmp_path / "more"
    shutil.copytree(base / "imgs", more)
    copy_samples(more, 20, start=31)
    child = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=24m tmpfs "{mnt}" && exec "$0" "$@"',
                            sys.executable, "-c", _ON_TMPFS, str(mnt), str(base / "db"), str(base / "imgs"),
                            str(more)], capture_output=True, text=True, timeout=600, env=os.environ)
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout)

    def one_line(r, names):
        errors = [line for line in r["stderr"].splitlines() if line.startswith("error:")]
        assert r["rc"] == 1 and "Traceback" not in r["stderr"] and len(errors) == 1, r["stderr"]
        assert "no space left to write" in errors[0] and names in errors[0] and "free on the disk" in errors[0]

    one_line(out["compact_full"], "/index/")
    assert not [f for f in out["files_after"] if f.endswith(".tmp")] and len(out["files_after"]) == 3
    assert out["check_full"]["rc"] == 0, out["check_full"]["stderr"]
    assert out["compact"]["rc"] == 0 and "compacted" in out["compact"]["stderr"]
    one_line(out["index_full"], "data.mdb")
    assert out["query_full"]["rc"] == 0
    assert json.loads(out["query_full"]["stdout"])["results"][0]["hits"][0]["path"].endswith(GOLDFISH)
    assert out["index"]["rc"] == 0 and "embedded 20" in out["index"]["stderr"], out["index"]["stderr"]
    assert out["check"]["rc"] == 0, out["check"]["stderr"]
