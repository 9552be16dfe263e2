"""The load benchmark: its load driver against a fake clock (cheap), and the whole run at a tiny size behind `slow`
(the real server in a child process, real photos and vectors): figures are not judged there, only that they are
measured, bounded, and shown as the JSON has them."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from simsearch.benchmarks import load
from simsearch.benchmarks.__main__ import main

from .clocks import TickClock


@pytest.mark.slow
def test_every_row_is_measured_without_errors(tmp_path, models_dir, capsys):
    out = tmp_path / "load.json"
    main(["load", "--max-images", "12", "--vectors", "2000", "--max-requests", "10", "--max-seconds", "2",
          "--rounds", "2", "--concurrency", "1,2", "--workers", "1,2", "--work-dir", str(tmp_path),
          "--models-dir", str(models_dir), "--out", str(out)], standalone_mode=False)
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [(r["db"], r["operation"], r["concurrency"], r["workers"]) for r in rows] == [
        (db, op, c, w) for db in ("demo", "2k") for op in ("similar", "query") for c in (1, 2) for w in (1, 2)]
    assert {r["db"]: r["items"] for r in rows} == {"demo": 12, "2k": 2000}
    shown = capsys.readouterr().out
    for r in rows:
        assert r["errors"] == 0 and 0 < r["requests"] <= 10 and r["in_process"]["errors"] == 0
        assert 0 < r["p50_ms"] <= r["p95_ms"] and 0 < r["in_process"]["requests"] <= 10
        assert 0 <= r["load_average"][0] <= r["load_average"][1] and r["server_cpu_ms_per_request"] >= 0
        # CPU is counted in clock ticks (10 ms): ten uploads take more than one, ten "similar" may take less
        assert r["server_cpu_ms_per_request"] > 0 or r["operation"] == "similar"
        cells = (f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}", f"{r['rps']:.0f}", f"{r['in_process']['rps']:.0f}",
                 f"{r['ratio']:.2f}x")
        assert all(c in shown for c in cells), (cells, r)
    # the same baseline for both servers of one (db, operation, concurrency): they took turns with it
    assert all(a["in_process"] == b["in_process"] for a, b in zip(rows[::2], rows[1::2]))
    assert doc["machine"]["omp_wait_policy"] == "PASSIVE" and doc["machine"]["cpu"] in shown
    targets = {(t["db"], t["target"]): t for t in doc["targets"]}
    assert targets[("demo, 1 workers", "similar p50 <= 5 ms at concurrency 1")]["value"] == rows[0]["p50_ms"]
    assert targets[("all", "no errors")] == {"db": "all", "target": "no errors", "value": 0, "met": True}


def test_the_targets_are_the_issues():
    rows = [{"db": "demo", "workers": w, "operation": op, "concurrency": c, "p50_ms": 1.0, "errors": 0,
             "ratio": ratio, "server_cpu_ms_per_request": cpu}
            for w, ratio, cpu in ((1, 0.85, 0.3), (2, 0.84, 0.31)) for op in ("similar", "query") for c in (1, 16)]
    met = {(t["db"], t["target"]): t["met"] for t in load._judge(rows)}
    assert met == {
        ("demo, 1 workers", "similar p50 <= 5 ms at concurrency 1"): True,
        ("demo, 1 workers", "similar server CPU ms/request at concurrency 16 <= 0.3"): True,
        ("demo, 1 workers", "query req/s at concurrency 16 >= 0.85x in-process"): True,
        ("demo, 2 workers", "similar p50 <= 5 ms at concurrency 1"): True,
        ("demo, 2 workers", "similar server CPU ms/request at concurrency 16 <= 0.3"): False,
        ("demo, 2 workers", "query req/s at concurrency 16 >= 0.85x in-process"): False,
        ("all", "no errors"): True}


def test_sides_take_turns_in_slices():
    """Two sides, 3 rounds: each side's slices alternate with the other's, each slice a third of the requests."""
    order = []
    sides = [load.Side(name, lambda w, i, name=name: order.append(name) or True) for name in ("a", "b")]
    a, b = load.take_turns(sides, 1, max_requests=9, max_seconds=60, rounds=3)
    assert order == ["a", "a", "b", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert len(a.latencies) == len(b.latencies) == 9 and a.errors == b.errors == 0 and a.cpu is None
    assert a.summary()["requests"] == 9 and len(a.loads) == 6


def test_latencies_and_rate_against_a_fake_clock():
    # One thread, 10 requests, a clock moving 5 ms a reading: the start, then per request a deadline check and
    # the two readings around it (one tick each), then the end: 32 readings, 31 ticks.
    clock = TickClock(0.005)
    r = load.drive(lambda w, i: i != 3, 1, max_requests=10, max_seconds=60, clock=clock)
    assert clock.readings == 32
    assert r == pytest.approx({"requests": 10, "seconds": 31 * 0.005, "rps": 10 / (31 * 0.005), "p50_ms": 5.0,
                               "p95_ms": 5.0, "errors": 1})


def test_runs_stop_by_count_and_by_time():
    calls = []
    r = load.drive(lambda w, i: calls.append(i) or True, 4, max_requests=50, max_seconds=60)
    assert r["requests"] == 50 == len(calls) and r["errors"] == 0
    t = time.monotonic()
    r = load.drive(lambda w, i: time.sleep(0.01) or True, 2, max_requests=10**9, max_seconds=0.5)
    assert time.monotonic() - t < 2 and 0 < r["requests"] < 200
    r = load.drive(lambda w, i: i % 5 != 0 and 1 / 0, 1, max_requests=20, max_seconds=60)  # exceptions are errors
    assert r["errors"] == 20 and r["requests"] == 20


def test_server_cpu_counts_its_children():
    """`serve --workers`: the parent's CPU and its workers' together (Linux /proc)."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\ntime.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", burn])
    try:
        deadline = time.monotonic() + 60
        while (load._cpu_seconds(child.pid) or 0) < 0.5:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        own = sum(os.times()[:2])
        assert load._cpu_seconds(os.getpid()) - own >= 0.45
    finally:
        child.kill()
        child.wait()
    assert load._cpu_seconds(child.pid) is None


class KeepAlive(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive, closing a connection idle for 0.3 s (as uvicorn does after 5 s)."""

    protocol_version = "HTTP/1.1"
    timeout = 0.3

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def test_a_client_reopens_a_connection_left_idle(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), KeepAlive)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.setattr(load, "STALE_SECONDS", 60.0)
        client = load.Client(url)
        assert client.send("GET", "/") == (200, b"ok")
        time.sleep(0.6)  # the server has closed it: sent on as it is, the request fails
        with pytest.raises((OSError, http.client.HTTPException)):
            client.send("GET", "/")
        monkeypatch.setattr(load, "STALE_SECONDS", 0.2)
        assert client.send("GET", "/") == (200, b"ok")
        time.sleep(0.6)
        assert client.send("GET", "/") == (200, b"ok")  # opened afresh first
    finally:
        server.shutdown()
        server.server_close()
