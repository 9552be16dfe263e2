"""The per-device encoder benchmark runs end to end; without a GPU its "cuda" rows say they ran on the CPU."""

import json
import logging

from simsearch.benchmarks import encoder_device


def test_encoder_device_benchmark_reports_where_cuda_rows_ran(tmp_path, models_dir, caplog):
    out = tmp_path / "enc.json"
    with caplog.at_level(logging.WARNING):
        encoder_device.main(["--photos", "4", "--batch-sizes", "1,6", "--min-seconds", "0.05",
                             "--models-dir", str(models_dir), "--out", str(out)])
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [(r["encoder"], r["batch"]) for r in rows] == [
        ("efficientnet-lite0", 1), ("efficientnet-lite0", 6), ("efficientnet-lite0-int8", 1), ("efficientnet-lite0-int8", 6)]
    for r in rows:
        assert r["cuda_img_s"] > 0 and r["cpu_img_s"] > 0 and r["ratio"] == r["cuda_img_s"] / r["cpu_img_s"]
        if r["cuda_ran_on"] == "cpu":  # no GPU here: the fallback is said, and the vectors are the CPU's own
            assert any("cuda" in m.lower() for m in caplog.messages)
            assert r["cosine_min"] > 0.9999
        assert 0.97 <= r["cosine_min"] <= r["cosine_mean"] <= 1.0001
