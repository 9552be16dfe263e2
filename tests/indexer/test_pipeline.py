"""Index runs on real photos: brute-force reference, incremental updates, bad files, resume after SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from simsearch.encoders.preprocess import decode_side, to_input
from simsearch.indexer.images import load_rgb
from simsearch.indexer.pipeline import Indexer, IndexerConfig
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import refresh
from simsearch.retrieval.faiss_index import load_index

from ..conftest import copy_samples, sample_paths


def _run(encoder, db, folder, **cfg):
    """What `simsearch index` does: the run, then the index refreshed from the store."""
    with Store(db, create=True) as store:
        report = Indexer(encoder, store, IndexerConfig(batch_size=4, **cfg)).run(folder)
        refresh(store, encoder.spec.name)
        return report


def _index_file(db, name):
    with Store(db, readonly=True) as store:
        return store.manifest.encoders[name].index["file"]


def test_index_matches_brute_force_embedding(tmp_path, encoder):
    photos = copy_samples(tmp_path / "imgs", 10)
    report = _run(encoder, tmp_path / "db", tmp_path / "imgs")
    assert (report.scanned, report.embedded, len(report.skipped)) == (10, 10, 0)
    spec = encoder.spec
    ref = encoder.embed(np.stack([to_input(load_rgb(p, decode_side(spec)), spec) for p in photos]))
    with Store(tmp_path / "db") as store:
        index, _ = load_index(store, spec.name)
        scores, ids = index.search(ref, 10)
        paths = [store.paths_of(row) for row in ids]
        for photo, row, vec in zip(photos, paths, ref):
            assert row[0] == str(photo)  # each photo finds itself first
            np.testing.assert_allclose(store.get_vector(spec.key, store.get_item(str(photo)).sha256), vec, atol=1e-5)
    brute = ref @ ref.T  # (10, 10) exact cosine
    np.testing.assert_allclose(np.sort(scores, axis=1)[:, ::-1], np.sort(brute, axis=1)[:, ::-1], atol=1e-5)


def test_incremental_add_change_delete_rename(tmp_path, encoder):
    folder = tmp_path / "imgs"
    photos = copy_samples(folder / "a", 6)
    first = _run(encoder, tmp_path / "db", folder)
    built = _index_file(tmp_path / "db", encoder.spec.name)
    assert first.embedded == 6 and built is not None

    again = _run(encoder, tmp_path / "db", folder)
    assert (again.embedded, again.unchanged, again.removed) == (0, 6, 0)
    assert _index_file(tmp_path / "db", encoder.spec.name) == built  # nothing changed: not rebuilt

    copy_samples(folder / "b", 2, start=50)  # 2 new
    shutil.copy2(sample_paths(1, start=60)[0], photos[0])  # 1 changed content
    photos[1].unlink()  # 1 deleted
    photos[2].rename(folder / "a" / "renamed.JPEG")  # same content, new path: reused, not embedded
    os.utime(photos[3], ns=(1, 1))  # touched: re-hashed, not embedded
    upd = _run(encoder, tmp_path / "db", folder)
    assert (upd.embedded, upd.reused, upd.removed, upd.unchanged) == (3, 2, 2, 2)
    with Store(tmp_path / "db") as store:
        assert store.item_count() == 7
        entry = store.manifest.encoders[encoder.spec.name]
        assert entry.index["count"] == 7 and entry.up_to_date(store.generation)
        assert store.get_item(str(photos[1])) is None


def test_bad_files_are_skipped_and_counted(tmp_path, encoder):
    folder = tmp_path / "imgs"
    copy_samples(folder, 3)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("hello")
    (folder / "trunc.jpg").write_bytes(sample_paths(1, start=5)[0].read_bytes()[:2000])
    (folder / "readme.txt").write_text("not scanned: wrong extension")
    report = _run(encoder, tmp_path / "db", folder)
    assert report.scanned == 6 and report.embedded == 3
    reasons = dict(report.skipped)
    assert set(reasons) == {str(folder / n) for n in ["empty.jpg", "text.jpg", "trunc.jpg"]}
    assert "empty file" in reasons[str(folder / "empty.jpg")]
    assert "truncated" in reasons[str(folder / "trunc.jpg")]


def test_killed_run_resumes_without_re_embedding(tmp_path, encoder):
    folder = tmp_path / "imgs"
    copy_samples(folder, 120)
    db = tmp_path / "db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "simsearch.cli", "index", str(folder), "--db", str(db), "--batch-size", "2",
         "--encoder", encoder.spec.name],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    stored = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (db / "manifest.json").exists():  # written last: the db is complete
            with Store(db, readonly=True) as s:
                stored = s.item_count()
            if stored >= 10:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    with Store(db, readonly=True) as s:
        stored = s.item_count()
    assert 10 <= stored < 120

    report = _run(encoder, db, folder)
    assert report.unchanged == stored and report.embedded == 120 - stored
    with Store(db) as s:
        assert s.manifest.encoders[encoder.spec.name].index["count"] == 120


def test_single_file_root(tmp_path, encoder):
    (photo,) = copy_samples(tmp_path, 1)
    assert _run(encoder, tmp_path / "db", photo).embedded == 1


def test_embed_files_caches_by_content_and_returns_vectors_in_order(tmp_path, encoder):
    photos = copy_samples(tmp_path / "imgs", 6)
    spec = encoder.spec
    with Store(tmp_path / "db", create=True) as store:
        indexer = Indexer(encoder, store, IndexerConfig(batch_size=4))
        first = indexer.embed_files(photos[:4])
        second = indexer.embed_files(photos[::-1])
        assert (first.embedded, second.embedded, second.unchanged) == (4, 2, 4)
        got = store.vectors_of(spec.key, [str(p) for p in photos[::-1]], spec.dim)
        assert spec.name not in store.manifest.encoders  # a file list is not an indexed collection
        with pytest.raises(Exception, match="no vector"):
            store.vectors_of(spec.key, [str(tmp_path / "other.jpg")], spec.dim)
    ref = encoder.embed(np.stack([to_input(load_rgb(p, decode_side(spec)), spec) for p in photos[::-1]]))
    np.testing.assert_allclose(got, ref, atol=1e-5)
