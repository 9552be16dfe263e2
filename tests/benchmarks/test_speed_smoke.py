"""The speed benchmark's measures, each at a tiny size with a fake clock (the figure it must report is known), and
the whole run end to end behind `slow` (its figures are not judged there: machines are noisy)."""

import json
import math

import numpy as np
import pytest

from simsearch.benchmarks import common, speed
from simsearch.benchmarks.__main__ import main
from simsearch.encoders.quantize import parse_cpuinfo_flags

from .clocks import TickClock


@pytest.fixture(scope="module")
def tiny(models_dir):
    cfg = speed.SpeedConfig(max_images=8, batch_size=2, min_seconds=1.0, decode_images=4, vectors=2000, dim=16,
                            queries=20, cold_runs=1, models_dir=models_dir)
    fp32, int8 = common.precisions(cfg.encoder, models_dir)
    return cfg, fp32, int8, common.real_batch(common.photos(cfg.images, 2), fp32)


def test_encoder_measures_against_a_fake_clock(tiny):
    cfg, fp32, int8, batch = tiny
    # Every call takes one 0.25 s tick: 3 timed calls of 2 images in 1.0 s (min_seconds) = 6 img/s, for ORT and
    # torch alike, so ORT is 1.0x torch: short of the 2x target.
    a, fp32_ips = speed.encoder_throughput(cfg, fp32, batch, TickClock(0.25))
    assert (a.value, a.baseline, a.ratio, a.met, fp32_ips) == (6.0, 6.0, 1.0, False, 6.0)
    assert "efficientnet-lite0, batch 2 of real photos" in a.detail


def test_int8_measure_against_a_fake_clock(tiny):
    cfg, fp32, int8, batch = tiny
    # int8 at 6 img/s against an fp32 rate of 2 img/s: 3.0x, the target met.
    e, int8_ips = speed.int8_throughput(cfg, fp32, int8, batch, 2.0, TickClock(0.25))
    assert (e.value, e.baseline, e.ratio, e.met, int8_ips) == (6.0, 2.0, 3.0, True, 6.0)
    assert "efficientnet-lite0-int8 vs efficientnet-lite0" in e.detail and "VNNI" in e.detail


def test_physical_limit_and_its_measure(tiny):
    cfg, fp32, _, batch = tiny
    decode = speed.decode_core_seconds(cfg, fp32, TickClock(0.5))
    assert decode["images"] == 4 and decode["wall_seconds_per_image"] == 0.5 / 4  # one tick over the 4 photos
    assert 0 < decode["cpu_seconds_per_image"] < 1
    decode["wall_seconds_per_image"] = 0.5
    limit = speed.physical_limit(cfg, fp32, batch, decode, TickClock(0.25))
    # ORT at 1 thread: 6 img/s, so 1/6 core-second per image; decode 0.5: cores / (2/3) = 1.5 img/s per core.
    assert limit["encoder_1_thread_ips"] == 6.0 and limit["encoder_core_seconds"] == pytest.approx(1 / 6)
    assert limit["limit_ips"] == pytest.approx(1.5 * limit["cores"])
    at = speed.Measure("(b)", 0.9 * 1.5 * limit["cores"], "img/s")
    g = speed.limit_measure(at, limit, decode, "fp32")
    assert g.baseline == limit["limit_ips"] and g.ratio == pytest.approx(0.9) and g.met
    assert f"{limit['cores']} cores" in g.detail and "decode 500.00 ms" in g.detail and "encoder 166.67 ms" in g.detail
    at.value *= 0.99
    assert not speed.limit_measure(at, limit, decode, "fp32").met


def test_index_measure_against_a_fake_clock(tiny, tmp_path):
    cfg, fp32, _, _ = tiny
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in common.photos(cfg.images, 3):
        (folder / p.name).symlink_to(p)
    # Four readings of a 0.5 s clock: start, index start, index end, end: 3 photos in 1.5 s = 2 img/s.
    b = speed.index_throughput(cfg, fp32, 4.0, folder, tmp_path / "db", clock=TickClock(0.5))
    assert (b.value, b.baseline, b.ratio, b.met) == (2.0, 4.0, 0.5, False)
    assert "3 JPEGs in 1.5 s" in b.detail and "index 0.5 s" in b.detail


def test_query_latency_against_a_fake_clock(tiny):
    cfg, *_ = tiny
    c, search = speed.query_latency(cfg, TickClock(0.002))
    # 2,000 vectors: "auto" is exact search, so its recall is 1; every search and build is one 2 ms tick.
    assert search["auto"] == pytest.approx({"index": "flat", "build_seconds": 0.002, "p50_ms": 2.0, "p95_ms": 2.0,
                                            "recall_at_k": 1.0})
    assert search["flat"] == pytest.approx({"index": "flat", "build_seconds": 0.002, "p50_ms": 2.0, "p95_ms": 2.0})
    assert (c.value, c.baseline, c.met) == (pytest.approx(2.0), pytest.approx(2.0), True)


def test_table_shows_the_json_figures():
    from rich.console import Console

    measures = [speed.Measure("(a) encoder, ORT vs torch", 123.456, "img/s", 41.2, "torch eager", ">= 2x", True, "a"),
                speed.Measure("(c) warm search p50", 0.731, "ms", 9.5, "exact search", "p50 <= 5 ms", False, "c")]
    console = Console(width=200, record=True)
    console.print(*speed.render({"measures": [{**vars(m), "ratio": m.ratio} for m in measures]}))
    text = console.export_text()
    assert "123.46 img/s" in text and "41.20 img/s (torch eager)" in text and "3.00x" in text
    assert "0.73 ms" in text and "0.08x" in text and "no" in text


def test_an_int8_name_measures_its_fp32_encoder_too(models_dir):
    fp32, int8 = common.precisions("efficientnet-lite0-int8", models_dir)
    assert (fp32.name, int8.name) == ("efficientnet-lite0", "efficientnet-lite0-int8")
    assert (fp32.precision.value, int8.precision.value) == ("fp32", "int8")
    assert common.precisions("efficientnet-lite0", models_dir) == (fp32, int8)


def test_clustered_vectors_are_unit_norm_and_clustered():
    x = speed.clustered_vectors(2000, 64, np.random.default_rng(0), centers=10)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    sims = x[:200] @ x[:200].T
    assert np.percentile(sims, 99) > 0.3  # neighbours exist (uniform random 64-d vectors stay near 0)


@pytest.mark.slow
def test_speed_end_to_end_through_the_entry_point(tmp_path, models_dir):
    from rich.console import Console

    out = tmp_path / "speed.json"
    returned = main(["speed", "--max-images", "8", "--batch-size", "4", "--min-seconds", "0.05", "--vectors", "12000",
                     "--queries", "20", "--cold-runs", "1", "--decode-images", "6", "--models-dir", str(models_dir),
                     "--out", str(out)], standalone_mode=False)
    doc = json.loads(out.read_text())
    assert doc == json.loads(json.dumps(returned, default=common.json_default))
    assert [m["name"][:3] for m in doc["measures"]] == ["(a)", "(b)", "(c)", "(d)", "(e)", "(f)", "(g)", "(g)"]
    a, b, _, _, e, f, g32, g8 = doc["measures"]
    assert e["baseline"] == a["value"] and b["baseline"] == a["value"] and f["baseline"] == e["value"]
    assert g32["value"] == b["value"] and g8["value"] == f["value"]
    assert doc["limit"]["decode"]["images"] == 6 and doc["config"]["max_images"] == 8
    assert doc["search"]["auto"]["index"].startswith("hnsw")  # 12,000 x 1280 > the exact-search limit: a graph
    assert 0.8 <= doc["search"]["auto"]["recall_at_k"] <= 1.0
    flags = parse_cpuinfo_flags(open("/proc/cpuinfo").read())
    assert doc["machine"]["int8_fast"] == bool(flags & {"avx512_vnni", "avx_vnni", "asimddp"})
    console = Console(width=250, record=True)
    console.print(*speed.render(doc))
    text = console.export_text()
    for m in doc["measures"]:
        assert math.isfinite(m["value"]) and m["value"] > 0 and m["baseline"] > 0
        assert f"{m['value']:.2f} {m['unit']}" in text and f"{m['ratio']:.2f}x" in text
