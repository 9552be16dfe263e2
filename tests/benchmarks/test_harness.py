"""`simsearch bench` end to end on small real datasets cut from ../shared/data, against brute force."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from simsearch.benchmarks import harness
from simsearch.cli import app
from simsearch.encoders.preprocess import decode_side, to_input
from simsearch.encoders.registry import default_encoder
from simsearch.errors import DatasetError
from simsearch.evaluation import datasets
from simsearch.indexer.images import load_rgb

from ..conftest import TINY, class_folder, sample_paths

CLASSES = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Tiny ImageNet layout: 6 classes, 8 train and 6 val images each (real 64x64 photos)."""
    if not (TINY / "wnids.txt").is_file():
        pytest.skip(f"shared data missing: {TINY}")
    root = tmp_path_factory.mktemp("tiny")
    wnids = (TINY / "wnids.txt").read_text().split()[:CLASSES]
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        dest = root / "train" / w / "images"
        dest.mkdir(parents=True)
        for i in range(8):
            shutil.copy2(TINY / "train" / w / "images" / f"{w}_{i}.JPEG", dest)
    (root / "val" / "images").mkdir(parents=True)
    per_class = {w: 0 for w in wnids}
    lines = []
    for line in (TINY / "val" / "val_annotations.txt").read_text().splitlines():
        name, w = line.split("\t")[:2]
        if w in per_class and per_class[w] < 6:
            per_class[w] += 1
            shutil.copy2(TINY / "val" / "images" / name, root / "val" / "images" / name)
            lines.append(line)
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def ten_per_class(tmp_path_factory) -> Path:
    """<class>/<image>: 3 real Tiny ImageNet classes, 10 train photos each."""
    return class_folder(tmp_path_factory.mktemp("ten"), 3, 10)


def brute_force_vectors(encoder, paths) -> np.ndarray:
    spec = encoder.spec
    return encoder.embed(np.stack([to_input(load_rgb(p, decode_side(spec)), spec) for p in paths]))


def config(tiny, tmp_path, **kw) -> harness.BenchConfig:
    return harness.BenchConfig(data=tiny, balanced_pairs=200, threshold_pairs=200, threshold_per_class=8,
                               all_pairs_per_class=5, n_boot=200, all_pairs_block=7, cache_db=tmp_path / "cache", **kw)


def test_class_dataset_bench_matches_brute_force_and_caches(tiny, tmp_path, encoder):
    cfg = config(tiny, tmp_path, ks=(1, 2, 6))
    result = harness.run(cfg, ["efficientnet-lite0"])
    (enc,) = result["encoders"]
    assert enc["embedded"] == CLASSES * 6 + CLASSES * 8 and enc["key"] == encoder.spec.key

    ds = datasets.load_class_dataset(tiny, "val")
    vecs = brute_force_vectors(encoder, ds.paths)
    sets = datasets.make_pair_sets(ds.labels, seed=0)
    ranks = []
    for s in sets:  # explicit sort: where does each left's partner land among its set's rights?
        order = np.argsort(-(vecs[s.left_idx] @ vecs[s.right_idx].T), axis=1, kind="stable")
        ranks += [int(np.where(row == q)[0][0]) for q, row in enumerate(order)]
    ranks = np.asarray(ranks)
    hits = enc["hits"]
    assert (hits["queries"], hits["gallery"], hits["sets"]) == (CLASSES * 3, CLASSES, 3)
    for row in hits["rows"]:
        assert row["rate"] == pytest.approx(np.mean(ranks < row["k"]))
        assert row["ci_low"] <= row["rate"] <= row["ci_high"] and row["chance"] == pytest.approx(min(1, row["k"] / CLASSES))
    assert hits["rows"][-1]["rate"] == 1.0  # k = gallery size

    pairs = enc["pairs"]
    bal, allp = pairs["balanced"], pairs["all_pairs"]
    assert bal["tn"] + bal["fp"] + bal["fn"] + bal["tp"] == bal["pairs"] == 200
    assert bal["tp"] + bal["fn"] == 100  # half the balanced pairs are same-class
    n = CLASSES * 5
    assert allp["pairs"] == n * (n - 1) // 2 == allp["tn"] + allp["fp"] + allp["fn"] + allp["tp"]
    assert allp["tp"] + allp["fn"] == CLASSES * 5 * 4 // 2  # same-class pairs among 5 per class
    assert 0.5 < bal["roc_auc"] <= 1.0 and 0.5 < allp["roc_auc"] <= 1.0  # a real encoder beats chance
    assert -1.0 < pairs["threshold"] < 1.0

    again = harness.run(cfg, ["efficientnet-lite0"])
    assert again["encoders"][0]["embedded"] == 0  # everything came from the cache
    assert again["encoders"][0]["hits"] == hits


def test_pair_folder_finds_flipped_partners(tmp_path, encoder):
    root = tmp_path / "tll"
    for side in ("left", "right"):
        (root / side).mkdir(parents=True)
    for p in sample_paths(40):
        shutil.copy2(p, root / "left" / f"{p.stem}.jpg")
        ImageOps.mirror(Image.open(p).convert("RGB")).save(root / "right" / f"{p.stem}.jpg", quality=90)
    cfg = harness.BenchConfig(data=root, tasks=("pairs",), ks=(1, 5), val_fraction=0.5, n_boot=100,
                              cache_db=tmp_path / "cache")
    result = harness.run(cfg, ["efficientnet-lite0"])
    hits = result["encoders"][0]["hits"]
    assert hits["queries"] == hits["gallery"] == 20
    assert hits["rows"][0]["rate"] >= 0.9  # a mirrored photo is its own nearest neighbour
    assert len(result["protocol"]["split_manifest"]["val"]) == 20


def test_class_folder_val_fraction_1_puts_every_image_in_val(ten_per_class, tmp_path):
    cfg = harness.BenchConfig(data=ten_per_class, tasks=("pairs",), ks=(1,), val_fraction=1, seed=3, n_boot=50,
                              cache_db=tmp_path / "cache")
    result = harness.run(cfg, ["efficientnet-lite0"])
    hits = result["encoders"][0]["hits"]
    assert (hits["sets"], hits["queries"], hits["gallery"]) == (5, 15, 3)  # 10 images a class -> 5 pairs
    assert result["protocol"]["val_fraction"] == 1 and result["protocol"]["seed"] == 3
    with pytest.raises(DatasetError, match="no images in split 'train'.*threshold on the train split"):
        harness.run(replace(cfg, tasks=harness.TASKS), ["efficientnet-lite0"])


def test_class_folder_split_follows_the_seed_and_threshold_uses_its_train_part(ten_per_class, tmp_path):
    cfg = harness.BenchConfig(data=ten_per_class, ks=(1,), val_fraction=0.5, seed=0, n_boot=50, balanced_pairs=100,
                              threshold_pairs=100, threshold_per_class=5, all_pairs_per_class=5,
                              cache_db=tmp_path / "cache")
    first = harness.run(cfg, ["efficientnet-lite0"])
    # 5 val + 5 train images a class: all 30 embedded once, so the threshold's train images are not val's
    assert first["encoders"][0]["embedded"] == 30 and first["protocol"]["val_fraction"] == 0.5
    assert first["encoders"][0]["hits"]["sets"] == 2

    pairs_only = replace(cfg, tasks=("pairs",), cache_db=tmp_path / "cache-pairs")
    assert harness.run(pairs_only, ["efficientnet-lite0"])["encoders"][0]["embedded"] == 15
    assert harness.run(pairs_only, ["efficientnet-lite0"])["encoders"][0]["embedded"] == 0  # same seed, same split
    val = {s: set(datasets.load_class_dataset(ten_per_class, "val", 0.5, s).paths) for s in (0, 1)}
    other = harness.run(replace(pairs_only, seed=1), ["efficientnet-lite0"])
    assert other["encoders"][0]["embedded"] == len(val[1] - val[0]) > 0  # a new seed's val: images not seen


def test_bench_cli_class_folder_split_options(ten_per_class, tmp_path):
    def bench(name, *args):
        out = tmp_path / name
        result = CliRunner().invoke(app, ["bench", "--data", str(ten_per_class), "--task", "pairs", "--ks", "1",
                                          *args, "--out", str(out), "--cache-db", str(tmp_path / "cache")])
        assert result.exit_code == 0, result.output
        return json.loads((out / "bench.json").read_text())

    every = bench("every", "--val-fraction", "1", "--seed", "2")
    assert every["encoders"][0]["hits"]["sets"] == 5 and every["protocol"]["seed"] == 2
    default = bench("default")  # no --val-fraction: a fifth of every class, 2 images -> 1 pair set
    assert default["protocol"]["val_fraction"] == 0.2 and default["encoders"][0]["hits"]["sets"] == 1


def test_bench_cli_writes_json_and_plots(tiny, tmp_path):
    result = CliRunner().invoke(app, [
        "bench", "--data", str(tiny), "--ks", "1,3", "--balanced-pairs", "100", "--all-pairs-per-class", "4",
        "--out", str(tmp_path / "out"), "--cache-db", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert "find the pair" in result.stdout and "same/different" in result.stdout and "research" in result.stdout
    doc = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert doc["protocol"]["seed"] == 0 and doc["protocol"]["layout"] == "tiny-imagenet"
    default = default_encoder()  # no --encoder: the machine's default (int8 where it is faster)
    assert doc["encoders"][0]["key"].startswith(f"{default}@") and doc["encoders"][0]["key"].endswith("/pad")
    for png in ("hit_at_k.png", "roc.png", f"confusion-{default}.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/missing"], "no such folder"),
    (["--data", "{tiny}", "--encoder", "nope"], "unknown encoder 'nope'"),
    (["--data", "{tiny}", "--task", "colours"], "unknown task 'colours'"),
    (["--data", "{tiny}", "--ks", "0,5"], "--ks must be positive"),
])
def test_bench_user_mistakes(tiny, tmp_path, args, message):
    result = CliRunner().invoke(app, ["bench", *[a.format(tmp=tmp_path, tiny=tiny) for a in args],
                                      "--cache-db", str(tmp_path / "cache")])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
