"""Searcher.similar against brute force over the stored vectors, and the library's typed errors for an item the db
does not hold and an empty index."""

from types import SimpleNamespace

import numpy as np
import pytest

from simsearch.errors import EmptyDbError, NotFoundError
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import open_index, refresh, require_vectors
from simsearch.retrieval.search import Searcher

DIM = 8


def unit(n, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def searcher_over(store):
    """A Searcher whose encoder is only its identity: `similar` searches stored vectors and embeds nothing."""
    index, _ = open_index(store, "e")
    return Searcher(store, SimpleNamespace(spec=SimpleNamespace(key="k", dim=DIM)), index, "e")


def test_similar_is_brute_force_over_the_stored_vectors_with_the_item_first(tmp_path):
    vecs = unit(30)
    vecs[7] = vecs[3]  # an exact duplicate of item 3: it ties with 3 itself, and 3 must still come first
    with Store(tmp_path, create=True) as store:
        store.register_encoder("e", "k", DIM, "crop")
        store.put_items("k", [(f"/p/{i}.jpg", f"h{i}", 1, 1, v) for i, v in enumerate(vecs)])
        refresh(store, "e")
        searcher = searcher_over(store)
        for item in (3, 7, 12):
            hits = searcher.similar(item, 5)
            brute = vecs @ vecs[item]  # (30,)
            assert hits[0].id == item and [h.rank for h in hits] == [1, 2, 3, 4, 5]
            others = [i for i in np.argsort(-brute, kind="stable") if i != item][:4]
            assert sorted(h.id for h in hits[1:]) == sorted(int(i) for i in others)
            np.testing.assert_allclose([h.score for h in hits], brute[[h.id for h in hits]], atol=1e-5)
            assert hits[0].path == f"/p/{item}.jpg"
        store.remove_items(["/p/12.jpg"])
        store.put_items("k", [("/p/12.jpg", "h12b", 1, 1, unit(1, 5)[0])])  # the same path, a new item and id
        refresh(store, "e")
        searcher = searcher_over(store)
        with pytest.raises(NotFoundError, match="no item with id 12"):
            searcher.similar(12, 5)
        with pytest.raises(NotFoundError, match="no item with id 99"):
            searcher.similar(99, 5)
        hits = searcher.similar(30, 30)  # the new item; the removed one is never in the index with its vector
        assert hits[0].path == "/p/12.jpg" and 12 not in [h.id for h in hits] and len(hits) == 30


def test_an_empty_index_is_the_empty_db_error(tmp_path):
    with Store(tmp_path, create=True) as store:
        store.register_encoder("e", "k", DIM, "crop")
        refresh(store, "e")
        index, _ = open_index(store, "e")
        with pytest.raises(EmptyDbError, match="is empty"):
            require_vectors(index, "e", store)
