"""The Milvus backend against a real Milvus Lite in tmp_path (and once a `milvus-lite server` over gRPC):
incremental mirroring, search equal to brute force, the Searcher and the CLI, and the errors a user meets."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("milvus_lite", reason="the milvus extra is not installed")

from simsearch.cli import app  # noqa: E402
from simsearch.indexer.store import Store  # noqa: E402
from simsearch.retrieval import milvus_backend  # noqa: E402
from simsearch.retrieval.check import check_db, repair_db  # noqa: E402
from simsearch.retrieval.backend import RefreshOutcome  # noqa: E402
from simsearch.retrieval.milvus_backend import MilvusBackend, MilvusState, collection_name  # noqa: E402
from simsearch.retrieval.search import Searcher  # noqa: E402

from ..conftest import copy_samples  # noqa: E402

runner = CliRunner()
NAME, KEY, DIM = "enc-a.v1", "enc-a-key", 32  # a name Milvus does not allow as it is


def unit(n: int, seed: int) -> np.ndarray:
    """(n, DIM) L2-normalised vectors around a few directions (structure like real embeddings)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, DIM))[rng.integers(0, 4, n)] + 0.7 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def put(store: Store, numbers, seed: int, tag: str = "") -> None:
    """Items /img/<i>.jpg with fresh vectors (a new tag = changed content)."""
    store.put_items(KEY, [(f"/img/{i}.jpg", f"sha-{i}{tag}", 1, 1, v) for i, v in zip(numbers, unit(len(numbers), seed))])


def stored(store: Store) -> dict[int, np.ndarray]:
    return {int(i): v for ids, vecs in store.iter_vector_blocks(KEY, DIM) for i, v in zip(ids, vecs)}


def sync_milvus(store: Store, name: str) -> RefreshOutcome:
    return MilvusBackend().refresh(store, name)


def state(store: Store) -> MilvusState:
    return MilvusState.of(store.manifest.encoders[NAME], NAME)


def mirrored(store: Store) -> dict[int, np.ndarray]:
    s = state(store)
    with milvus_backend._connect(milvus_backend.resolve_uri(store.root, s.uri), 10) as client:
        client.load_collection(s.collection)
        rows = client.query(s.collection, filter="id >= 0", output_fields=["id", "vector"], limit=16384)
    return {r["id"]: np.asarray(r["vector"], np.float32) for r in rows}


def assert_mirror_matches(store: Store) -> None:
    want, got = stored(store), mirrored(store)
    assert sorted(got) == sorted(want)
    for i, v in want.items():
        np.testing.assert_allclose(got[i], v, rtol=0, atol=1e-6)


def test_mirror_follows_the_store_incrementally(tmp_path):
    with Store(tmp_path / "db", create=True) as store:
        store.register_encoder(NAME, KEY, DIM, "crop")
        put(store, range(40), seed=0)
        before = time.time()
        built = sync_milvus(store, NAME)
        assert (built.action, built.backend, built.count) == ("built", "milvus", 40)
        assert_mirror_matches(store)
        assert store.manifest.encoders[NAME].backend == "milvus"
        assert state(store) == MilvusState("milvus.db", collection_name(store.root, NAME),
                                           {"M": 16, "efConstruction": 200, "ef": 128}, 40, state(store).synced_at)
        assert before <= state(store).synced_at <= time.time()  # after the sync's last write
        assert state(store).collection.startswith("simsearch_enc_a_v1_")

        put(store, range(40, 45), seed=1)  # 5 new
        put(store, [3, 4, 5], seed=2, tag="-edited")  # 3 changed in place (same ids)
        store.remove_items([f"/img/{i}.jpg" for i in (0, 10, 20, 30)])
        assert str(sync_milvus(store, NAME)) == "updated: 8 added or changed, 4 removed"
        assert_mirror_matches(store)
        assert state(store).count == 41 and store.manifest.encoders[NAME].up_to_date(store.generation)
        assert sync_milvus(store, NAME).action == "unchanged"  # nothing changed: nothing written


def test_mirror_is_rebuilt_when_the_log_is_gone_or_the_collection_differs(tmp_path):
    root = tmp_path / "db"
    with Store(root, create=True) as store:
        store.register_encoder(NAME, KEY, DIM, "crop")
        put(store, range(30), seed=0)
        sync_milvus(store, NAME)
        put(store, range(30, 33), seed=1)
        store.prune_changes(store.generation)  # the log no longer reaches back to the mirror
        assert str(sync_milvus(store, NAME)).startswith("rebuilt: the store's change log does not reach back")
        assert_mirror_matches(store)
        collection = state(store).collection
    with milvus_backend._connect(str(root / "milvus.db"), 10) as client:  # damage the mirror behind simsearch's back
        client.delete(collection, ids=[1, 2])
    findings, facts = check_db(root)
    assert [f.level for f in findings] == ["error"] and "holds 31 vectors, the manifest says 33" in findings[0].message
    ((name, outcome),) = repair_db(root)
    assert (name, outcome.action, outcome.count) == (NAME, "rebuilt", 33)
    assert outcome.reason == "the collection holds 31 vectors, the store 33"
    findings, facts = check_db(root)
    assert findings == [] and facts["indexes"][NAME]["vectors"] == 33
    with Store(root) as store:
        assert_mirror_matches(store)


def test_search_equals_brute_force(tmp_path):
    with Store(tmp_path / "db", create=True) as store:
        store.register_encoder(NAME, KEY, DIM, "crop")
        put(store, range(60), seed=0)
        store.remove_items(["/img/7.jpg"])
        sync_milvus(store, NAME)
        want = stored(store)
        index = MilvusBackend().open(store, NAME, store.manifest.encoders[NAME])
    ids = np.array(sorted(want))
    vecs = np.stack([want[i] for i in ids])  # (59, DIM)
    queries = unit(8, seed=5)
    brute = queries @ vecs.T  # (8, 59); exact equality holds: with ef (128) above n, HNSW visits every node
    order = np.argsort(-brute, axis=1, kind="stable")
    try:
        assert index.ntotal == 59
        scores, got = index.search(queries, 10)
        np.testing.assert_array_equal(got, ids[order[:, :10]])
        np.testing.assert_allclose(scores, np.take_along_axis(brute, order[:, :10], 1), atol=1e-5)
        scores, got = index.search(queries, 100)  # more than it holds: all of them, best first
        assert got.shape == (8, 59) and (got >= 0).all()
        np.testing.assert_array_equal(got, ids[order])
    finally:
        index.close()


# -- through the CLI and the Searcher, on real photos ----------------------------------------------

@pytest.fixture(scope="module")
def lite_db(tmp_path_factory, models_dir):
    """12 photos (the tench and the goldfish first) indexed with --backend milvus into <db>/milvus.db."""
    root = tmp_path_factory.mktemp("milvus_cli")
    copy_samples(root / "imgs", 12)
    result = runner.invoke(app, ["index", str(root / "imgs"), "--db", str(root / "db"), "--backend", "milvus"])
    assert result.exit_code == 0, result.output
    return root


def test_cli_index_info_query_on_milvus(lite_db):
    db = lite_db / "db"
    info = json.loads(runner.invoke(app, ["info", "--db", str(db), "--json"]).stdout)
    (name, enc), = info["encoders"].items()
    assert enc == {**enc, "backend": "milvus", "backend_uri": str(db / "milvus.db"), "index_type": "hnsw",
                   "vectors_in_index": 12, "index_up_to_date": True, "index_file": None, "index_problem": None}
    assert not list((db / "index").iterdir())  # no FAISS file was built
    goldfish = lite_db / "imgs" / "n01443537_goldfish.JPEG"
    result = runner.invoke(app, ["query", str(goldfish), "-k", "3", "--db", str(db), "--json", "--backend", "milvus"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)["results"][0]["hits"]
    assert hits[0]["path"] == str(goldfish) and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert "n01440764_tench" in hits[1]["path"]
    result = runner.invoke(app, ["info", "--db", str(db)])
    assert "milvus" in result.stdout and "hnsw" in result.stdout


def test_searcher_over_a_milvus_db_equals_brute_force(lite_db):
    with Searcher.open(lite_db / "db") as searcher:
        entry = searcher.store.manifest.encoders[searcher.name]
        ids, vecs = next(searcher.store.iter_vector_blocks(entry.key, entry.dim))
        hits = searcher.search_vectors(vecs[:4], 5)
        paths = searcher.store.paths_of(ids)
    brute = vecs[:4] @ vecs.T
    order = np.argsort(-brute, axis=1, kind="stable")[:, :5]
    assert [[h.id for h in row] for row in hits] == ids[order].tolist()
    assert [[h.path for h in row] for row in hits] == [[paths[j] for j in row] for row in order]
    np.testing.assert_allclose([[h.score for h in row] for row in hits], np.take_along_axis(brute, order, 1), atol=1e-5)


def test_cli_updates_the_mirror_then_switches_back_to_faiss(tmp_path, models_dir):
    imgs, db = tmp_path / "imgs", tmp_path / "db"
    files = copy_samples(imgs, 6)
    assert runner.invoke(app, ["index", str(imgs), "--db", str(db), "--backend", "milvus"]).exit_code == 0
    files[0].unlink()
    copy_samples(imgs, 2, start=6)
    result = runner.invoke(app, ["index", str(imgs), "--db", str(db), "-v"])  # the db says milvus
    assert result.exit_code == 0, result.output
    assert "index updated: 2 added or changed, 1 removed" in result.output
    check = runner.invoke(app, ["check", "--db", str(db), "--json"])
    assert check.exit_code == 0 and json.loads(check.stdout)["facts"]["indexes"] == {
        name: {"vectors": 7, "backend": "milvus", "uri": "milvus.db"} for name in json.loads(check.stdout)["facts"]["indexes"]}
    result = runner.invoke(app, ["query", str(files[1]), "--db", str(db), "--backend", "faiss"])
    assert result.exit_code == 1 and "searched with milvus, not faiss" in result.output
    result = runner.invoke(app, ["index", str(imgs), "--db", str(db), "--backend", "faiss"])
    assert result.exit_code == 0, result.output
    (enc,) = json.loads(runner.invoke(app, ["info", "--db", str(db), "--json"]).stdout)["encoders"].values()
    assert enc["backend"] == "faiss" and enc["index_file"] and enc["vectors_in_index"] == 7 and enc["index_up_to_date"]
    result = runner.invoke(app, ["query", str(files[1]), "-k", "1", "--db", str(db), "--json"])
    assert json.loads(result.stdout)["results"][0]["hits"][0]["path"] == str(files[1])


@pytest.mark.parametrize("args, message", [
    (["query", "{img}", "--db", "{db}", "--uri", "http://127.0.0.1:1"],
     "cannot connect to Milvus at http://127.0.0.1:1"),
    (["index", "{imgs}", "--db", "{copy}", "--backend", "milvus", "--uri", "http://127.0.0.1:1"],
     "cannot connect to Milvus at http://127.0.0.1:1"),
    (["index", "{imgs}", "--db", "{copy}", "--backend", "milvus", "--milvus-uri", "{tmp}/vectors.txt"],
     "a Milvus Lite file's name ends in .db"),
    (["index", "{imgs}", "--db", "{copy}", "--backend", "faiss", "--milvus-uri", "x.db"], "--uri goes with"),
    (["query", "{img}", "--db", "{db}", "--milvus-uri", "{tmp}/nowhere/x.db"], "cannot connect to Milvus at"),
])
def test_milvus_mistakes_give_one_line_and_exit_1(lite_db, tmp_path, args, message):
    copy = tmp_path / "copy"
    shutil.copytree(lite_db / "db", copy)
    fmt = {"img": str(lite_db / "imgs" / "n01443537_goldfish.JPEG"), "imgs": str(lite_db / "imgs"),
           "db": str(lite_db / "db"), "copy": str(copy), "tmp": str(tmp_path)}
    result = runner.invoke(app, [a.format(**fmt) for a in args])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lite_file_held_by_a_server_is_named_and_served_over_grpc(lite_db):
    """A `milvus-lite server` on the db's file holds its lock: the file is then in use, and the server answers."""
    lite, port = lite_db / "db" / "milvus.db", _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "milvus-lite"), "server", "--data-dir", str(lite),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert server.poll() is None and time.monotonic() < deadline, "milvus-lite server did not start"
            time.sleep(0.1)
        goldfish = str(lite_db / "imgs" / "n01443537_goldfish.JPEG")
        result = runner.invoke(app, ["query", goldfish, "--db", str(lite_db / "db")])
        assert result.exit_code == 1 and "in use by another process" in result.output
        assert "Traceback" not in result.output
        result = runner.invoke(app, ["query", goldfish, "-k", "2", "--db", str(lite_db / "db"), "--json",
                                     "--milvus-uri", f"http://127.0.0.1:{port}"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["results"][0]["hits"][0]["path"] == goldfish
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_faiss_query_never_imports_pymilvus(tmp_path, models_dir):
    copy_samples(tmp_path / "imgs", 3)
    assert runner.invoke(app, ["index", str(tmp_path / "imgs"), "--db", str(tmp_path / "db")]).exit_code == 0
    code = ("import sys\nfrom simsearch.cli import main\n"
            f"sys.argv = ['simsearch', 'query', {str(tmp_path / 'imgs')!r}, '--db', {str(tmp_path / 'db')!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in {'pymilvus', 'milvus_lite'}]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
