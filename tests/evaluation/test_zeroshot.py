"""Zero-shot classification by text prompts: the metric against brute force, class names from words.txt and
folders, and `simsearch bench --task zeroshot` end to end with a tiny random CLIP encoder. Random weights rank
arbitrarily: every figure is checked against a numpy reference, never for being good."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from simsearch.benchmarks import harness
from simsearch.cli import app
from simsearch.encoders.preprocess import decode_side, to_input
from simsearch.encoders.runtime import OnnxEncoder
from simsearch.encoders.text import TextEncoder
from simsearch.errors import DatasetError, ModelError, SimsearchError
from simsearch.evaluation import datasets, zeroshot
from simsearch.indexer.images import load_rgb

from ..clip_models import add_tiny_clip
from ..conftest import TINY, class_folder

CLASSES = 5
PER_CLASS = 4  # val images per class
TEMPLATES = ("a photo of a {name}.", "a blurry photo of the {name}.")


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_ranks(images: np.ndarray, classes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) where each image's true class lands when all classes are sorted by score, best first."""
    order = np.argsort(-(images @ classes.T), axis=1, kind="stable")  # (N, C)
    return np.array([int(np.flatnonzero(row == y)[0]) for row, y in zip(order, labels)])


def top_k_reference(images: np.ndarray, classes: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(N,) whether each image's true class is among its k best-scoring classes, by an explicit sort."""
    order = np.argsort(-(images @ classes.T), axis=1, kind="stable")[:, :k]  # (N, k)
    return (order == labels[:, None]).any(axis=1)


# -- the metric ------------------------------------------------------------------------------------------

def test_class_ranks_match_an_explicit_sort():
    rng = np.random.default_rng(0)
    images, classes = unit_rows(rng.normal(size=(300, 16))), unit_rows(rng.normal(size=(9, 16)))
    labels = rng.integers(0, 9, 300)
    ranks = zeroshot.class_ranks(images, labels, classes)
    assert np.array_equal(ranks, reference_ranks(images, classes, labels))
    for k in (1, 2, 5, 9):
        assert np.array_equal(ranks < k, top_k_reference(images, classes, labels, k))
    assert (ranks < 9).all()


def test_class_ranks_count_a_tie_for_the_image():
    classes = unit_rows(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))  # classes 0 and 1 are the same vector
    images = unit_rows(np.array([[1.0, 0.1], [1.0, 0.1], [0.1, 1.0]]))
    # image 2 is nearest class 2; its class 0 ties with class 1, which is not counted above it
    assert zeroshot.class_ranks(images, np.array([0, 1, 0]), classes).tolist() == [0, 0, 1]


def test_class_vectors_average_the_templates_per_class():
    rng = np.random.default_rng(1)
    seen: list[list[str]] = []
    table: dict[str, np.ndarray] = {}

    def embed_text(texts: list[str]) -> np.ndarray:  # a fixed random unit vector per distinct text
        seen.append(texts)
        return np.stack([table.setdefault(t, unit_rows(rng.normal(size=(1, 8)))[0]) for t in texts])

    names = ["goldfish", "school bus", "tabby"]
    vectors = zeroshot.class_vectors(names, TEMPLATES, embed_text)
    assert seen == [["a photo of a goldfish.", "a photo of a school bus.", "a photo of a tabby.",
                     "a blurry photo of the goldfish.", "a blurry photo of the school bus.",
                     "a blurry photo of the tabby."]]  # one call, template-major
    for c, name in enumerate(names):
        mean = np.mean([table[t.replace("{name}", name)] for t in TEMPLATES], axis=0)
        assert np.allclose(vectors[c], mean / np.linalg.norm(mean))
    single = zeroshot.class_vectors(names, TEMPLATES[:1], embed_text)
    assert np.allclose(single, [table[f"a photo of a {n}."] for n in names])  # one template: its own vectors


@pytest.mark.parametrize("templates, message", [
    ((), "at least one prompt template"),
    (("a photo of a {}.",), "has no {name}"),
])
def test_templates_need_the_name(templates, message):
    with pytest.raises(SimsearchError, match=message):
        zeroshot.prompts(["goldfish"], templates)


def test_prompts_leave_other_braces_alone():
    assert zeroshot.prompts(["cat"], ("{name} {{x}}",)) == ["cat {{x}}"]


# -- class names -----------------------------------------------------------------------------------------

def test_class_names_take_the_first_synonym_of_words_txt(tmp_path):
    (tmp_path / "words.txt").write_text(
        "n00001740\tentity\n"
        "n01443537\tgoldfish, Carassius auratus\n"
        "n02124075\tEgyptian cat\n"
        "n04146614\tschool bus\n"
        "n09999999\t\n")  # an id without names: named by its folder
    names = zeroshot.class_names(tmp_path, ["n04146614", "n01443537", "n02124075", "n09999999", "sea_lion"])
    assert names == ["school bus", "goldfish", "Egyptian cat", "n09999999", "sea lion"]


def test_class_names_without_words_txt_are_the_folders(tmp_path):
    assert zeroshot.class_names(tmp_path, ["golden_retriever", "fire-truck", "cat", "mountain__bike-"]) == [
        "golden retriever", "fire truck", "cat", "mountain bike"]


def test_tiny_imagenet_names_from_its_words_txt():
    if not (TINY / "words.txt").is_file():
        pytest.skip(f"shared data missing: {TINY}")
    wnids = (TINY / "wnids.txt").read_text().split()
    names = zeroshot.class_names(TINY, wnids)
    assert len(names) == 200 and all(names) and "goldfish" in names and "," not in "".join(names)


# -- the bench, end to end ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Tiny ImageNet layout with its words.txt: 5 classes, 4 val images each (real photos), no train images."""
    if not (TINY / "words.txt").is_file():
        pytest.skip(f"shared data missing: {TINY}")
    root = tmp_path_factory.mktemp("tiny")
    wnids = (TINY / "wnids.txt").read_text().split()[:CLASSES]
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("".join(line + "\n" for line in (TINY / "words.txt").read_text().splitlines()
                                            if line.split("\t")[0] in wnids))
    (root / "train").mkdir()
    (root / "val" / "images").mkdir(parents=True)
    per_class = dict.fromkeys(wnids, 0)
    lines = []
    for line in (TINY / "val" / "val_annotations.txt").read_text().splitlines():
        name, w = line.split("\t")[:2]
        if w in per_class and per_class[w] < PER_CLASS:
            per_class[w] += 1
            shutil.copy2(TINY / "val" / "images" / name, root / "val" / "images" / name)
            lines.append(line)
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def clip(models_dir):
    return add_tiny_clip(models_dir)


def reference(root: Path, spec, templates, models_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Image vectors straight from the image tower, class vectors straight from the text tower: what the bench's
    figures must equal. -> (N, dim), (N,), (C, dim), class names."""
    ds = datasets.load_class_dataset(root, "val")
    images = OnnxEncoder(spec, models_dir=models_dir).embed(
        np.stack([to_input(load_rgb(p, decode_side(spec)), spec) for p in ds.paths]))
    words = dict(line.split("\t") for line in (root / "words.txt").read_text().splitlines())
    names = [words[w].split(",")[0] for w in ds.classes]
    text = TextEncoder(spec).embed([t.replace("{name}", n) for t in templates for n in names])  # (T * C, dim)
    classes = unit_rows(text.reshape(len(templates), len(names), -1).mean(axis=0))  # (C, dim)
    return images, ds.labels, classes, names


def test_zeroshot_bench_matches_brute_force_and_caches(tiny, clip, models_dir, tmp_path):
    cfg = harness.BenchConfig(data=tiny, tasks=("zeroshot",), zeroshot_templates=TEMPLATES, zeroshot_ks=(1, 2, 5),
                              n_boot=200, models_dir=models_dir, cache_db=tmp_path / "cache")
    result = harness.run(cfg, [clip.name])
    (enc,) = result["encoders"]
    assert enc["embedded"] == CLASSES * PER_CLASS  # val only: zero-shot needs no train split
    assert enc["hits"] is None and enc["pairs"] is None

    images, labels, classes, names = reference(tiny, clip, TEMPLATES, models_dir)
    z = enc["zeroshot"]
    assert (z["queries"], z["gallery"]) == (CLASSES * PER_CLASS, CLASSES)
    assert z["class_names"] == names and z["templates"] == list(TEMPLATES)
    assert z["mean_rank"] == pytest.approx(reference_ranks(images, classes, labels).mean() + 1)
    for row in z["rows"]:
        hit = top_k_reference(images, classes, labels, row["k"])
        assert row["rate"] == pytest.approx(hit.mean()) and row["hits"] == hit.sum() and row["n"] == len(hit)
        assert row["ci_low"] <= row["rate"] <= row["ci_high"]
        assert row["chance"] == pytest.approx(min(1, row["k"] / CLASSES))
    assert z["rows"][-1]["rate"] == 1.0  # k = number of classes
    assert "zeroshot" in result["protocol"]

    again = harness.run(cfg, [clip.name])
    assert again["encoders"][0]["embedded"] == 0  # the image vectors came from the bench's cache
    assert again["encoders"][0]["zeroshot"] == z


def test_zeroshot_on_class_folders_names_classes_by_folder(tmp_path, clip, models_dir):
    (tmp_path / "data").mkdir()
    root = class_folder(tmp_path / "data", 3, 4)
    names = ["golden_retriever", "fire-truck", "tabby"]
    for folder, name in zip(sorted(root.iterdir()), names):
        folder.rename(root / name)
    cfg = harness.BenchConfig(data=root, tasks=("zeroshot",), val_fraction=1.0, n_boot=50, models_dir=models_dir,
                              cache_db=tmp_path / "cache")
    z = harness.run(cfg, [clip.name])["encoders"][0]["zeroshot"]
    assert sorted(z["class_names"]) == ["fire truck", "golden retriever", "tabby"]
    assert z["templates"] == ["a photo of a {name}."] and [r["k"] for r in z["rows"]] == [1, 5]
    assert z["queries"] == 12 and z["rows"][1]["rate"] == 1.0  # top-5 of 3 classes


def test_zeroshot_needs_a_text_tower_and_classes(tiny, clip, models_dir, tmp_path):
    cfg = harness.BenchConfig(data=tiny, tasks=("zeroshot",), models_dir=models_dir, cache_db=tmp_path / "cache")
    with pytest.raises(ModelError, match="encoder efficientnet-lite0 has no text tower"):
        harness.run(cfg, [clip.name, "efficientnet-lite0"])
    assert not (tmp_path / "cache").exists()  # refused before any work

    pairs = tmp_path / "pairs"
    for side in ("left", "right"):
        (pairs / side).mkdir(parents=True)
        for i in range(2):
            shutil.copy2(next((tiny / "val" / "images").iterdir()), pairs / side / f"{i}.JPEG")
    with pytest.raises(DatasetError, match="a pair folder has no classes"):
        harness.run(harness.BenchConfig(data=pairs, tasks=("zeroshot",), models_dir=models_dir,
                                        cache_db=tmp_path / "cache-pairs"), [clip.name])


def test_bench_cli_zeroshot(tiny, clip, models_dir, tmp_path):
    def bench(encoder: str):
        return CliRunner().invoke(app, ["bench", "--data", str(tiny), "--task", "zeroshot", "--encoder", encoder,
                                        "--models-dir", str(models_dir), "--out", str(tmp_path / "out"),
                                        "--cache-db", str(tmp_path / "cache")])

    result = bench(clip.name)
    assert result.exit_code == 0, result.output
    assert "zero-shot classification" in result.stdout and "top-5 %" in result.stdout
    doc = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [r["k"] for r in doc["encoders"][0]["zeroshot"]["rows"]] == [1, 5]

    refused = bench("efficientnet-lite0")
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert refused.output.strip().splitlines() == [
        "error: encoder efficientnet-lite0 has no text tower: --task zeroshot needs a CLIP encoder (docs/clip.md)"]
