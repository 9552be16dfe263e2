"""`simsearch serve` for real: uvicorn in a child process on 127.0.0.1 (an ephemeral port), raw HTTP requests, and a
real `simsearch index` adding photos to the db while queries keep coming."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simsearch.benchmarks.load import Client, multipart, served
from simsearch.cli import app

from ..conftest import copy_samples
from .test_api import build_db

STATIC = Path(__file__).resolve().parents[2] / "server" / "static"
SECRET = "TOP-SECRET-MARKER-1f3a"


@pytest.fixture(scope="module")
def site(tmp_path_factory, encoder):
    """A db of 24 photos, a folder of 8 more photos not yet indexed, and a secret file beside the db."""
    root = tmp_path_factory.mktemp("serve")
    db = build_db(root, encoder)
    copy_samples(root / "later", 8, start=100)
    (root / "secret.txt").write_text(SECRET)
    return root, db


def get(client: Client, path: str) -> tuple[int, bytes]:
    return client.send("GET", path)


def test_serve_without_a_db_is_one_error_line(tmp_path):
    result = CliRunner().invoke(app, ["serve", "--db", str(tmp_path / "nodb"), "--port", "0"])
    assert result.exit_code == 1
    assert "error:" in result.output and "no simsearch db" in result.output and "Traceback" not in result.output


def test_serve_on_a_taken_port_is_one_error_line(site):
    _, db = site
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--db", str(db), "--port", str(port)])
    assert result.exit_code == 1 and "error:" in result.output and f"cannot listen on 127.0.0.1:{port}" in result.output


def test_nothing_outside_is_served(site):
    root, db = site
    secret = root / "secret.txt"
    outside = (STATIC.parent / "app.py").read_bytes()  # a real file right next to the static folder
    attempts = [
        "/static/../app.py", "/static/%2e%2e/app.py", "/static/%2E%2E%2Fapp.py", "/static/..%2fapp.py",
        "/static/../../../../../../etc/passwd", "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/static//etc/passwd", "/static/%2fetc%2fpasswd", f"/static/{secret}",
        f"/static/{urllib.parse.quote(str(secret), safe='')}",
        "/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", f"/{secret}",
        "/api/items/..%2f..%2fsecret.txt/image", "/api/items/%2e%2e/image", "/api/items/../../secret.txt",
        f"/api/items/{urllib.parse.quote(str(secret), safe='')}/image",
        f"/api/items/{urllib.parse.quote(str(secret), safe='')}/thumbnail",
        "/api/items/0%2f..%2f..%2fsecret.txt/image", "/api/items/0/../../secret.txt",
        f"/api/explain?a={urllib.parse.quote(str(secret))}&b=0", "/api/explain?a=../secret.txt&b=0",
        "/api/explain?a=/etc/passwd&b=0&format=png", f"/api/items?q={urllib.parse.quote(str(secret))}",
        "/api/items/0/similar?encoder=../../secret.txt",
    ]
    with served(db) as (url, _):
        client = Client(url)
        for path in attempts:
            status, body = get(client, path)
            assert SECRET.encode() not in body and b"root:x:0:0" not in body and outside[:200] not in body, path
            assert status >= 400 or path.startswith("/api/items?q="), (path, status)
        # names that select a model are registry names, never paths
        photo = (db.parent / "imgs" / "n01443537_goldfish.JPEG").read_bytes()
        body, headers = multipart("image", "../../secret.txt", photo)
        for query in ("rerank=../../secret.txt", f"rerank={urllib.parse.quote(str(root))}", "encoder=../secret.txt"):
            status, answer = client.send("POST", f"/api/query?{query}", body, headers)
            assert status == 404 and (b"unknown reranker" in answer or b"no vectors of encoder" in answer), \
                (query, answer)
            assert SECRET.encode() not in answer
        # the item routes do serve the items themselves
        status, body = get(client, "/api/items/0/image")
        assert status == 200 and body == Path(json.loads(get(client, "/api/items/0")[1])["path"]).read_bytes()
        for name in ("index.html", "app.js", "style.css"):
            if (STATIC / name).is_file():
                status, body = get(client, f"/static/{name}")
                assert status == 200 and body == (STATIC / name).read_bytes()


def test_an_oversized_upload_is_refused_before_it_is_read(site):
    _, db = site
    with served(db, extra=("--max-upload", "100K")) as (url, _):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as s:
            # 10 GiB announced, 1 KiB sent: the answer must come without the rest
            s.sendall(b"POST /api/query HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 10737418240\r\n\r\n" + b"\0" * 1024)
            t = time.monotonic()
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
            assert time.monotonic() - t < 10
        assert answer.startswith(b"HTTP/1.1 413") and b"upload larger than" in answer
        client = Client(url)  # the server is fine afterwards
        body, headers = multipart("image", "g.jpg", (db.parent / "imgs" / "n01443537_goldfish.JPEG").read_bytes())
        assert client.send("POST", "/api/query", body, headers)[0] == 200


@pytest.mark.parametrize("workers", [1, 2])
def test_a_running_index_is_picked_up_and_queries_never_fail(site, tmp_path, workers):
    """With workers, each follows the writer by itself: every answer from any of them is a 200 with hits."""
    root, site_db = site
    db = tmp_path / "db"
    shutil.copytree(site_db, db, ignore=shutil.ignore_patterns("thumbnails", "lock"))  # the 8 photos are new to it
    goldfish = (site_db.parent / "imgs" / "n01443537_goldfish.JPEG").read_bytes()
    upload = multipart("image", "goldfish.jpg", goldfish)
    with served(db, extra=("--workers", str(workers))) as (url, _):
        items_before = json.loads(get(Client(url), "/api/health")[1])["items"]
        stop = threading.Event()
        answers: list[tuple[str, int, int]] = []  # (what, status, hits)

        def ask(n: int) -> None:
            client = Client(url)
            while not stop.is_set():
                for what, (status, body) in (("similar", get(client, "/api/items/1/similar?k=5")),
                                             ("query", client.send("POST", "/api/query?k=5", *upload))):
                    hits = json.loads(body).get("hits", []) if status == 200 else []
                    answers.append((what, status, len(hits)))

        askers = [threading.Thread(target=ask, args=(n,)) for n in range(3)]
        for t in askers:
            t.start()
        try:
            index = subprocess.run([sys.executable, "-m", "simsearch.cli", "index", str(root / "later"), "--db",
                                    str(db), "--encoder", "efficientnet-lite0", "--batch-size", "2"],
                                   capture_output=True, text=True, timeout=300)
            time.sleep(0.5)  # a few more queries after the index is done
        finally:
            stop.set()
            for t in askers:
                t.join()
        assert index.returncode == 0, index.stderr
        assert len(answers) > 20
        failed = [a for a in answers if a[1] != 200 or a[2] == 0]
        assert not failed, failed[:5]
        client = Client(url)
        health = json.loads(get(client, "/api/health")[1])
        assert health["items"] == items_before + 8
        # a new photo is found: by upload, and as an item of the browse list
        new = sorted((root / "later").iterdir())[3]
        doc = json.loads(client.send("POST", "/api/query?k=3", *multipart("image", new.name, new.read_bytes()))[1])
        assert doc["hits"][0]["path"] == str(new) and doc["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        listed = json.loads(get(client, f"/api/items?q={urllib.parse.quote(new.name)}")[1])
        assert [i["path"] for i in listed["items"]] == [str(new)]
        similar = json.loads(get(client, f"/api/items/{listed['items'][0]['id']}/similar?k=3")[1])
        assert similar["hits"][0]["id"] == listed["items"][0]["id"]


def worker_pids(parent: int) -> set[int]:
    """The `serve --workers` processes of a parent (multiprocessing's spawned children, not its resource tracker)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def until(condition, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_workers_share_the_port_and_a_dead_one_is_replaced(site):
    _, db = site
    upload = multipart("image", "goldfish.jpg", (db.parent / "imgs" / "n01443537_goldfish.JPEG").read_bytes())
    with served(db, extra=("--workers", "2")) as (url, proc):
        first = worker_pids(proc.pid)
        assert len(first) == 2
        clients = [Client(url) for _ in range(6)]
        for client in clients:
            assert get(client, "/api/items/1/similar?k=3")[0] == 200
            assert client.send("POST", "/api/query?k=3", *upload)[0] == 200
        gone = min(first)
        os.kill(gone, signal.SIGKILL)
        until(lambda: len(worker_pids(proc.pid)) == 2 and gone not in worker_pids(proc.pid))
        for client in clients:  # a connection the dead worker held fails once, then reconnects
            for _ in range(2):
                try:
                    status, body = get(client, "/api/items/1/similar?k=3")
                    break
                except OSError:
                    continue
            assert status == 200 and json.loads(body)["hits"][0]["id"] == 1
        workers = worker_pids(proc.pid)
    until(lambda: not any(alive(pid) for pid in workers), 30)  # SIGTERM to the parent stops them all


def test_workers_end_with_their_parent(site):
    _, db = site
    with served(db, extra=("--workers", "2")) as (url, proc):
        workers = worker_pids(proc.pid)
        assert len(workers) == 2 and get(Client(url), "/api/health")[0] == 200
        proc.kill()  # no chance to stop them: they notice the parent's end of their pipe closing
        proc.wait()
        until(lambda: not any(alive(pid) for pid in workers), 30)


def test_workers_that_cannot_start_are_one_error_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "simsearch.cli", "serve", "--db", str(tmp_path / "nodb"), "--port", "0",
                        "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "no simsearch db" in lines[0], r.stderr
