"""The one JSON form of each result type (retrieval/views.py): plain JSON types, the path rules for names that are
not valid UTF-8, and the values against the store and a brute-force reference."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from simsearch.indexer.pipeline import Indexer
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import refresh
from simsearch.retrieval.dupes import DEFAULT_THRESHOLD, DupeGroup, DupeItem, find_duplicates
from simsearch.retrieval.search import Hit
from simsearch.retrieval.views import db_info, dupes_view, hit_view, path_fields

from ..conftest import copy_samples

ODD = os.fsdecode(b"/photos/Fotos_M\xfcnchen/caf\xe9.jpg")  # latin-1 bytes: surrogate escapes in the str


def strict_json(doc) -> object:
    """The document through a strict UTF-8 JSON round trip (a lone surrogate cannot be encoded)."""
    return json.loads(json.dumps(doc, ensure_ascii=False).encode("utf-8"))


def test_a_path_that_is_valid_utf8_is_itself():
    assert path_fields("/photos/café [1].jpg") == {"path": "/photos/café [1].jpg"}
    assert path_fields("/a.jpg", "query") == {"query": "/a.jpg"}


def test_a_path_that_is_not_utf8_is_shown_escaped_with_its_exact_bytes():
    fields = strict_json(path_fields(ODD))
    assert fields["path"] == "/photos/Fotos_M\\xfcnchen/caf\\xe9.jpg"
    assert base64.b64decode(fields["path_bytes"]) == b"/photos/Fotos_M\xfcnchen/caf\xe9.jpg"


def test_a_hit_is_json_types_only():
    view = hit_view(Hit(2, ODD, np.float32(0.5), None, 7))
    assert strict_json(view) == view
    assert view == {"rank": 2, "id": 7, "path": "/photos/Fotos_M\\xfcnchen/caf\\xe9.jpg",
                    "path_bytes": base64.b64encode(os.fsencode(ODD)).decode(), "score": 0.5, "rerank_score": None}
    assert type(view["score"]) is float
    assert hit_view(Hit(1, "/a.jpg", 0.9, np.float32(0.25), 3))["rerank_score"] == 0.25


def test_the_dupes_view_counts_what_could_go():
    a, b, c = (DupeItem(i, f"/p/{i}.jpg", 10, 10, 100 * i, s, t)
               for i, s, t in [(1, 1.0, "keeper"), (2, 0.97, "exact"), (3, 0.95, "edited")])
    odd = DupeItem(4, ODD, 0, 0, 7, 0.99, "similar")
    groups = [DupeGroup(a, [b, c], 0.95, "edited"), DupeGroup(DupeItem(5, "/p/5.jpg", 1, 1, 1), [odd], 0.99)]
    view = dupes_view(groups, "enc", None)
    assert strict_json(view) == view
    assert view["threshold"] == DEFAULT_THRESHOLD and view["encoder"] == "enc" and view["similar"] is False
    assert view["totals"] == {"groups": 2, "by_tier": {"exact": 0, "edited": 1, "similar": 1}, "removable_images": 3,
                              "reclaimable_bytes": 200 + 300 + 7}
    assert view["groups"][0] == {"tier": "edited",
                                 "keeper": {"id": 1, "path": "/p/1.jpg", "width": 10, "height": 10, "bytes": 100,
                                            "score": 1.0, "tier": "keeper"},
                                 "others": [{"id": 2, "path": "/p/2.jpg", "width": 10, "height": 10, "bytes": 200,
                                             "score": 0.97, "tier": "exact"},
                                            {"id": 3, "path": "/p/3.jpg", "width": 10, "height": 10, "bytes": 300,
                                             "score": 0.95, "tier": "edited"}],
                                 "min_score": 0.95}
    assert view["groups"][1]["tier"] == "similar" and view["groups"][1]["others"][0]["tier"] == "similar"
    assert view["groups"][1]["others"][0]["path_bytes"] == base64.b64encode(os.fsencode(ODD)).decode()
    assert dupes_view([], "enc", 0.9)["similar"] is True and dupes_view([], "enc", None, similar=True)["similar"]
    assert dupes_view([], "enc", 0.9)["threshold"] == 0.9


@pytest.fixture(scope="module")
def db(tmp_path_factory, encoder) -> Path:
    root = tmp_path_factory.mktemp("views")
    copy_samples(root / "imgs", 5)
    shutil.copy2(root / "imgs" / "n01443537_goldfish.JPEG", root / "imgs" / "goldfish copy.JPEG")
    with Store(root / "db", create=True) as store:
        Indexer(encoder, store).run(root / "imgs")
        refresh(store, encoder.spec.name)
    return root / "db"


def test_db_info_is_the_stores(db, encoder, tmp_path):
    name = encoder.spec.name
    with Store(db, readonly=True) as store:
        info = db_info(store)
        assert strict_json(info) == info
        assert info["db"] == str(db.absolute()) and info["items"] == 6 == store.item_count()
        assert info["generation"] == store.generation and info["default_encoder"] == name
        assert info["writer_active"] is False
        assert info["size_on_disk_bytes"] == sum(p.stat().st_size for p in db.rglob("*") if p.is_file())
        (got, enc), = info["encoders"].items()
        assert got == name and enc["dim"] == 1280 and enc["vectors_in_index"] == 6 and enc["backend"] == "faiss"
        assert enc["index_type"] == "flat" and enc["index_up_to_date"] is True and enc["index_problem"] is None
        assert enc["weights"] == encoder.spec.key and enc["index_file"] and (db / "index" / enc["index_file"]).is_file()
        # the exact duplicate is one group, as the library finds it
        groups = find_duplicates(store, name)
        assert dupes_view(groups, name, None)["totals"]["groups"] == len(groups) >= 1

    # a damaged index file is named when asked to verify, and only then (the server does not read it per request)
    copy = Path(shutil.copytree(db, tmp_path / "db"))
    index_file = copy / "index" / enc["index_file"]
    data = bytearray(index_file.read_bytes())
    data[-1] ^= 0xFF
    index_file.write_bytes(bytes(data))
    with Store(copy, readonly=True) as store:
        assert "damaged" in db_info(store)["encoders"][name]["index_problem"]
        assert db_info(store, verify=False)["encoders"][name]["index_problem"] is None
