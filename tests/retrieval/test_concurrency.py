"""Readers during writes, and writers killed at random moments: no failed query, no lost or redone work.

Real processes: the writer is a child process indexing (adding and removing files, as index deltas and by
compaction) or killed with SIGKILL, also in the middle of a compaction; the reader is this process, opening the
db the way `simsearch query` does.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from simsearch.indexer.pipeline import Indexer
from simsearch.indexer.store import Store
from simsearch.retrieval.check import check_db
from simsearch.retrieval.backend import refresh
from simsearch.retrieval.faiss_index import FaissState, load_index

from ..conftest import copy_samples, query_while, sample_paths

_WRITER = """
import shutil, sys, time
from pathlib import Path
from simsearch.encoders.runtime import OnnxEncoder
from simsearch.encoders.registry import get_encoder
from simsearch.indexer.pipeline import Indexer
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import RefreshConfig
from simsearch.retrieval.faiss_index import FaissBackend, SegmentConfig

db, folder, pool, cycles = Path(sys.argv[1]), Path(sys.argv[2]), sorted(Path(sys.argv[3]).iterdir()), int(sys.argv[4])
enc = OnnxEncoder(get_encoder("efficientnet-lite0"))
backend = FaissBackend(SegmentConfig(share=1e9))  # each change a delta; every other cycle ends in a compaction
for c in range(cycles):
    batch = pool[(c % 4) * 4:(c % 4) * 4 + 4]
    for p in batch:
        shutil.copy2(p, folder / p.name)
    for step in ("add", "remove"):
        with Store(db, create=True) as store:
            Indexer(enc, store).run(folder)
            backend.refresh(store, enc.spec.name, RefreshConfig(compact=c % 2 == 1 and step == "remove"))
        if step == "add":
            for p in batch:
                (folder / p.name).unlink()
print("cycles done", flush=True)
"""


def test_queries_during_index_runs_always_answer(tmp_path, encoder, caplog):
    folder, pool = tmp_path / "imgs", tmp_path / "pool"
    stable = copy_samples(folder, 6)  # in the db throughout
    copy_samples(pool, 16, start=6)  # added and removed by the writer
    with Store(tmp_path / "db", create=True) as store:
        Indexer(encoder, store).run(folder)
        refresh(store, encoder.spec.name)

    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "db"), str(folder), str(pool), "6"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    caplog.set_level(logging.WARNING, logger="simsearch")
    t = query_while(writer, tmp_path / "db", encoder, stable, rounds=5, timeout_s=240)
    out, errs = writer.communicate(timeout=60)
    assert writer.returncode == 0 and "cycles done" in out, errs
    print(f"{t.queries} queries during 12 index runs: {t.failures} failed, {t.empty} empty, {t.wrong} without their "
          "own image first")
    assert t.queries > 50  # reads overlapped the writes many times
    assert (t.failures, t.empty, t.wrong) == (0, 0, 0), [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if "older than the db" in r.getMessage()]


@pytest.mark.slow
def test_index_killed_at_random_moments_loses_and_redoes_nothing(tmp_path, encoder):
    """SIGKILL `simsearch index` at 20 seeded random moments while the folder changes between runs (50 of ~70 items
    change per run, past the compaction threshold: a kill late in a run lands in a compaction)."""
    rng = np.random.default_rng(0)
    folder, db = tmp_path / "imgs", tmp_path / "db"
    pool = list(sample_paths(1000))
    rng.shuffle(pool)
    copy_samples(folder, 40)
    fresh = iter(p for p in pool if not (folder / p.name).exists())
    command = [sys.executable, "-m", "simsearch.cli", "index", str(folder), "--db", str(db), "--batch-size", "4",
               "--encoder", encoder.spec.name]  # the fixture's (the default may be its int8 variant)
    t = time.monotonic()
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    full = time.monotonic() - t  # a whole run on 40 new photos, start-up included: kills are drawn within it
    killed, stored_before = 0, {p.name for p in folder.iterdir()}  # files stored by the last completed run
    for round_ in range(20):
        present = sorted(p.name for p in folder.iterdir())
        for name in rng.choice(present, 10, replace=False):
            (folder / name).unlink()
        for _ in range(40):  # new files: as much work as the timed run
            p = next(fresh)
            shutil.copy2(p, folder / p.name)
        present = {p.name for p in folder.iterdir()}
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 1.0) * full)
        proc.send_signal(signal.SIGKILL)
        killed += proc.wait() == -signal.SIGKILL
        findings, _ = check_db(db) if (db / "manifest.json").exists() else ([], {})
        assert not [f for f in findings if f.level == "error"], findings
        with Store(db, create=True) as store:
            stored = {p for p in present if (rec := store.get_item(str(folder / p)))
                      and store.has_vector(encoder.spec.key, rec.sha256)}
            assert stored_before & present <= stored  # the killed run lost nothing stored before it
            report = Indexer(encoder, store).run(folder)
            refresh(store, encoder.spec.name)
            assert report.embedded + report.reused == len(present) - len(stored)  # stored work is not redone
            assert store.item_count() == len(present)
            stored_before = present
        assert not [f for f in check_db(db)[0] if f.level != "warning" or "older" not in f.message]
    print(f"killed {killed} of 20 runs before they finished (a whole run: {full:.1f} s)")
    assert killed >= 12  # most runs were really cut short


_COMPACTOR = """
import sys
import numpy as np
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import RefreshConfig
from simsearch.retrieval.faiss_index import FaissBackend, SegmentConfig

db, seed = sys.argv[1], int(sys.argv[2])
# Not default_rng(seed): round 0's stream would be the test's own default_rng(0), and after ~30 rounds the writer
# gave an item the very vector another item was made with (a tie, not the item itself, at the top).
rng = np.random.default_rng([seed, 1])
backend = FaissBackend(SegmentConfig(share=1e9))  # deltas until asked to compact
with Store(db) as store:
    print("ready", flush=True)
    for round_ in range(10_000):  # until killed: change 30 items, publish them as a delta, fold it into a new base
        vecs = rng.standard_normal((30, 32)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        paths = [f"/img/{i}.jpg" for i in rng.choice(20_000, 30, replace=False)]
        store.put_items("x@1", [(p, f"{seed}.{round_}.{p}", 2, 2, v) for p, v in zip(paths, vecs)])
        backend.refresh(store, "x")
        backend.refresh(store, "x", RefreshConfig(compact=True))
"""


def test_compaction_killed_at_random_moments_leaves_one_consistent_snapshot(tmp_path):
    """SIGKILL a writer that loops {change 30 items, write a delta, compact} (most of its time is compaction: reading,
    rewriting and publishing a 20k x 32 IVF base) at 8 seeded moments: `check` finds no error, and the next refresh
    serves exactly the store's items, every one found by its own vector, with no file left over."""
    rng = np.random.default_rng(0)
    db = tmp_path / "db"
    vecs = rng.standard_normal((20_000, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    with Store(db, create=True) as store:
        store.register_encoder("x", "x@1", 32, "crop")
        store.put_items("x@1", [(f"/img/{i}.jpg", f"h{i}", 1, 1, v) for i, v in enumerate(vecs)])
        refresh(store, "x")
        assert FaissState.of(store.manifest.encoders["x"], "x").kind == "ivf"
    left_over = 0
    for round_ in range(8):
        writer = subprocess.Popen([sys.executable, "-c", _COMPACTOR, str(db), str(round_)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        assert writer.stdout.readline() == "ready\n", writer.stderr.read()
        time.sleep(rng.uniform(0.05, 1.5))
        writer.send_signal(signal.SIGKILL)
        assert writer.wait() == -signal.SIGKILL, writer.stderr.read()
        findings, _ = check_db(db)  # every segment the manifest names verified against its sha256
        assert not [f for f in findings if f.level == "error"], findings
        with Store(db) as store:
            state = FaissState.of(store.manifest.encoders["x"], "x")
            left_over += bool({p.name for p in store.index_dir().iterdir()} - state.files())  # killed mid-publish
            refresh(store, "x")
            state = FaissState.of(store.manifest.encoders["x"], "x")
            assert {p.name for p in store.index_dir().iterdir()} == state.files()
            index, entry = load_index(store, "x")
            live = np.concatenate([ids for ids, _ in store.iter_vector_blocks("x@1", 32)])
            assert np.array_equal(index.live_ids(), np.sort(live)) and index.ntotal == 20_000
            sample = rng.choice(live, 50, replace=False)
            _, top = index.search(store.vectors_of_ids("x@1", sample, 32), 1)
            assert top[:, 0].tolist() == sample.tolist()
    print(f"8 kills during delta writes and compactions: {left_over} left files the manifest did not name "
          "(killed between writing a segment and publishing it), all removed by the next refresh")
