"""Combined queries (retrieval/query.py, Searcher.search): the query syntax, the combined vector against numpy, and
the min_score and under filters against brute force over the stored vectors, on both of under's paths (exact over a
small subset, the index searched deeper for a big one); then real photos through the real encoder and rerankers."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from simsearch.errors import ImageLoadError, NotFoundError, SimsearchError
from simsearch.indexer.pipeline import Indexer
from simsearch.indexer.scan import item_path
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import RefreshConfig, open_index, refresh
from simsearch.retrieval.index_plan import IndexConfig
from simsearch.retrieval.query import PathFilter, Query, Term, describe, parse_terms
from simsearch.retrieval.search import Searcher

from ..conftest import copy_samples

DIM = 8


# -- the query syntax ---------------------------------------------------------------------------------------------
FILES = {"./pool.jpg", "dog.jpg", "a - b.jpg"}  # the "files" of these queries: is_image needs no file system


def jpg(value: str) -> bool:
    return value in FILES


@pytest.mark.parametrize("text, terms", [
    ('"2:golden retriever" + ./pool.jpg - fruit',
     (Term("text", "golden retriever", 2.0), Term("image", "./pool.jpg"), Term("text", "fruit", -1.0))),
    ("t-shirt", (Term("text", "t-shirt"),)),  # a "-" inside a word is no operator
    ("a red car   -   0.5:blue sky", (Term("text", "a red car"), Term("text", "blue sky", -0.5))),
    ("- fruit + .25:dog.jpg", (Term("text", "fruit", -1.0), Term("image", "dog.jpg", 0.25))),
    ('2:"rock + roll" - "a - b.jpg"', (Term("text", "rock + roll", 2.0), Term("image", "a - b.jpg", -1.0))),
    ("1:3:10 to yuma", (Term("text", "3:10 to yuma"),)),  # an explicit weight keeps a text's own "3:"
    ("3:10 to yuma", (Term("text", "10 to yuma", 3.0),)),
    ("a dog's toy", (Term("text", "a dog's toy"),)),  # an apostrophe quotes nothing
    ("-2:fruit + 7.:x", (Term("text", "fruit", -2.0), Term("text", "x", 7.0))),
])
def test_parse_terms(text, terms):
    assert parse_terms(text, jpg) == terms
    assert parse_terms(describe(terms), jpg) == terms  # describe writes what parse_terms reads back


def test_parse_terms_reads_no_file_unless_asked(tmp_path):
    photo = tmp_path / "pool.jpg"
    photo.write_bytes(b"")
    assert parse_terms(f"cat + {photo}") == (Term("text", "cat"), Term("text", str(photo)))
    assert parse_terms(f"cat + {photo}", os.path.isfile) == (Term("text", "cat"), Term("image", str(photo)))
    odd = tmp_path / "2:odd.jpg"  # a file whose name looks weighted is that file
    odd.write_bytes(b"")
    assert parse_terms(str(odd), os.path.isfile) == (Term("image", str(odd)),)


@pytest.mark.parametrize("text, message", [
    ("", "an empty query"), ("   ", "an empty query"), ("a + + b", "an empty term"), ("a +", "an empty term"),
    ("a - ", "an empty term"), ('"" + b', "an empty term"), ('"red car', "unmatched quote"),
    ("2:", "a weight with no term"),
])
def test_parse_terms_refuses(text, message):
    with pytest.raises(SimsearchError, match=message):
        parse_terms(text)


def test_describe_items_and_weights():
    terms = (Term("item", 12, 2.0), Term("text", "fruit", -0.5), Term("image", "/a/b.jpg"))
    assert describe(terms) == "2:item:12 - 0.5:fruit + /a/b.jpg"


def test_path_filter_folder_and_glob(tmp_path):
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    real = os.path.realpath(tmp_path / "real")
    folder = PathFilter.of(str(tmp_path / "link"))  # stored paths have their folders' symlinks resolved
    assert folder.folder == real and folder.pattern is None
    assert folder(f"{real}/a.jpg") and folder(f"{real}/sub/b.jpg") and not folder(f"{real}2/a.jpg")
    glob = PathFilter.of(str(tmp_path / "link" / "*.jpg"))
    assert glob.folder == real
    assert glob(f"{real}/a.jpg") and not glob(f"{real}/sub/b.jpg") and not glob(f"{real}/a.png")
    deep = PathFilter.of(str(tmp_path / "link" / "**" / "[ab]?.jpg"))
    assert deep(f"{real}/a1.jpg") and deep(f"{real}/sub/b2.jpg") and not deep(f"{real}/sub/c2.jpg")
    assert not PathFilter.of(str(tmp_path / "link" / "[!a]*.jpg"))(f"{real}/a.jpg")
    cwd = os.getcwd()
    try:  # relative: from the current folder, as `simsearch index FOLDER` takes it
        os.chdir(tmp_path)
        assert PathFilter.of("link/*.jpg") == glob and PathFilter.of("link").folder == real
    finally:
        os.chdir(cwd)


# -- stored vectors: items, min_score, under ----------------------------------------------------------------------
def unit(n, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def folder_of(i: int) -> str:
    """400 items: /p/a (0-149), /p/b (150-299, 150-199 of them in /p/b/c), /q (300-394), /q/x (395-399)."""
    return "/p/a" if i < 150 else "/p/b/c" if i < 200 else "/p/b" if i < 300 else "/q" if i < 395 else "/q/x"


PATHS = [f"{folder_of(i)}/{i:03d}{'.png' if i % 7 == 0 else '.jpg'}" for i in range(400)]
VECS = unit(400)


def searcher_over(root: Path, kind: str = "flat") -> Searcher:
    """400 items with vectors (id == index in PATHS) in a db at root, indexed with `kind`; a searcher whose encoder
    is only its identity: these queries embed nothing."""
    with Store(root, create=True) as store:
        store.register_encoder("e", "k", DIM, "crop")
        store.put_items("k", [(p, f"h{i}", 1, 1, v) for i, (p, v) in enumerate(zip(PATHS, VECS))])
        refresh(store, "e", RefreshConfig(IndexConfig(kind=kind)))
    store = Store(root, readonly=True)
    index, _ = open_index(store, "e")
    return Searcher(store, SimpleNamespace(spec=SimpleNamespace(key="k", dim=DIM)), index, "e")


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """An exact (flat) index: every filtered search equals brute force over the stored vectors."""
    with searcher_over(tmp_path_factory.mktemp("q")) as searcher:
        yield searcher


def brute(q: np.ndarray, k: int, keep=lambda path: True, min_score: float | None = None
          ) -> tuple[list[int], np.ndarray]:
    """The ids of the top k items `keep` keeps scoring >= min_score, best first, and every item's score (400,)."""
    scores = VECS @ q
    ids = [int(i) for i in np.argsort(-scores, kind="stable")
           if keep(PATHS[i]) and (min_score is None or scores[i] >= min_score)]
    return ids[:k], scores


def normalized(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_item_terms_combine_as_the_weighted_sum_of_their_vectors(stored):
    terms = (Term("item", 3, 2.0), Term("item", 17, -1.0), Term("item", 250, 0.5))
    expected = normalized(2 * VECS[3] - VECS[17] + 0.5 * VECS[250])
    np.testing.assert_allclose(stored.query_vector(terms), expected, atol=1e-6)
    result = stored.search(Query(terms), k=10)
    assert [h.id for h in result.hits] == brute(expected, 10)[0] and [h.rank for h in result.hits] == list(range(1, 11))
    np.testing.assert_allclose([h.score for h in result.hits], (VECS @ expected)[[h.id for h in result.hits]],
                               atol=1e-5)
    assert result.query == "2:item:3 - item:17 + 0.5:item:250" and set(result.seconds) == {"load+embed", "search"}
    assert [h.path for h in result.hits] == [PATHS[h.id] for h in result.hits]


def test_a_query_that_cancels_out_or_names_no_item_is_refused(stored):
    with pytest.raises(SimsearchError, match="cancel out"):
        stored.search(Query((Term("item", 3, 1.5), Term("item", 3, -1.5))))
    with pytest.raises(NotFoundError, match="no item with id 4000"):
        stored.search(Query((Term("item", 3), Term("item", 4000))))
    with pytest.raises(SimsearchError, match="at least one"):
        stored.search(Query(()))
    with pytest.raises(SimsearchError, match="k must be at least 1"):
        stored.search(Query((Term("item", 3),)), k=0)


@pytest.mark.parametrize("min_score", [0.3, 0.75, 1.0])
def test_min_score_keeps_exactly_the_hits_at_or_above_it(stored, min_score):
    q = VECS[42]
    result = stored.search(Query((Term("item", 42),), min_score=min_score), k=30)
    ids, scores = brute(q, 30, min_score=min_score - 1e-6)
    assert [h.id for h in result.hits] == ids
    np.testing.assert_allclose([h.score for h in result.hits], scores[ids], atol=1e-5)
    assert result.hits[0].id == 42 and all(h.score >= min_score - 1e-6 for h in result.hits)
    if min_score == 1.0:  # float32 rounding: the item itself scores 0.99999994
        assert len(result.hits) == 1


@pytest.mark.parametrize("under, keep", [
    ("/q", lambda p: p.startswith("/q/")),
    ("/p/b", lambda p: p.startswith("/p/b/")),  # 150 items, its subfolder included
    ("/p/b/*.jpg", lambda p: p.startswith("/p/b/") and p.count("/") == 3 and p.endswith(".jpg")),
    ("/p/**/*.png", lambda p: p.startswith("/p/") and p.endswith(".png")),
    ("/q/x/397.jpg", lambda p: p == "/q/x/397.jpg"),  # a single item
    ("/nowhere", lambda p: False),
])
@pytest.mark.parametrize("exact", [True, False])
def test_under_returns_the_top_k_of_the_subset_as_brute_force(stored, under, keep, exact, caplog):
    """exact: the subset is searched over its stored vectors; else (exact_subset 0) the index is searched deeper
    (64, 256, then all 400 candidates) until k hits under it are found."""
    stored.exact_subset = 4096 if exact else 0
    q = normalized(VECS[0] - VECS[301])  # far from most of /q: its items are deep in the index's order
    caplog.set_level(logging.DEBUG, "simsearch.retrieval.search")
    order = list(np.argsort(-(VECS @ q), kind="stable"))
    deeper = False  # whether the first depth, max(4 k, 64), held fewer than k of the subset's items
    for k in (1, 5, 40):
        result = stored.search(Query((Term("item", 0), Term("item", 301, -1.0)), under=under), k=k)
        ids, scores = brute(q, k, keep)
        assert len(ids) == min(k, sum(map(keep, PATHS)))  # k hits wherever that many are under it
        assert [h.id for h in result.hits] == ids and [h.rank for h in result.hits] == list(range(1, len(ids) + 1))
        np.testing.assert_allclose([h.score for h in result.hits], scores[ids], atol=1e-5)
        deeper |= bool(ids) and (len(ids) < k or order.index(ids[-1]) >= max(4 * k, 64))
    # an empty subset is exact whatever the bound: there is nothing to read
    assert ("searching deeper" in caplog.text) == (deeper and not exact)
    stored.exact_subset = 4096


@pytest.mark.parametrize("exact", [True, False])
def test_under_and_min_score_together(stored, exact):
    stored.exact_subset = 4096 if exact else 0
    try:
        q = VECS[120]
        for min_score in (0.2, 0.6):
            result = stored.search(Query((Term("item", 120),), min_score=min_score, under="/q"), k=20)
            ids, scores = brute(q, 20, lambda p: p.startswith("/q/"), min_score - 1e-6)
            assert [h.id for h in result.hits] == ids
            assert all(h.score >= min_score - 1e-6 for h in result.hits)
    finally:
        stored.exact_subset = 4096


def test_min_score_on_a_compressed_index_judges_the_exact_cosines(tmp_path):
    """sq8 (8-bit codes): the index re-scores its candidates from the stored vectors, so every score is the exact
    cosine and a hit is kept or dropped on it (which candidates the index finds is its own approximation)."""
    with searcher_over(tmp_path, "sq8") as searcher:
        for item, min_score in ((42, 0.3), (42, 0.6), (7, 0.5)):
            q = VECS[item]
            plain = searcher.search(Query((Term("item", item),)), k=30).hits
            cut = searcher.search(Query((Term("item", item),), min_score=min_score), k=30).hits
            exact = VECS @ q
            np.testing.assert_allclose([h.score for h in plain], exact[[h.id for h in plain]], atol=1e-5)
            assert [h.id for h in plain] == sorted((h.id for h in plain), key=lambda i: -exact[i])
            assert [h.id for h in cut] == [h.id for h in plain if exact[h.id] >= min_score - 1e-6]


def test_under_skips_items_without_a_vector_and_sees_items_newer_than_the_index(tmp_path):
    """The exact path reads the store: an item indexed after the index was built is found, one whose image was
    skipped (no vector) is not."""
    with Store(tmp_path, create=True) as store:
        store.register_encoder("e", "k", DIM, "crop")
        store.put_items("k", [(p, f"h{i}", 1, 1, v) for i, (p, v) in enumerate(zip(PATHS[:10], VECS[:10]))])
        refresh(store, "e")
        store.put_items("k", [("/p/a/new.jpg", "hn", 1, 1, VECS[10]), ("/p/a/skipped.jpg", "hs", 1, 1, None)])
        index, _ = open_index(store, "e")
        searcher = Searcher(store, SimpleNamespace(spec=SimpleNamespace(key="k", dim=DIM)), index, "e")
        hits = searcher.search(Query((Term("item", 3),), under="/p/a"), k=20).hits
        assert sorted(h.path for h in hits) == sorted(PATHS[:10] + ["/p/a/new.jpg"])


# -- real photos, the real encoder -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photos(tmp_path_factory, encoder):
    """24 photos in a/ (12) and b/ (12), indexed with efficientnet-lite0."""
    root = tmp_path_factory.mktemp("photos")
    copy_samples(root / "imgs" / "a", 12)
    copy_samples(root / "imgs" / "b", 12, start=12)
    with Store(root / "db", create=True) as store:
        Indexer(encoder, store).run(root / "imgs")
        refresh(store, encoder.spec.name)
    return root


def stored_vectors(root: Path, encoder) -> tuple[list[str], np.ndarray]:
    """Every item's path and stored vector (N, dim), path order."""
    with Store(root / "db", readonly=True) as store:
        paths = [p for p, _ in store.iter_items()]
        return paths, store.vectors_of(encoder.spec.key, paths, encoder.spec.dim)


def test_image_terms_combine_as_numpy_does(photos, encoder):
    paths, vecs = stored_vectors(photos, encoder)
    a, b, c = (sorted((photos / "imgs" / f).iterdir())[i] for f, i in (("a", 0), ("b", 3), ("a", 7)))
    terms = (Term("image", str(a)), Term("image", str(b), -0.5), Term("image", str(c), 2.0))
    va, vb, vc = (vecs[paths.index(item_path(p))] for p in (a, b, c))  # the stored vectors are these images'
    expected = normalized(va - 0.5 * vb + 2 * vc)
    with Searcher.open(photos / "db", encoder) as searcher:
        np.testing.assert_allclose(searcher.query_vector(terms), expected, atol=1e-4)
        result = searcher.search(Query(terms), k=24)
        # an image in the db and its item: the same vector (the item's is read, the image's embedded again)
        item = searcher.store.get_item(item_path(c)).id
        mixed = searcher.search(Query(terms[:2] + (Term("item", item, 2.0),)), k=24)
    scores = vecs @ expected
    order = np.argsort(-scores, kind="stable")
    assert [h.path for h in result.hits] == [paths[i] for i in order]
    np.testing.assert_allclose([h.score for h in result.hits], scores[order], atol=1e-4)
    assert [h.path for h in mixed.hits] == [h.path for h in result.hits]
    assert result.query == f"{a} - 0.5:{b} + 2:{c}"


def test_query_paths_takes_the_filters_each_image_its_own_query(photos, encoder):
    paths, vecs = stored_vectors(photos, encoder)
    queries = sorted((photos / "imgs" / "a").iterdir())[:3]
    b = os.path.realpath(photos / "imgs" / "b")
    with Searcher.open(photos / "db", encoder) as searcher:
        results = searcher.query(queries, k=5, min_score=0.35, under=str(photos / "imgs" / "b"))
        single = searcher.search(Query((Term("image", str(queries[1])),), 0.35, str(photos / "imgs" / "b")), k=5)
    for q, r in zip(queries, results):
        scores = vecs @ vecs[paths.index(item_path(q))]
        want = [paths[i] for i in np.argsort(-scores, kind="stable") if paths[i].startswith(b + os.sep)
                and scores[i] >= 0.35][:5]
        assert [h.path for h in r.hits] == want and r.query == str(q)
    assert [h.path for h in single.hits] == [h.path for h in results[1].hits]
    assert single.query == str(queries[1])


def test_an_unreadable_image_term_fails_the_query(photos, encoder, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    good = next((photos / "imgs" / "a").iterdir())
    with Searcher.open(photos / "db", encoder) as searcher:
        with pytest.raises(ImageLoadError, match="bad.jpg"):
            searcher.search(Query((Term("image", str(good)), Term("image", str(bad), -1.0))))
        with pytest.raises(SimsearchError, match="no text tower"):  # efficientnet-lite0 reads no words
            searcher.search(Query((Term("image", str(good)), Term("text", "a red car"))))


@pytest.fixture(scope="module", params=["pretrained", "scratch"])
def reranker(request, classes, models_dir):
    """Tiny MatchNets on real Tiny ImageNet photos: pretrained reads efficientnet-lite0 embeddings ("encoder"),
    scratch reads 64 px pixels ("pixels")."""
    from simsearch.retrieval.rerank import Reranker, get_reranker
    from simsearch.training.matchnet import MatchNetConfig, train_matchnet

    name = f"query-{request.param}"
    train_matchnet(MatchNetConfig(name=name, tower=request.param, data=classes, pairs_per_epoch=320, epochs=1,
                                  holdout_per_class=2, lr=1e-3), models_dir)
    return Reranker(get_reranker(name, models_dir))


def test_rerankers_on_combined_queries(photos, encoder, reranker):
    """An "encoder" reranker reads the combined vector; a "pixels" one needs one query image and refuses the rest."""
    a, b = sorted((photos / "imgs" / "a").iterdir())[:2]
    combined = Query((Term("image", str(a)), Term("image", str(b), -0.5)), under=str(photos / "imgs"))
    with Searcher.open(photos / "db", encoder) as searcher:
        if reranker.spec.input == "pixels":
            with pytest.raises(SimsearchError, match="reranks a query of one image"):
                searcher.search(combined, k=3, reranker=reranker, depth=10)
            single = searcher.search(Query((Term("image", str(a)),)), k=3, reranker=reranker, depth=10)
            (same,) = searcher.query([a], k=3, reranker=reranker, depth=10)
            assert [(h.path, h.rerank_score) for h in single.hits] == [(h.path, h.rerank_score) for h in same.hits]
            return
        result = searcher.search(combined, k=3, reranker=reranker, depth=10)
        candidates = searcher.search(Query(combined.terms), k=10).hits
        vector = searcher.query_vector(combined.terms)
        stored = searcher.store.vectors_of_ids(encoder.spec.key, [h.id for h in candidates], encoder.spec.dim)
    order, probs = reranker.rerank(reranker.represent(vector[None])[0], reranker.represent(stored),
                                   np.array([h.score for h in candidates]))
    assert [h.path for h in result.hits] == [candidates[i].path for i in order[:3]]
    np.testing.assert_allclose([h.rerank_score for h in result.hits], probs[order[:3]], rtol=1e-5)
    assert "rerank" in result.seconds


# -- words: a tiny CLIP encoder (random towers: rankings are arbitrary, so brute force is the reference) -----------
@pytest.fixture(scope="module")
def clip_db(photos, models_dir):
    """The same 24 photos indexed with a tiny CLIP encoder."""
    from simsearch.encoders.runtime import OnnxEncoder

    from ..clip_models import add_tiny_clip

    spec = add_tiny_clip(models_dir)
    with Store(photos / "clip-db", create=True) as store:
        Indexer(OnnxEncoder(spec, models_dir=models_dir), store).run(photos / "imgs")
        refresh(store, spec.name)
    return photos / "clip-db", spec


def test_text_terms_rank_as_brute_force_over_the_stored_vectors(clip_db, photos, models_dir):
    from simsearch.encoders.text import TextEncoder

    db, spec = clip_db
    with Store(db, readonly=True) as store:
        paths = [p for p, _ in store.iter_items()]
        vecs = store.vectors_of(spec.key, paths, spec.dim)  # (24, 32)
    words = TextEncoder(spec).embed(["red car", "a photo of a dog", "fruit"])  # (3, 32)
    photo = sorted((photos / "imgs" / "b").iterdir())[2]
    cases = [
        ((Term("text", "red car"),), words[0]),
        ((Term("text", "a photo of a dog", 2.0), Term("text", "fruit", -1.0)), 2 * words[1] - words[2]),
        ((Term("text", "red car"), Term("image", str(photo), 0.5)),
         words[0] + 0.5 * vecs[paths.index(item_path(photo))]),
    ]
    with Searcher.open(db, spec.name, models_dir=models_dir) as searcher:
        image_only = searcher.search(Query((Term("image", str(photo)),)), k=3)
        assert searcher._text is None and image_only.hits[0].path == item_path(photo)  # no text tower loaded for it
        for terms, combined in cases:
            q = normalized(combined)
            np.testing.assert_allclose(searcher.query_vector(terms), q, atol=1e-5)
            for under in (None, str(photos / "imgs" / "a")):
                hits = searcher.search(Query(terms, under=under), k=24).hits
                scores = vecs @ q
                want = [i for i in np.argsort(-scores, kind="stable") if under is None or "/imgs/a/" in paths[i]]
                assert [h.path for h in hits] == [paths[i] for i in want]
                np.testing.assert_allclose([h.score for h in hits], scores[want], atol=1e-5)
        assert searcher.text_encoder() is searcher.text_encoder()  # loaded once
