"""The load benchmark: its load driver against a fake clock (cheap), and the whole run at a tiny size behind `slow`
(the real server in a child process, real photos and vectors): figures are not judged there, only that they are
measured, bounded, and shown as the JSON has them."""

from __future__ import annotations

import json
import time

import pytest

from simsearch.benchmarks import load
from simsearch.benchmarks.__main__ import main

from .clocks import TickClock


@pytest.mark.slow
def test_every_row_is_measured_without_errors(tmp_path, models_dir, capsys):
    out = tmp_path / "load.json"
    main(["load", "--max-images", "12", "--vectors", "2000", "--max-requests", "10", "--max-seconds", "2",
          "--concurrency", "1,2", "--work-dir", str(tmp_path), "--models-dir", str(models_dir), "--out", str(out)],
         standalone_mode=False)
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [(r["db"], r["operation"], r["concurrency"]) for r in rows] == [
        (db, op, c) for db in ("demo", "2k") for op in ("similar", "query") for c in (1, 2)]
    assert {r["db"]: r["items"] for r in rows} == {"demo": 12, "2k": 2000}
    shown = capsys.readouterr().out
    for r in rows:
        assert r["errors"] == 0 and 0 < r["requests"] <= 10 and r["in_process"]["errors"] == 0
        assert 0 < r["p50_ms"] <= r["p95_ms"] and r["in_process"]["requests"] > 0
        assert r["load_average"][0] >= 0 and r["server_cpu_ms_per_request"] > 0
        cells = (f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}", f"{r['rps']:.0f}", f"{r['in_process']['rps']:.0f}",
                 f"{r['ratio']:.2f}x")
        assert all(c in shown for c in cells), (cells, r)
    assert doc["machine"]["omp_wait_policy"] == "PASSIVE"
    targets = {(t["db"], t["target"]): t for t in doc["targets"]}
    assert targets[("demo", "similar p50 <= 5 ms at concurrency 1")]["value"] == rows[0]["p50_ms"]
    assert targets[("all", "no errors")] == {"db": "all", "target": "no errors", "value": 0, "met": True}


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
