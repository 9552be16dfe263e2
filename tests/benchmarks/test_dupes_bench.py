"""The dupes benchmark runs end to end at a tiny size in both modes; its scoring is checked on hand-made groups."""

import json

import numpy as np
import pytest
from PIL import Image

from simsearch.benchmarks import dupes
from simsearch.benchmarks.__main__ import main
from simsearch.retrieval.dupes import DupeGroup, DupeItem

from ..conftest import sample_paths


@pytest.fixture(scope="module")
def photos(tmp_path_factory, models_dir):
    work = tmp_path_factory.mktemp("dupes-bench")
    main(["dupes", "--max-images", "6", "--work-dir", str(work), "--out", str(work / "dupes.json")],
         standalone_mode=False)
    return json.loads((work / "dupes.json").read_text())


def test_photo_mode_chooses_on_one_half_and_reports_the_other(photos):
    assert photos["originals"] == 6 and photos["copies"] == list(dupes.COPIES)
    assert photos["tune_db"] != photos["report_db"]
    chosen = photos["chosen_threshold"]
    assert chosen in dupes.THRESHOLDS and chosen == dupes.choose(photos["tune_curve"])
    held = next(r for r in photos["report_curve"] if r["threshold"] == chosen)
    assert photos["held_out"]["precision"] == held["precision"] and photos["held_out"]["recall"] == held["recall"]
    assert photos["met"] == (held["precision"] >= 0.95 and held["recall"] >= 0.95)
    for curve in (photos["tune_curve"], photos["report_curve"]):
        assert [r["threshold"] for r in curve] == list(dupes.THRESHOLDS)
        assert all(r["positives"] == 3 * 15 for r in curve)  # 3 originals a half, each with 5 copies: C(6, 2) pairs
        # A higher threshold only splits groups: the pairs grouped together never grow.
        assert all(a["pairs_found"] >= b["pairs_found"] and a["recall"] >= b["recall"] for a, b in zip(curve, curve[1:]))
    assert len(photos["closest_originals"]) == 10 and photos["closest_originals"][0]["cosine"] < 1
    peer = photos["peer"]
    assert ("skipped" in peer and "torchvision" in peer["why"]) or 0 <= peer["precision"] <= 1


def _item(i, path):
    return DupeItem(i, path, 10, 10, 100)


def test_scores_count_pairs_grouped_together_against_the_families():
    paths = ["/a.JPEG", "/a__crop.jpg", "/a__mirror.jpg", "/b.JPEG", "/b__crop.jpg", "/c.JPEG"]
    # a with one copy, a's other copy grouped with b (wrong), b's copy missed, c alone.
    groups = [DupeGroup(_item(0, "/a.JPEG"), [_item(1, "/a__crop.jpg")], 0.9),
              DupeGroup(_item(2, "/a__mirror.jpg"), [_item(3, "/b.JPEG")], 0.9)]
    r = dupes.score_groups(groups, paths)
    assert r["positives"] == 3 + 1  # C(3, 2) in a's family, 1 in b's
    assert (r["pairs_found"], r["pairs_correct"]) == (2, 1)
    assert r["precision"] == 0.5 and r["recall"] == 0.25
    assert r["recall_by_copy"]["crop"] == 0.5 and r["recall_by_copy"]["mirror"] == 0.0
    assert r["original_pairs_grouped"] == 0
    together = dupes.score_groups([DupeGroup(_item(0, "/a.JPEG"), [_item(3, "/b.JPEG")], 0.8)], paths)
    assert together["original_pairs_grouped"] == 1 and together["precision"] == 0.0


def test_choose_the_most_cautious_threshold_that_meets_the_target():
    rows = [{"threshold": t, "precision": p, "recall": r, "f1": 2 * p * r / (p + r)}
            for t, p, r in [(0.7, 0.96, 1.0), (0.8, 1.0, 0.97), (0.9, 1.0, 0.9)]]
    assert dupes.choose(rows) == 0.8 and dupes.best_f1(rows) == 0.8
    rows[1]["recall"] = 0.94
    assert dupes.choose(rows) == 0.7  # only 0.7 meets both targets
    for r in rows:
        r["precision"] = 0.5
    assert dupes.choose(rows) == dupes.best_f1(rows)  # none meets them: the best F1


def test_augmented_copies_are_seeded_and_of_their_kind(tmp_path):
    src = sample_paths(1)[0]
    dupes.make_half([src], tmp_path / "a", seed=3)
    dupes.make_half([src], tmp_path / "b", seed=3)
    original = Image.open(src).convert("RGB")
    for kind in dupes.COPIES:
        a, b = (tmp_path / d / f"{src.stem}{dupes.SEP}{kind}.jpg" for d in "ab")
        assert a.read_bytes() == b.read_bytes()  # same seed, same copy
        with Image.open(a) as im:
            w, h = im.size
        if kind in ("jpeg", "colour", "mirror"):
            assert (w, h) == original.size
        elif kind == "crop":
            assert 0.75 * original.width <= w < original.width and 0.75 * original.height <= h < original.height
        else:
            assert w <= 0.7 * original.width + 1 and h <= 0.7 * original.height + 1
    mirrored = np.asarray(Image.open(tmp_path / "a" / f"{src.stem}{dupes.SEP}mirror.jpg"), dtype=np.float32)
    assert np.abs(mirrored[:, ::-1] - np.asarray(original, dtype=np.float32)).mean() < 4  # a flip, up to JPEG noise


def test_scale_mode_finds_every_planted_pair(tmp_path):
    doc = main(["dupes-scale", "--count", "3000", "--dim", "32", "--planted", "30", "--work-dir", str(tmp_path),
                "--out", str(tmp_path / "scale.json")], standalone_mode=False)
    assert json.loads((tmp_path / "scale.json").read_text())["planted_found"] == doc["planted_found"]
    assert json.loads((tmp_path / "scale-3000x32-p30" / "planted.json").read_text())["planted"] == 30  # kept
    assert doc["planted"] == 30 and doc["planted_expected"] >= 25  # the copies' cosines: 0.96-0.996 in 256-d, wider in 32
    assert doc["planted_found"] == doc["planted_expected"] and doc["planted_recall"] == 1.0
    assert min(doc["planted_cosine_range"]) > 0.9
    assert doc["count"] == 3000 and doc["threshold"] == dupes.SCALE_THRESHOLD
    assert doc["grouped_items"] >= 60 and doc["groups"] >= 1  # 30 disjoint pairs (natural ones may join them)
    assert doc["seconds"] > 0 and doc["peak_anon"] >= doc["anon_before"] > 0 and doc["peak_rss"] > 0
    assert doc["index_bytes"] > 3000 * 32 * 4 and len(doc["load_average_before"]) == 3
