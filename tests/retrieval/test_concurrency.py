"""Readers during writes, and writers killed at random moments: no failed query, no lost or redone work.

Real processes: the writer is a child process indexing (adding and removing files) or killed with
SIGKILL; the reader is this process, opening the db the way `simsearch query` does.
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

from simsearch.encoders.preprocess import decode_side, to_input
from simsearch.indexer.images import load_rgb
from simsearch.indexer.pipeline import Indexer
from simsearch.indexer.store import Store
from simsearch.retrieval.check import check_db
from simsearch.retrieval.backend import refresh
from simsearch.retrieval.search import Searcher

from ..conftest import copy_samples, sample_paths

_WRITER = """
import shutil, sys, time
from pathlib import Path
from simsearch.encoders.runtime import OnnxEncoder
from simsearch.encoders.registry import get_encoder
from simsearch.indexer.pipeline import Indexer
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import refresh

db, folder, pool, cycles = Path(sys.argv[1]), Path(sys.argv[2]), sorted(Path(sys.argv[3]).iterdir()), int(sys.argv[4])
enc = OnnxEncoder(get_encoder("efficientnet-lite0"))
for c in range(cycles):
    batch = pool[(c % 4) * 4:(c % 4) * 4 + 4]
    for p in batch:
        shutil.copy2(p, folder / p.name)
    for step in ("add", "remove"):
        with Store(db, create=True) as store:
            Indexer(enc, store).run(folder)
            refresh(store, enc.spec.name)
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
    spec = encoder.spec
    vectors = encoder.embed(np.stack([to_input(load_rgb(p, decode_side(spec)), spec) for p in stable]))

    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "db"), str(folder), str(pool), "6"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    queries = failures = empty = wrong = 0
    caplog.set_level(logging.WARNING, logger="simsearch")
    deadline = time.monotonic() + 240
    while writer.poll() is None and time.monotonic() < deadline:
        try:
            with Searcher.open(tmp_path / "db", encoder) as searcher:  # what every `simsearch query` does
                for _ in range(5):
                    for photo, hits in zip(stable, searcher.search_vectors(vectors, 3)):
                        queries += 1
                        empty += not hits
                        wrong += bool(hits) and hits[0].path != str(photo)
        except Exception as e:  # noqa: BLE001 - any failure of a query is what this test counts
            failures += 1
            logging.getLogger("test").error("query failed: %r", e)
    out, errs = writer.communicate(timeout=60)
    assert writer.returncode == 0 and "cycles done" in out, errs
    print(f"{queries} queries during 12 index runs: {failures} failed, {empty} empty, {wrong} without their own image first")
    assert queries > 50  # reads overlapped the writes many times
    assert (failures, empty, wrong) == (0, 0, 0), [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if "older than the db" in r.getMessage()]


@pytest.mark.slow
def test_index_killed_at_random_moments_loses_and_redoes_nothing(tmp_path, encoder):
    """SIGKILL `simsearch index` at 20 seeded random moments while the folder changes between runs."""
    rng = np.random.default_rng(0)
    folder, db = tmp_path / "imgs", tmp_path / "db"
    pool = list(sample_paths(1000))
    rng.shuffle(pool)
    copy_samples(folder, 40)
    fresh = iter(p for p in pool if not (folder / p.name).exists())
    command = [sys.executable, "-m", "simsearch.cli", "index", str(folder), "--db", str(db), "--batch-size", "4"]
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
