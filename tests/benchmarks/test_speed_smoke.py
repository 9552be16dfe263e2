"""The speed benchmark runs end to end at a tiny size (figures are not judged here: machines are noisy)."""

import json
import math

import numpy as np
import pytest

from simsearch.benchmarks import speed


@pytest.fixture(scope="module")
def run_tiny(tmp_path_factory, models_dir):
    """Every measure at a tiny size, once for the module: the printed table and the JSON it wrote."""
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    speed.main(["--max-images", "8", "--batch-size", "4", "--min-seconds", "0.05", "--vectors", "12000",
                "--queries", "20", "--cold-runs", "1", "--decode-images", "6", "--models-dir", str(models_dir),
                "--out", str(out)])
    return json.loads(out.read_text())


def test_speed_benchmark_runs_and_writes_json(run_tiny):
    doc = run_tiny
    names = [m["name"][:3] for m in doc["measures"]]
    assert names == ["(a)", "(b)", "(c)", "(d)", "(e)", "(f)", "(g)", "(g)"]
    for m in doc["measures"]:
        assert m["value"] > 0 and m["baseline"] > 0 and m["ratio"] == m["value"] / m["baseline"]
        assert math.isfinite(m["value"]) and math.isfinite(m["baseline"])
        assert isinstance(m["met"], bool)
    assert doc["search"]["auto"]["index"].startswith("ivf")  # 12,000 > flat_max: the IVF path is exercised
    assert doc["search"]["flat"]["index"] == "flat"
    assert 0.8 <= doc["search"]["auto"]["recall_at_k"] <= 1.0
    assert isinstance(doc["machine"]["int8_fast"], bool)


def test_int8_and_limit_measures_reuse_their_baselines(run_tiny):
    a, b, _, _, e, f, g32, g8 = run_tiny["measures"]
    assert "efficientnet-lite0-int8" in e["detail"] and "VNNI" in e["detail"]
    assert e["baseline"] == a["value"]  # int8 vs the fp32 ORT rate of (a), same batch and threads
    assert b["baseline"] == a["value"] and f["baseline"] == e["value"]  # index vs pure ORT of its own precision
    assert f["name"].endswith("int8") and f["target"] == ">= 0.85x"
    assert (g32["name"], g8["name"]) == ("(g) index vs physical limit, fp32", "(g) index vs physical limit, int8")
    assert g32["value"] == b["value"] and g8["value"] == f["value"]
    limit = run_tiny["limit"]
    assert limit["decode"]["images"] == 6
    for precision, g in (("fp32", g32), ("int8", g8)):
        lim = limit[precision]
        assert lim["decode_core_seconds"] == limit["decode"]["wall_seconds_per_image"] > 0
        assert lim["encoder_core_seconds"] > 0
        assert lim["limit_ips"] == pytest.approx(lim["cores"] / (lim["decode_core_seconds"] + lim["encoder_core_seconds"]))
        assert g["baseline"] == lim["limit_ips"] and math.isfinite(g["baseline"]) and g["baseline"] > 0
        assert f"{lim['cores']} cores" in g["detail"] and "decode" in g["detail"] and "encoder" in g["detail"]
    assert limit["int8"]["encoder"] == "efficientnet-lite0-int8" and limit["fp32"]["encoder"] == "efficientnet-lite0"


def test_table_lists_every_measure(run_tiny):
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(speed.render(run_tiny))
    text = console.export_text()
    assert "simsearch speed" in text and "physical limit" in text and "int8 vs fp32" in text


def test_an_int8_name_measures_its_fp32_encoder_too(models_dir):
    cfg = speed.SpeedConfig(encoder="efficientnet-lite0-int8", models_dir=models_dir)
    fp32, int8 = speed._specs(cfg)
    assert (fp32.name, int8.name) == ("efficientnet-lite0", "efficientnet-lite0-int8")
    assert (fp32.precision.value, int8.precision.value) == ("fp32", "int8")
    assert speed._specs(speed.SpeedConfig(models_dir=models_dir)) == (fp32, int8)


def test_clustered_vectors_are_unit_norm_and_clustered():
    x = speed.clustered_vectors(2000, 64, np.random.default_rng(0), centers=10)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    sims = x[:200] @ x[:200].T
    assert np.percentile(sims, 99) > 0.3  # neighbours exist (uniform random 64-d vectors stay near 0)
