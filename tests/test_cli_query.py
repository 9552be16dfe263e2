"""`simsearch query` with words, subtracted terms, weights, --min-score and --under, end to end through CliRunner on
real photos, against brute force over the db's stored vectors (a tiny CLIP encoder with random towers for words:
its rankings mean nothing, they are only checked against numpy)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.indexer.scan import item_path
from simsearch.indexer.store import Store

from .clip_models import add_tiny_clip
from .conftest import copy_samples

runner = CliRunner()
LITE0 = "efficientnet-lite0"


@pytest.fixture(scope="module")
def db(tmp_path_factory, models_dir):
    """24 photos in imgs/a and imgs/b, indexed with efficientnet-lite0 and with a tiny CLIP encoder."""
    root = tmp_path_factory.mktemp("cliq")
    copy_samples(root / "imgs" / "a", 12)
    copy_samples(root / "imgs" / "b", 12, start=12)
    clip = add_tiny_clip(models_dir).name
    for encoder in (LITE0, clip):
        result = runner.invoke(app, ["index", str(root / "imgs"), "--db", str(root / "db"), "--encoder", encoder])
        assert result.exit_code == 0, result.output
    return root


def photo(db: Path, folder: str, i: int) -> Path:
    return sorted((db / "imgs" / folder).iterdir())[i]


def stored(db: Path, encoder: str) -> tuple[list[str], np.ndarray]:
    """Every item's path and its stored vector of `encoder` (N, dim)."""
    with Store(db / "db", readonly=True) as store:
        key = store.manifest.encoders[encoder].key
        paths = [p for p, _ in store.iter_items()]
        return paths, store.vectors_of(key, paths, store.manifest.encoders[encoder].dim)


def brute(paths, vecs, combined, k, keep=lambda p: True, min_score=None) -> list[str]:
    q = combined / np.linalg.norm(combined)
    scores = vecs @ q
    return [paths[i] for i in np.argsort(-scores, kind="stable")
            if keep(paths[i]) and (min_score is None or scores[i] >= min_score - 1e-6)][:k]


def run_json(*args) -> dict:
    result = runner.invoke(app, ["query", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_images_minus_an_image_with_a_weight_is_one_query(db):
    paths, vecs = stored(db, LITE0)
    a, a2, b = photo(db, "a", 0), photo(db, "a", 5), photo(db, "b", 1)
    doc = run_json(a, f"2:{a2}", "--minus", f"0.5:{b}", "-k", 8, "--db", db / "db", "--encoder", LITE0)
    va, va2, vb = (vecs[paths.index(item_path(p))] for p in (a, a2, b))
    (result,) = doc["results"]  # with --minus, every term is one query
    assert [h["path"] for h in result["hits"]] == brute(paths, vecs, va + 2 * va2 - 0.5 * vb, 8)
    assert result["query"] == f"{a} + 2:{a2} - 0.5:{b}"
    assert doc["terms"] == [{"kind": "image", "value": str(a), "weight": 1.0},
                            {"kind": "image", "value": str(a2), "weight": 2.0},
                            {"kind": "image", "value": str(b), "weight": -0.5}]
    assert doc["min_score"] is None and doc["under"] is None


def test_under_and_min_score_filter_each_image_query(db):
    paths, vecs = stored(db, LITE0)
    queries = [photo(db, "a", 0), photo(db, "a", 3)]
    folder = os.path.realpath(db / "imgs" / "b") + os.sep
    doc = run_json(*queries, "--under", db / "imgs" / "b", "--min-score", 0.3, "-k", 5, "--db", db / "db",
                   "--encoder", LITE0)
    assert "terms" not in doc and doc["min_score"] == 0.3 and doc["under"] == str(db / "imgs" / "b")
    assert len(doc["results"]) == 2  # without --text/--minus, each image is its own query
    for q, result in zip(queries, doc["results"]):
        want = brute(paths, vecs, vecs[paths.index(item_path(q))], 5, lambda p: p.startswith(folder), 0.3)
        assert [h["path"] for h in result["hits"]] == want and result["query"] == str(q)
        assert all(h["score"] >= 0.3 - 1e-6 for h in result["hits"])
    # a glob: files of b/ whose name starts with "n015"... whatever it holds, exactly those
    glob = str(db / "imgs" / "*" / "n01[5-6]*.JPEG")
    doc = run_json(queries[0], "--under", glob, "-k", 24, "--db", db / "db", "--encoder", LITE0)
    want = brute(paths, vecs, vecs[paths.index(item_path(queries[0]))], 24,
                 lambda p: os.path.basename(p)[:4] in ("n015", "n016"))
    assert [h["path"] for h in doc["results"][0]["hits"]] == want and want


def test_words_rank_as_brute_force(db, models_dir):
    from simsearch.encoders.registry import get_encoder
    from simsearch.encoders.text import TextEncoder

    spec = get_encoder("tiny-clip", models_dir)
    paths, vecs = stored(db, spec.name)
    words = TextEncoder(spec).embed(["red car", "a photo of a dog", "fruit"])  # (3, dim)
    b = photo(db, "b", 4)
    doc = run_json("--text", "red car", "-t", "0.5:a photo of a dog", "--minus", "fruit", "-k", 24,
                   "--db", db / "db", "--encoder", spec.name)
    assert [h["path"] for h in doc["results"][0]["hits"]] == brute(paths, vecs, words[0] + 0.5 * words[1] - words[2], 24)
    assert doc["terms"] == [{"kind": "text", "value": "red car", "weight": 1.0},
                            {"kind": "text", "value": "a photo of a dog", "weight": 0.5},
                            {"kind": "text", "value": "fruit", "weight": -1.0}]
    # one --text in the query syntax: words and an image (an existing file), under a folder, cut at a score
    vb = vecs[paths.index(item_path(b))]
    doc = run_json("--text", f'"2:red car" + {b} - fruit', "--under", db / "imgs" / "a", "--min-score", -0.2,
                   "-k", 24, "--db", db / "db", "--encoder", spec.name)
    folder = os.path.realpath(db / "imgs" / "a") + os.sep
    want = brute(paths, vecs, 2 * words[0] + vb - words[2], 24, lambda p: p.startswith(folder), -0.2)
    assert [h["path"] for h in doc["results"][0]["hits"]] == want and want
    assert [t["kind"] for t in doc["terms"]] == ["text", "image", "text"] and doc["min_score"] == -0.2


def test_the_table_names_the_query_and_its_filters(db):
    a, b = photo(db, "a", 0), photo(db, "b", 1)
    result = runner.invoke(app, ["query", str(a), "--minus", str(b), "--min-score", "0.99", "--db", str(db / "db"),
                                 "--encoder", LITE0])
    assert result.exit_code == 0, result.output
    assert f"{a.name} - " in result.stdout.replace("\n", "") and "score >= 0.99" in result.stdout
    assert "only 0 images pass the filters (score >= 0.99)" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["query", "--db", "{db}"], "give query images, or words with --text"),
    (["query", "--text", "a red car", "--db", "{db}", "--encoder", LITE0],
     f"encoder '{LITE0}' has no text tower"),
    (["query", "{img}", "--minus", "fruit", "--db", "{db}", "--encoder", LITE0], "add a CLIP encoder"),
    (["query", "2:{tmp}/missing.jpg", "--minus", "{img}", "--db", "{db}", "--encoder", LITE0], "no such file"),
    (["query", "{img}", "--minus", "{img}", "--db", "{db}", "--encoder", LITE0], "cancel out"),
    (["query", "--text", "a + + b", "--db", "{db}", "--encoder", "tiny-clip"], "an empty term"),
    (["query", "{img}", "--min-score", "2", "--db", "{db}"], "--min-score"),
])
def test_mistakes_give_one_line(db, tmp_path, args, message):
    fmt = {"img": str(photo(db, "a", 0)), "tmp": str(tmp_path), "db": str(db / "db")}
    result = runner.invoke(app, [a.format(**fmt) for a in args])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_a_text_query_process_does_not_import_torch(db):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from simsearch.cli import main\n"
        f"sys.argv = ['simsearch', 'query', '--text', 'red car', '--minus', {str(photo(db, 'a', 0))!r}, '-k', '3',\n"
        f"            '--db', {str(db / 'db')!r}, '--encoder', 'tiny-clip']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'onnx', 'onnxscript'})\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "red car - " in proc.stdout
