"""The speed benchmark runs end to end at a tiny size (figures are not judged here: machines are noisy)."""

import json

import numpy as np

from simsearch.benchmarks import speed


def test_speed_benchmark_runs_and_writes_json(tmp_path, models_dir, capsys):
    out = tmp_path / "speed.json"
    speed.main(["--max-images", "8", "--batch-size", "4", "--min-seconds", "0.05", "--vectors", "12000",
                "--queries", "20", "--cold-runs", "1", "--models-dir", str(models_dir), "--out", str(out)])
    doc = json.loads(out.read_text())
    names = [m["name"][:3] for m in doc["measures"]]
    assert names == ["(a)", "(b)", "(c)", "(d)"]
    for m in doc["measures"]:
        assert m["value"] > 0 and m["baseline"] > 0 and m["ratio"] == m["value"] / m["baseline"]
        assert isinstance(m["met"], bool)
    assert doc["search"]["auto"]["index"].startswith("ivf")  # 12,000 > flat_max: the IVF path is exercised
    assert doc["search"]["flat"]["index"] == "flat"
    assert 0.8 <= doc["search"]["auto"]["recall_at_k"] <= 1.0
    assert "simsearch speed" in capsys.readouterr().out


def test_clustered_vectors_are_unit_norm_and_clustered():
    x = speed.clustered_vectors(2000, 64, np.random.default_rng(0), centers=10)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    sims = x[:200] @ x[:200].T
    assert np.percentile(sims, 99) > 0.3  # neighbours exist (uniform random 64-d vectors stay near 0)
