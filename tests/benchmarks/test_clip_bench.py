"""The CLIP speed benchmark: against a fake clock every rate is known; the int8 cosines and the table are real."""

import json

import pytest

from simsearch.benchmarks import clip
from simsearch.benchmarks.__main__ import main
from simsearch.errors import ModelError

from ..clip_models import add_tiny_clip
from .clocks import TickClock


def test_rates_ratios_and_cosines(models_dir):
    add_tiny_clip(models_dir)
    cfg = clip.ClipConfig(encoder="tiny-clip", photos=4, batch=6, queries=8, min_seconds=1.0, models_dir=models_dir)
    doc = clip.run(cfg, TickClock(0.25))
    # Every call one 0.25 s tick: 3 timed calls in 1.0 s, so 3 batches of 6 images a second for every encoder.
    assert [(r["encoder"], r["img_s"], r["vs_baseline"]) for r in doc["images"]] == [
        ("efficientnet-lite0", 18.0, 1.0), ("efficientnet-lite0-int8", 18.0, 1.0),
        ("tiny-clip", 18.0, 1.0), ("tiny-clip-int8", 18.0, 1.0)]
    for r in doc["images"][1::2]:  # the int8 rows carry their vectors' cosine to fp32
        assert 0.95 < r["cosine_min"] <= r["cosine_mean"] <= 1.0001
    t = doc["text"]
    assert t["texts_s"] == 3 * len(clip.texts()) and t["query_ms_p50"] == t["query_ms_p95"] == 250.0
    assert doc["machine"]["cpu"] and doc["config"]["encoder"] == "tiny-clip"


def test_an_encoder_without_a_text_tower_is_refused(models_dir):
    with pytest.raises(ModelError, match="is not a CLIP encoder"):
        clip.run(clip.ClipConfig(encoder="efficientnet-lite0", models_dir=models_dir))


def test_entry_point_table_shows_the_json_figures(tmp_path, models_dir, capsys):
    add_tiny_clip(models_dir)
    out = tmp_path / "clip.json"
    main(["clip", "tiny-clip", "--photos", "2", "--batch", "2", "--queries", "4", "--min-seconds",
          "0.01", "--models-dir", str(models_dir), "--out", str(out)], standalone_mode=False)
    doc = json.loads(out.read_text())
    shown = capsys.readouterr().out
    for r in doc["images"]:
        assert f"{r['img_s']:.0f}" in shown and f"{r['vs_baseline']:.2f}x" in shown
    assert f"{doc['text']['texts_s']:.0f}" in shown
