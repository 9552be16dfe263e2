"""The Milvus backend against a real Milvus standalone server on loopback (the binary the `milvus` package ships,
2.3.5; its data in the session's tmp folder), beside the Milvus Lite tests of test_milvus.py: the mirror and its
searches equal the store and brute force, deletions reach the server, a restart or a crash of the server loses
nothing, credentials come from the environment, and several simsearch processes share one server.

One server serves the whole session: it takes about 10 s to start. It skips only where its binary cannot run
(not Linux x86_64, or the dev extra not installed); with $CI set it fails instead."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.errors import SimsearchError
from simsearch.indexer.pipeline import Indexer
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import RefreshConfig, refresh
from simsearch.retrieval.check import check_db
from simsearch.retrieval.milvus_backend import TOKEN_ENV, MilvusBackend, MilvusState
from simsearch.retrieval.search import Searcher

from ..conftest import copy_samples, query_while

runner = CliRunner()
NAME, KEY, DIM = "enc-a.v1", "enc-a-key", 32
PID_FILES = (Path("/run/milvus/standalone.pid"), Path("/tmp/milvus/standalone.pid"))  # where the binary locks one


# -- the server --------------------------------------------------------------------------------------

def _cannot_run() -> str | None:
    """Why the `milvus` package's server cannot run here, or None."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"the milvus package ships its server binary for Linux x86_64 only (this is {sys.platform} " \
               f"{platform.machine()})"
    try:
        import milvus  # noqa: F401
        import pymilvus  # noqa: F401
    except ImportError as e:
        return f"no Milvus server binary: {e.name} is not installed (pip install -e '.[milvus,dev]')"
    return None


def _lock_holder() -> str | None:
    """The pid of another Milvus standalone on this machine: each locks a pid file in a fixed folder, so a second
    one never becomes ready."""
    for pid_file in PID_FILES:
        try:
            fd = os.open(pid_file, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return f"pid {pid_file.read_text().strip()} holds {pid_file}"
        finally:
            os.close(fd)
    return None


class MilvusStandalone:
    """One Milvus standalone process on 127.0.0.1, its data in `data_dir`; `restart` keeps the data and the port."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.port: int | None = None
        self.start_seconds: list[float] = []
        self._server = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, **config) -> None:
        """config: the package's template keys (authorization_enabled=True, ...)."""
        from milvus import MilvusServer, MilvusServerConfig

        class Config(MilvusServerConfig):
            def try_bind_port(self, port):
                """The package's port probe, with SO_REUSEADDR as the server's own (Go) listeners have: a port a
                stopped server left in TIME_WAIT is free to it, so a restart keeps its port."""
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                    sock.listen()
                    return sock
                except OSError:
                    sock.close()
                    return None

        holder = _lock_holder()
        if holder:
            raise RuntimeError(f"another Milvus standalone runs on this machine ({holder}); one machine runs one")
        cfg = Config(data_dir=str(self.data_dir), **({"proxy_port": self.port} if self.port else {}))
        for key, value in config.items():
            cfg.set(key, value)
        # Its graceful stop waits up to 30 min for coordinators that never answer once the others are gone (2.3.5):
        # it then force-quits on its own.
        cfg.set("common.gracefulStopTimeout", 5)
        server = MilvusServer(cfg, wait_for_started=False)
        t = time.monotonic()
        server.start()
        try:
            server.wait_started(timeout=120_000)
        except (TimeoutError, RuntimeError) as e:
            server.stop()
            log = (self.data_dir / "logs" / "milvus-stderr.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the Milvus server did not start: {e}\n{log}") from None
        self.start_seconds.append(time.monotonic() - t)
        self._server, self.port = server, server.listen_port
        logging.getLogger(__name__).info("Milvus %s started in %.1f s", self.uri, self.start_seconds[-1])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self._server.server_proc = self._server.server_proc, None
        proc.send_signal(sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        self._server.stop()  # closes its log files
        self._server = None

    def restart(self, sig: int = signal.SIGTERM, **config) -> None:
        self.stop(sig)
        self.start(**config)


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    reason = _cannot_run()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must run the Milvus server tests")
        pytest.skip(reason)
    server = MilvusStandalone(tmp_path_factory.mktemp("milvus-server"))
    server.start()
    yield server
    if server._server is not None:
        server.stop()
    shutil.rmtree(server.data_dir / "bin", ignore_errors=True)  # the unpacked binary and its libraries: 250 MB


# -- helpers ------------------------------------------------------------------------------------------

def unit(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    """(n, dim) L2-normalised vectors around a few directions (structure like real embeddings)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((8, dim))[rng.integers(0, 8, n)] + 0.7 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def put(store: Store, numbers, seed: int, tag: str = "", dim: int = DIM) -> None:
    """Items /img/<i>.jpg with fresh vectors (a new tag = changed content)."""
    store.put_items(KEY, [(f"/img/{i}.jpg", f"sha-{i}{tag}", 1, 1, v)
                          for i, v in zip(numbers, unit(len(numbers), seed, dim))])


def stored(store: Store, key: str = KEY, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    """The store's ids (n,) ascending and their vectors (n, dim)."""
    blocks = list(store.iter_vector_blocks(key, dim))
    ids = np.concatenate([b[0] for b in blocks])
    vecs = np.concatenate([b[1] for b in blocks])
    order = np.argsort(ids)
    return ids[order], vecs[order]


def mirrored(uri: str, collection: str) -> tuple[np.ndarray, np.ndarray]:
    """What the server holds, asked without simsearch: ids (n,) ascending and vectors (n, dim)."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri, token=os.environ.get(TOKEN_ENV, ""))
    try:
        client.load_collection(collection)
        rows = client.query(collection, filter="id >= 0", output_fields=["id", "vector"], limit=16384,
                            consistency_level="Strong")
    finally:
        client.close()
    rows.sort(key=lambda r: r["id"])
    return (np.array([r["id"] for r in rows], dtype=np.int64),
            np.array([r["vector"] for r in rows], dtype=np.float32).reshape(len(rows), -1))


def assert_mirror_matches(store: Store, uri: str, name: str = NAME, key: str = KEY, dim: int = DIM) -> None:
    want_ids, want = stored(store, key, dim)
    got_ids, got = mirrored(uri, MilvusState.of(store.manifest.encoders[name], name).collection)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def assert_search_is_brute_force(index, ids: np.ndarray, vecs: np.ndarray, queries: np.ndarray) -> None:
    """Top 10 and everything (k over the count) against an exact sort of the stored vectors. Exact equality holds
    below 1,024 vectors: a segment that small is never indexed, the server scans it."""
    brute = queries @ vecs.T  # (Q, n)
    order = np.argsort(-brute, axis=1, kind="stable")
    scores, got = index.search(queries, 10)
    np.testing.assert_array_equal(got, ids[order[:, :10]])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, order[:, :10], 1), atol=1e-5)
    scores, got = index.search(queries, len(ids) + 50)
    np.testing.assert_array_equal(got, ids[order])


# -- index, query, delete -----------------------------------------------------------------------------

def test_mirror_search_and_deletes_equal_the_store(milvus_server, tmp_path):
    uri = milvus_server.uri
    with Store(tmp_path / "db", create=True) as store:
        store.register_encoder(NAME, KEY, DIM, "crop")
        put(store, range(80), seed=0)
        store.remove_items(["/img/7.jpg", "/img/8.jpg"])
        built = MilvusBackend().refresh(store, NAME, RefreshConfig(uri=uri))
        assert (built.action, built.backend, built.count) == ("built", "milvus", 78)
        assert MilvusState.of(store.manifest.encoders[NAME], NAME).uri == uri  # a server's URI is kept as given
        assert_mirror_matches(store, uri)
        index = MilvusBackend().open(store, NAME, store.manifest.encoders[NAME])
        try:
            assert index.ntotal == 78
            assert_search_is_brute_force(index, *stored(store), unit(6, seed=5))

            put(store, range(80, 90), seed=1)  # 10 new
            put(store, [3, 4, 5, 6, 9], seed=2, tag="-edited")  # 5 changed in place (same ids)
            gone = [store.get_item(f"/img/{i}.jpg").id for i in (0, 10, 20, 30, 40, 50)]
            store.remove_items([f"/img/{i}.jpg" for i in (0, 10, 20, 30, 40, 50)])
            # the next `index` reads the recorded URI: none given
            assert str(MilvusBackend().refresh(store, NAME)) == "updated: 15 added or changed, 6 removed"
            assert_mirror_matches(store, uri)
            assert index.ntotal == 82  # the index opened before the update sees it
            ids, vecs = stored(store)
            assert not set(gone) & set(ids.tolist())
            assert_search_is_brute_force(index, ids, vecs, np.concatenate([unit(6, seed=6), vecs[:2]]))
        finally:
            index.close()
        assert MilvusBackend().refresh(store, NAME).action == "unchanged"
    findings, facts = check_db(tmp_path / "db")
    assert findings == [] and facts["indexes"][NAME] == {"vectors": 82, "backend": "milvus", "uri": uri}


def test_a_built_collection_is_sealed_and_indexed_at_once(milvus_server, tmp_path):
    """Above 1,024 vectors the server builds HNSW on sealed segments only: the build flushes, so it does so now
    rather than after its 10-minute sync period; its answers then stay close to brute force."""
    from pymilvus import MilvusClient

    n, dim = 3000, 64
    with Store(tmp_path / "db", create=True) as store:
        store.register_encoder(NAME, KEY, dim, "crop")
        put(store, range(n), seed=3, dim=dim)
        MilvusBackend().refresh(store, NAME, RefreshConfig(uri=milvus_server.uri))
        collection = MilvusState.of(store.manifest.encoders[NAME], NAME).collection
        ids, vecs = stored(store, dim=dim)
        index = MilvusBackend().open(store, NAME, store.manifest.encoders[NAME])
    client = MilvusClient(uri=milvus_server.uri)
    try:
        deadline = time.monotonic() + 90
        while (described := client.describe_index(collection, "vector"))["indexed_rows"] < n:
            assert time.monotonic() < deadline, described
            time.sleep(0.5)
    finally:
        client.close()
    assert (described["index_type"], described["metric_type"], described["M"]) == ("HNSW", "IP", "16")
    queries = vecs[:100] + 0.2 * unit(100, seed=4, dim=dim)
    truth = ids[np.argsort(-(queries @ vecs.T), axis=1)[:, :10]]
    try:
        assert index.ntotal == n
        _, got = index.search(queries, 10)
    finally:
        index.close()
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), truth.tolist())])
    assert recall >= 0.95, recall


def test_searches_do_not_wait_for_a_time_tick(milvus_server, tmp_path):
    """Searches and counts ask for the state of the last sync, which the server has applied, rather than Strong's
    newest, which waits for the server's next time tick (200 ms on 2.3.5) on every call. A db whose state has no
    sync time (written by an older simsearch) still searches, with Strong, and gets the same answers."""
    with Store(tmp_path / "db", create=True) as store:
        store.register_encoder(NAME, KEY, DIM, "crop")
        put(store, range(50), seed=0)
        MilvusBackend().refresh(store, NAME, RefreshConfig(uri=milvus_server.uri))
        entry = store.manifest.encoders[NAME]
        older = dataclasses.replace(entry, index={k: v for k, v in entry.index.items() if k != "synced_at"})
        assert MilvusState.of(older, NAME).synced_at == 0.0
        fresh, strong = (MilvusBackend().open(store, NAME, e) for e in (entry, older))
    queries = unit(1, seed=9)
    try:
        assert fresh.ntotal == strong.ntotal == 50
        np.testing.assert_array_equal(fresh.search(queries, 10)[1], strong.search(queries, 10)[1])
        seconds = []
        for _ in range(20):
            t = time.perf_counter()
            fresh.search(queries, 10)
            seconds.append(time.perf_counter() - t)
    finally:
        fresh.close()
        strong.close()
    assert np.median(seconds) < 0.1, seconds


def test_cli_on_a_server(milvus_server, tmp_path, models_dir):
    """index, info, query, check on real photos; a deleted photo leaves the collection; query equals brute force."""
    imgs, db = tmp_path / "imgs", tmp_path / "db"
    files = copy_samples(imgs, 8)
    result = runner.invoke(app, ["index", str(imgs), "--db", str(db), "--uri", milvus_server.uri])
    assert result.exit_code == 0, result.output
    (enc,) = json.loads(runner.invoke(app, ["info", "--db", str(db), "--json"]).stdout)["encoders"].values()
    assert enc == {**enc, "backend": "milvus", "backend_uri": milvus_server.uri, "index_type": "hnsw",
                   "vectors_in_index": 8, "index_up_to_date": True, "index_file": None}
    files[3].unlink()
    result = runner.invoke(app, ["index", str(imgs), "--db", str(db)])
    assert result.exit_code == 0 and "1 removed" in result.output, result.output
    result = runner.invoke(app, ["query", str(files[0]), "-k", "10", "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    answer = document["results"][0]
    assert document["k"] == 7 and answer["hits"][0]["path"] == str(files[0])
    assert str(files[3]) not in [h["path"] for h in answer["hits"]]
    with Searcher.open(db) as searcher:
        entry = searcher.store.manifest.encoders[searcher.name]
        ids, vecs = stored(searcher.store, entry.key, entry.dim)
        assert_mirror_matches(searcher.store, milvus_server.uri, searcher.name, entry.key, entry.dim)
        hits = searcher.search_vectors(vecs, 7)
    brute = vecs @ vecs.T
    order = np.argsort(-brute, axis=1, kind="stable")
    assert [[h.id for h in row] for row in hits] == ids[order].tolist()
    np.testing.assert_allclose([[h.score for h in row] for row in hits], np.take_along_axis(brute, order, 1),
                               atol=1e-5)
    check = runner.invoke(app, ["check", "--db", str(db), "--json"])
    assert check.exit_code == 0, check.output
    assert list(json.loads(check.stdout)["facts"]["indexes"].values()) == [
        {"vectors": 7, "backend": "milvus", "uri": milvus_server.uri}]


# -- restarts ------------------------------------------------------------------------------------------

def _synthetic_db(root: Path, uri: str) -> None:
    """60 vectors mirrored to the server, then 5 added, 3 changed, 4 removed (an update on top of the build)."""
    with Store(root, create=True) as store:
        store.register_encoder(NAME, KEY, DIM, "crop")
        put(store, range(60), seed=0)
        MilvusBackend().refresh(store, NAME, RefreshConfig(uri=uri))
        put(store, range(60, 65), seed=1)
        put(store, [1, 2, 3], seed=2, tag="-edited")
        store.remove_items([f"/img/{i}.jpg" for i in (10, 20, 30, 40)])
        assert MilvusBackend().refresh(store, NAME).action == "updated"


def _assert_all_there(root: Path, uri: str, index) -> None:
    with Store(root) as store:
        assert_mirror_matches(store, uri)
        ids, vecs = stored(store)
    assert index.ntotal == 61
    assert_search_is_brute_force(index, ids, vecs, unit(5, seed=7))


def test_a_restarted_server_loses_nothing(milvus_server, tmp_path):
    """Stopped (SIGTERM) and started on the same data: every vector is there, an index held open across the
    restart (as `simsearch serve` holds one) answers again, and the next `index` updates the collection in place."""
    root = tmp_path / "db"
    _synthetic_db(root, milvus_server.uri)
    with Store(root) as store:
        held = MilvusBackend().open(store, NAME, store.manifest.encoders[NAME])
    try:
        assert held.ntotal == 61
        milvus_server.restart(signal.SIGTERM)
        _assert_all_there(root, milvus_server.uri, held)
    finally:
        held.close()
    with Store(root) as store:
        put(store, range(65, 70), seed=3)
        assert str(MilvusBackend().refresh(store, NAME)) == "updated: 5 added or changed, 0 removed"
        assert_mirror_matches(store, milvus_server.uri)
    findings, facts = check_db(root)
    assert findings == [] and facts["indexes"][NAME]["vectors"] == 66


def test_a_killed_server_loses_nothing_and_credentials_come_from_the_environment(milvus_server, tmp_path,
                                                                              monkeypatch):
    """SIGKILL, then started again with authentication on: every vector is there for a client with the token in
    SIMSEARCH_MILVUS_TOKEN; without it, or with credentials in the URI, one clear error."""
    root = tmp_path / "db"
    _synthetic_db(root, milvus_server.uri)
    milvus_server.restart(signal.SIGKILL, authorization_enabled=True)
    try:
        for token in (None, "root:wrong"):
            if token:
                monkeypatch.setenv(TOKEN_ENV, token)
            else:
                monkeypatch.delenv(TOKEN_ENV, raising=False)
            with Store(root) as store:
                index = MilvusBackend().open(store, NAME, store.manifest.encoders[NAME])
            with pytest.raises(SimsearchError) as e:
                index.ntotal
            index.close()
            assert f"Milvus at {milvus_server.uri}" in str(e.value) and TOKEN_ENV in str(e.value)
        with Store(root) as store:
            with pytest.raises(SimsearchError, match=f"without credentials .* {TOKEN_ENV}"):
                MilvusBackend().open(store, NAME, store.manifest.encoders[NAME],
                                     uri=f"http://root:Milvus@127.0.0.1:{milvus_server.port}")
        imgs = tmp_path / "imgs"
        copy_samples(imgs, 1)
        result = runner.invoke(app, ["index", str(imgs), "--db", str(tmp_path / "other"),
                                     "--uri", f"http://root:Milvus@127.0.0.1:{milvus_server.port}"])
        assert result.exit_code == 1 and result.output.count("error:") == 1 and TOKEN_ENV in result.output
        assert not (tmp_path / "other").exists()  # refused before any work

        monkeypatch.setenv(TOKEN_ENV, "root:Milvus")
        with Store(root) as store:
            index = MilvusBackend().open(store, NAME, store.manifest.encoders[NAME])
        try:
            _assert_all_there(root, milvus_server.uri, index)
        finally:
            index.close()
        findings, _ = check_db(root)
        assert findings == []
    finally:
        milvus_server.restart(signal.SIGTERM)  # as the other tests expect it: no authentication


# -- several processes on one server --------------------------------------------------------------------

_WRITER = """
import shutil, sys
from pathlib import Path
from simsearch.encoders.runtime import OnnxEncoder
from simsearch.encoders.registry import get_encoder
from simsearch.indexer.pipeline import Indexer
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import refresh

db, folder, pool, cycles = Path(sys.argv[1]), Path(sys.argv[2]), sorted(Path(sys.argv[3]).iterdir()), int(sys.argv[4])
enc = OnnxEncoder(get_encoder("efficientnet-lite0"))
for c in range(cycles):
    batch = pool[(c % 3) * 3:(c % 3) * 3 + 3]
    for p in batch:
        shutil.copy2(p, folder / p.name)
    for step in ("add", "remove"):
        with Store(db) as store:
            Indexer(enc, store).run(folder)
            print(refresh(store, enc.spec.name), flush=True)  # the backend and URI the db records
        if step == "add":
            for p in batch:
                (folder / p.name).unlink()
"""


def test_processes_share_a_server(milvus_server, tmp_path, encoder, caplog):
    """While one process adds and removes photos in db A and another indexes db B into the same server, this
    process queries db A: every query answers, with the right photo first; then each collection holds its own
    store's vectors."""
    a_imgs, pool, b_imgs = tmp_path / "a", tmp_path / "pool", tmp_path / "b"
    stable = copy_samples(a_imgs, 5)  # in db A throughout
    copy_samples(pool, 9, start=5)  # added and removed by the writer
    copy_samples(b_imgs, 10, start=14)
    spec = encoder.spec
    with Store(tmp_path / "db-a", create=True) as store:
        Indexer(encoder, store).run(a_imgs)
        refresh(store, encoder.spec.name, RefreshConfig(uri=milvus_server.uri), backend="milvus")

    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "db-a"), str(a_imgs), str(pool), "3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    other = subprocess.Popen([sys.executable, "-c", "from simsearch.cli import main; main()", "index", str(b_imgs),
                              "--db", str(tmp_path / "db-b"), "--encoder", spec.name, "--uri", milvus_server.uri],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    caplog.set_level(logging.WARNING, logger="simsearch")
    try:
        t = query_while(writer, tmp_path / "db-a", encoder, stable, rounds=3, timeout_s=300)
        out, err = writer.communicate(timeout=60)
        other_out, other_err = other.communicate(timeout=300)
    finally:
        for proc in (writer, other):
            if proc.poll() is None:
                proc.kill()
    assert writer.returncode == 0, err[-3000:]
    assert out.splitlines() == ["updated: 3 added or changed, 0 removed", "updated: 0 added or changed, 3 removed"] * 3
    assert other.returncode == 0, other_err[-3000:]
    assert t.queries >= 50 and (t.failures, t.empty, t.wrong) == (0, 0, 0), t
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "older than the db" not in r.message]

    collections = set()
    for db, n in (("db-a", 5), ("db-b", 10)):
        findings, facts = check_db(tmp_path / db)
        assert findings == [] and list(facts["indexes"].values()) == [
            {"vectors": n, "backend": "milvus", "uri": milvus_server.uri}]
        with Store(tmp_path / db) as store:
            entry = store.manifest.encoders[spec.name]
            assert_mirror_matches(store, milvus_server.uri, spec.name, entry.key, entry.dim)
            collections.add(MilvusState.of(entry, spec.name).collection)
    assert len(collections) == 2
