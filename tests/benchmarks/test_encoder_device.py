"""The per-device encoder benchmark: with a fake clock every rate is known, so the CUDA/CPU ratio is too; without a
GPU its "cuda" rows say they ran on the CPU; through the entry point its table shows the JSON's figures."""

import json
import logging

import pytest

from simsearch.benchmarks import common, encoder_device
from simsearch.benchmarks.__main__ import main

from .clocks import TickClock


def test_rows_against_a_fake_clock(models_dir, caplog):
    cfg = encoder_device.DeviceConfig(photos=4, batch_sizes=(1, 6), min_seconds=1.0, models_dir=models_dir)
    fp32, _ = common.precisions(cfg.encoder, models_dir)
    with caplog.at_level(logging.WARNING):
        rows = encoder_device.measure(cfg, fp32, TickClock(0.25))
    # Each call one 0.25 s tick: 3 timed calls in 1.0 s on either device, so 3 batches a second and a ratio of 1.
    assert [(r["encoder"], r["batch"], r["cuda_img_s"], r["cpu_img_s"], r["ratio"]) for r in rows] == [
        ("efficientnet-lite0", 1, 3.0, 3.0, 1.0), ("efficientnet-lite0", 6, 18.0, 18.0, 1.0)]
    for r in rows:
        if r["cuda_ran_on"] == "cpu":  # no GPU here: the fallback is said, and the vectors are the CPU's own
            assert any("cuda" in m.lower() for m in caplog.messages)
            assert r["cosine_min"] > 0.9999
        assert 0.97 <= r["cosine_min"] <= r["cosine_mean"] <= 1.0001


def test_too_few_photos_is_a_dataset_error(tmp_path, models_dir):
    from simsearch.errors import DatasetError

    with pytest.raises(DatasetError, match="holds 0 JPEGs, 4 needed"):
        encoder_device.run(encoder_device.DeviceConfig(images=tmp_path, photos=4, models_dir=models_dir))


@pytest.mark.slow
def test_entry_point_table_shows_the_json_figures(tmp_path, models_dir, capsys):
    out = tmp_path / "enc.json"
    main(["encoder-device", "--photos", "2", "--batch-sizes", "1,3", "--min-seconds", "0.02",
          "--models-dir", str(models_dir), "--out", str(out)], standalone_mode=False)
    doc = json.loads(out.read_text())
    assert [(r["encoder"], r["batch"]) for r in doc["rows"]] == [
        ("efficientnet-lite0", 1), ("efficientnet-lite0", 3), ("efficientnet-lite0-int8", 1),
        ("efficientnet-lite0-int8", 3)]
    assert doc["config"]["batch_sizes"] == [1, 3] and doc["machine"]["cpu"]
    shown = capsys.readouterr().out
    for r in doc["rows"]:
        assert f"{r['cpu_img_s']:.0f} ({r['cpu_threads']} thr)" in shown and f"{r['ratio']:.1f}x" in shown
        assert f"{r['cosine_min']:.4f} / {r['cosine_mean']:.4f}" in shown
