"""Text and combined queries over HTTP (GET /api/search, POST /api/query with terms) through FastAPI's TestClient:
the real app over a real db indexed with a tiny CLIP encoder (random ONNX towers, a real tokenizer) and with
EfficientNet-Lite0 (no text tower). Random weights rank arbitrarily, so every answer is checked against brute force:
normalize(sum of weight x unit vector) over the terms (TextEncoder for words, the stored vectors for items), scored
against every stored vector with numpy."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from simsearch.encoders.runtime import OnnxEncoder
from simsearch.encoders.text import TextEncoder
from simsearch.indexer.pipeline import Indexer
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import refresh
from simsearch.server.app import ServerConfig, create_app

from ..conftest import copy_samples
from .conftest import CLIP

PER_FOLDER = 12  # photos in each of imgs/a and imgs/b


@pytest.fixture(scope="module")
def root(tmp_path_factory, clip, encoder, models_dir) -> Path:
    """imgs/a (the first 12 imagenet-samples photos), imgs/b (the next 12) and a db of both, indexed with the tiny
    CLIP encoder first (the db's default) and with EfficientNet-Lite0."""
    root = tmp_path_factory.mktemp("search")
    copy_samples(root / "imgs" / "a", PER_FOLDER)
    copy_samples(root / "imgs" / "b", PER_FOLDER, start=PER_FOLDER)
    with Store(root / "db", create=True) as store:
        for enc in (OnnxEncoder(clip, models_dir=models_dir), encoder):
            Indexer(enc, store).run(root / "imgs")
            refresh(store, enc.spec.name)
    return root


@pytest.fixture(scope="module")
def client(root, models_dir):
    with TestClient(create_app(ServerConfig(db=root / "db", models_dir=models_dir))) as c:
        yield c


@pytest.fixture(scope="module")
def store(client) -> Store:
    """The server's own read-only store (py-lmdb refuses a second open of one db in a process)."""
    return client.app.state.library.store


@pytest.fixture(scope="module")
def items(store) -> dict[str, int]:
    """path -> item id."""
    return {p: rec.id for p, rec in store.iter_items()}


@pytest.fixture(scope="module")
def words(clip):
    """texts -> their unit vectors from the text tower, (N, dim)."""
    tower = TextEncoder(clip)
    return lambda texts: unit(tower.embed(texts))


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def stored(store: Store, ids: list[int]) -> np.ndarray:
    """(len(ids), dim) stored vectors of the CLIP encoder."""
    entry = store.manifest.encoders[CLIP]
    return store.vectors_of_ids(entry.key, ids, entry.dim)


def brute(store: Store, items: dict[str, int], parts: list[tuple[np.ndarray, float]], k: int,
          keep: Callable[[str], bool] = lambda path: True, min_score: float | None = None) -> tuple[list, np.ndarray]:
    """(ids, scores) of the top k: q = normalize(sum w e) over parts [(unit vector (dim,), weight)], scored against
    every stored vector of the items whose path `keep` keeps, cut at min_score."""
    q = unit(sum(w * e.astype(np.float64) for e, w in parts))  # (dim,)
    ids = np.array([i for p, i in items.items() if keep(p)])
    scores = stored(store, list(ids)) @ q  # (n,)
    order = np.argsort(-scores, kind="stable")
    if min_score is not None:
        order = order[scores[order] >= min_score]
    return list(ids[order[:k]]), scores[order[:k]]


def check_hits(doc: dict, expected: tuple[list, np.ndarray]) -> None:
    ids, scores = expected
    assert [h["id"] for h in doc["hits"]] == ids
    assert [h["rank"] for h in doc["hits"]] == list(range(1, len(ids) + 1))
    np.testing.assert_allclose([h["score"] for h in doc["hits"]], scores, atol=1e-5)


def test_info_says_which_encoders_have_a_text_tower(client, encoder):
    info = client.get("/api/info").json()
    assert info["default_encoder"] == CLIP
    assert {n: e["text"] for n, e in info["encoders"].items()} == {CLIP: True, encoder.spec.name: False}


def test_words_are_brute_force_over_the_text_tower(client, store, items, words):
    doc = client.get("/api/search", params={"text": "a red car", "k": 5}).json()
    assert doc["encoder"] == CLIP and doc["k"] == 5 and doc["reranker"] is None
    assert doc["terms"] == [{"kind": "text", "value": "a red car", "weight": 1.0}]
    assert doc["under"] is None and doc["min_score"] is None and set(doc["seconds"]) >= {"load+embed", "search"}
    check_hits(doc, brute(store, items, [(words(["a red car"])[0], 1.0)], 5))
    other = client.get("/api/search", params={"text": "a photo of a dog", "k": 5}).json()
    check_hits(other, brute(store, items, [(words(["a photo of a dog"])[0], 1.0)], 5))
    assert [h["id"] for h in other["hits"]] != [h["id"] for h in doc["hits"]]  # distinct words, distinct answers


def test_every_kind_of_term_combined(client, store, items, words):
    """Repeated text, minus, like and unlike: one query vector, the sum of all seven terms."""
    a, b, c = sorted(items.values())[3:6]
    params = [("text", "a red car"), ("text", "golden retriever"), ("minus", "grass"), ("minus", "snow"),
              ("like", a), ("like", b), ("unlike", c), ("k", 24)]
    doc = client.get("/api/search", params=params).json()
    assert doc["terms"] == [
        {"kind": "text", "value": "a red car", "weight": 1.0}, {"kind": "text", "value": "golden retriever",
                                                                "weight": 1.0},
        {"kind": "text", "value": "grass", "weight": -1.0}, {"kind": "text", "value": "snow", "weight": -1.0},
        {"kind": "item", "value": a, "weight": 1.0}, {"kind": "item", "value": b, "weight": 1.0},
        {"kind": "item", "value": c, "weight": -1.0}]
    t = words(["a red car", "golden retriever", "grass", "snow"])
    v = stored(store, [a, b, c])
    parts = [(t[0], 1), (t[1], 1), (t[2], -1), (t[3], -1), (v[0], 1), (v[1], 1), (v[2], -1)]
    assert doc["k"] == 24 and len(doc["hits"]) == 24  # every item, each once
    check_hits(doc, brute(store, items, parts, 24))


def test_items_alone_search_by_their_stored_vectors(client, store, items):
    a, b = sorted(items.values())[:2]
    like = client.get("/api/search", params={"like": a, "k": 6}).json()
    assert [h["id"] for h in like["hits"]] == [h["id"] for h in client.get(f"/api/items/{a}/similar",
                                                                          params={"k": 6}).json()["hits"]]
    check_hits(like, brute(store, items, [(stored(store, [a])[0], 1.0)], 6))
    both = client.get("/api/search", params={"like": a, "unlike": b, "k": 6}).json()
    v = stored(store, [a, b])
    check_hits(both, brute(store, items, [(v[0], 1.0), (v[1], -1.0)], 6))


def test_under_a_folder_or_a_glob(client, root, store, items, words):
    q = [(words(["a red car"])[0], 1.0)]
    folder = os.path.realpath(root / "imgs" / "a")
    doc = client.get("/api/search", params={"text": "a red car", "under": folder, "k": 20}).json()
    assert doc["under"] == folder and len(doc["hits"]) == PER_FOLDER  # all the folder holds, though k is 20
    check_hits(doc, brute(store, items, q, 20, keep=lambda p: p.startswith(folder + os.sep)))
    glob = os.path.realpath(root / "imgs") + "/*/n015*.JPEG"  # both folders, one range of classes
    doc = client.get("/api/search", params={"text": "a red car", "under": glob, "k": 10}).json()
    expected = brute(store, items, q, 10, keep=lambda p: Path(p).name.startswith("n015"))
    assert 0 < len(expected[0]) < 2 * PER_FOLDER
    check_hits(doc, expected)
    nothing = client.get("/api/search", params={"text": "a red car", "under": str(root / "nowhere")})
    assert nothing.status_code == 200 and nothing.json()["hits"] == []


def test_min_score_cuts_the_hits(client, store, items, words):
    q = [(words(["golden retriever"])[0], 1.0)]
    scores = brute(store, items, q, 24)[1]
    cut = float((scores[5] + scores[6]) / 2)  # between the 6th and the 7th best
    doc = client.get("/api/search", params={"text": "golden retriever", "min_score": cut, "k": 10}).json()
    assert doc["min_score"] == cut and len(doc["hits"]) == 6
    check_hits(doc, brute(store, items, q, 10, min_score=cut))


def test_an_upload_with_terms(client, root, store, items, words):
    """The upload is the first term: its image-tower vector, here the stored vector of the same photo."""
    photo = sorted((root / "imgs" / "b").iterdir())[0]
    own = stored(store, [items[os.path.realpath(photo)]])[0]
    away = sorted(items.values())[0]
    params = {"text": "a photo of a dog", "unlike": away, "k": 8}
    r = client.post("/api/query", params=params, files={"image": (photo.name, photo.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["terms"] == [{"kind": "image", "value": photo.name, "weight": 1.0},
                            {"kind": "text", "value": "a photo of a dog", "weight": 1.0},
                            {"kind": "item", "value": away, "weight": -1.0}]
    parts = [(own, 1.0), (words(["a photo of a dog"])[0], 1.0), (stored(store, [away])[0], -1.0)]
    check_hits(doc, brute(store, items, parts, 8))
    # the same upload alone, kept to folder b: the photo itself first
    folder = os.path.realpath(root / "imgs" / "b")
    r = client.post("/api/query", params={"under": folder, "k": 3},
                    files={"image": (photo.name, photo.read_bytes(), "image/jpeg")})
    doc = r.json()
    assert doc["under"] == folder and doc["hits"][0]["id"] == items[os.path.realpath(photo)]
    check_hits(doc, brute(store, items, [(own, 1.0)], 3, keep=lambda p: p.startswith(folder + os.sep)))


@pytest.mark.parametrize("params, status, words", [
    ({}, 400, "nothing to search for: give text, minus, like or unlike"),
    ({"k": 3}, 400, "nothing to search for"),
    ({"text": "a red car", "encoder": "efficientnet-lite0"}, 400, "'efficientnet-lite0' has no text tower"),
    ({"minus": "grass", "encoder": "efficientnet-lite0"}, 400, "has no text tower"),
    ({"text": "a red car", "minus": "a red car"}, 400, "cancel out"),
    ({"like": 999999}, 404, "no item with id 999999"),
    ({"text": "x", "encoder": "nope"}, 404, "no vectors of encoder 'nope'"),
    ({"like": -1}, 422, "like.0: Input should be greater than or equal to 0"),
    ({"unlike": "abc"}, 422, "unlike.0: Input should be a valid integer"),
    ({"text": ""}, 422, "text.0: String should have at least 1 character"),
    ({"text": "x" * 1001}, 422, "text.0: String should have at most 1000 characters"),
    ({"text": ["x"] * 33}, 422, "text: List should have at most 32 items"),
    ({"text": "x", "min_score": 1.5}, 422, "min_score: Input should be less than or equal to 1"),
    ({"text": "x", "under": "a\0b"}, 422, "under: String should match pattern"),
    ({"text": "x", "k": 0}, 422, "k: Input should be greater than or equal to 1"),
])
def test_search_errors_are_one_line_json(client, params, status, words):
    r = client.get("/api/search", params=params)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and words in detail, detail


def test_words_on_an_upload_need_a_text_tower(client, root):
    photo = sorted((root / "imgs" / "a").iterdir())[0]
    upload = {"image": (photo.name, photo.read_bytes(), "image/jpeg")}
    r = client.post("/api/query", params={"text": "a red car", "encoder": "efficientnet-lite0"}, files=upload)
    assert r.status_code == 400 and "'efficientnet-lite0' has no text tower" in r.json()["detail"]
    r = client.post("/api/query", params={"like": 999999}, files=upload)
    assert r.status_code == 404 and r.json()["detail"] == "no item with id 999999 in the db"
    r = client.post("/api/query", params={"text": "a red car"}, files={"image": ("x.png", b"junk", "image/png")})
    assert r.status_code == 422 and r.json()["detail"].startswith("x.png: not an image")  # the client's name


_NO_TORCH = """
import sys
from pathlib import Path
from fastapi.testclient import TestClient
from simsearch.server.app import ServerConfig, create_app
with TestClient(create_app(ServerConfig(db=Path(sys.argv[1])))) as c:
    r = c.get("/api/search", params={"text": "a red car", "minus": "grass", "like": 0})
    assert r.status_code == 200 and r.json()["hits"], r.text
print("torch" in sys.modules)
"""


def test_text_queries_never_import_torch(root, client):
    out = subprocess.run([sys.executable, "-c", _NO_TORCH, str(root / "db")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
