"""The load benchmark end to end at a tiny size (the real server in a child process, real photos and vectors);
figures are not judged here, only that they are measured, bounded and consistent."""

from __future__ import annotations

import json
import time

import pytest

from simsearch.benchmarks import load


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, models_dir):
    work = tmp_path_factory.mktemp("load")
    out = work / "load.json"
    t = time.monotonic()
    load.main(["--max-images", "12", "--vectors", "2000", "--max-requests", "10", "--max-seconds", "2",
               "--concurrency", "1,2", "--work-dir", str(work), "--models-dir", str(models_dir), "--out", str(out)])
    return json.loads(out.read_text()), time.monotonic() - t


def test_every_row_is_measured_without_errors(tiny):
    doc, _ = tiny
    rows = doc["rows"]
    assert [(r["db"], r["operation"], r["concurrency"]) for r in rows] == [
        (db, op, c) for db in ("demo", "2k") for op in ("similar", "query") for c in (1, 2)]
    assert {r["db"]: r["items"] for r in rows} == {"demo": 12, "2k": 2000}
    for r in rows:
        assert r["errors"] == 0 and 0 < r["requests"] <= 10
        assert 0 < r["p50_ms"] <= r["p95_ms"] and r["rps"] > 0
        assert r["rps"] == pytest.approx(r["requests"] / r["seconds"])
        assert r["in_process"]["errors"] == 0 and r["in_process"]["rps"] > 0
        assert r["ratio"] == pytest.approx(r["rps"] / r["in_process"]["rps"])
        assert len(r["load_average"]) == 2
    assert doc["machine"]["omp_wait_policy"] == "PASSIVE"
    targets = {(t["db"], t["target"]): t for t in doc["targets"]}
    assert targets[("demo", "similar p50 <= 5 ms at concurrency 1")]["value"] == rows[0]["p50_ms"]
    assert targets[("all", "no errors")]["met"] is True


def test_runs_stop_by_count_and_by_time():
    calls = []
    r = load.drive(lambda w, i: calls.append(i) or True, 4, max_requests=50, max_seconds=60)
    assert r["requests"] == 50 == len(calls) and r["errors"] == 0
    t = time.monotonic()
    r = load.drive(lambda w, i: time.sleep(0.01) or True, 2, max_requests=10**9, max_seconds=0.5)
    assert time.monotonic() - t < 2 and 0 < r["requests"] < 200
    r = load.drive(lambda w, i: i % 5 != 0 and 1 / 0, 1, max_requests=20, max_seconds=60)  # exceptions are errors
    assert r["errors"] == 20 and r["requests"] == 20
