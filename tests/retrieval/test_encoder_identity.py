"""An encoder's policy and precision are part of its identity: changing either re-embeds, queries are embedded
the way the db's vectors were, and vectors of two identities are never mixed. Real photos, LMDB, FAISS, ORT."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simsearch.encoders.registry import get_encoder
from simsearch.encoders.runtime import OnnxEncoder
from simsearch.errors import SimsearchError
from simsearch.indexer.manifest import MANIFEST
from simsearch.indexer.pipeline import Indexer
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import refresh
from simsearch.retrieval.search import Searcher

from ..conftest import copy_samples

N = 8


def index_with(db, photos, spec, models_dir):
    with Store(db, create=True) as store:
        report = Indexer(OnnxEncoder(spec, models_dir=models_dir), store).run(photos)
        refresh(store, spec.name)
    return report


def self_hits(db, photos, encoder=None) -> tuple[str, list]:
    """The policy the searcher embeds queries with, and each photo's top hit (path, score)."""
    with Searcher.open(db, encoder) as s:
        results = s.query(sorted(photos.iterdir()), k=1)
        return s.encoder.spec.preprocess.value, [(r.hits[0].path, r.hits[0].score) for r in results]


def assert_finds_itself(hits, photos):
    for (path, score), photo in zip(hits, sorted(photos.iterdir())):
        assert path == str(photo) and score > 0.999  # the query was embedded exactly as the stored vector


def test_policy_change_re_embeds_and_queries_follow_the_dbs_policy(tmp_path, lite0, models_dir):
    photos = tmp_path / "photos"
    copy_samples(photos, N)
    db = tmp_path / "db"
    crop = lite0.with_preprocess("crop")
    assert index_with(db, photos, crop, models_dir).embedded == N
    assert self_hits(db, photos)[0] == "crop"
    assert_finds_itself(self_hits(db, photos)[1], photos)

    # The default policy differs (pad): indexing with it embeds every photo again, under a new key.
    report = index_with(db, photos, lite0, models_dir)
    assert lite0.preprocess.value == "pad" and report.embedded == N and report.unchanged == 0
    entry = json.loads((db / MANIFEST).read_text())["encoders"]["efficientnet-lite0"]
    assert entry["preprocess"] == "pad" and entry["key"] == lite0.key
    policy, hits = self_hits(db, photos)
    assert policy == "pad"
    assert_finds_itself(hits, photos)
    # A session of the other policy cannot search these vectors.
    with pytest.raises(SimsearchError, match="made by .*/pad, not by this encoder"):
        Searcher.open(db, OnnxEncoder(crop, models_dir=models_dir))
    assert index_with(db, photos, lite0, models_dir).embedded == 0  # the same identity again: nothing to do


def test_a_db_from_before_policies_is_read_as_crop(tmp_path, lite0, models_dir):
    photos = tmp_path / "photos"
    copy_samples(photos, N)
    db = tmp_path / "db"
    index_with(db, photos, lite0.with_preprocess("crop"), models_dir)
    manifest = json.loads((db / MANIFEST).read_text())
    e = manifest["encoders"]["efficientnet-lite0"]
    manifest["schema_version"] = 2  # what simsearch wrote before schema 3: no "preprocess"
    manifest["encoders"]["efficientnet-lite0"] = {
        "key": e["key"], "dim": e["dim"], "metric": e["metric"], "index_type": e["index"]["kind"],
        "count": e["index"]["count"], "index_generation": e["index_generation"], "index_file": e["index"]["file"],
        "index_sha256": e["index"]["sha256"], "index_bytes": e["index"]["bytes"]}
    (db / MANIFEST).write_text(json.dumps(manifest))
    policy, hits = self_hits(db, photos)
    assert policy == "crop"
    assert_finds_itself(hits, photos)


def test_int8_variant_is_its_own_encoder_in_the_db(tmp_path, lite0, models_dir):
    photos = tmp_path / "photos"
    copy_samples(photos, N)
    db = tmp_path / "db"
    int8 = get_encoder("efficientnet-lite0-int8")
    index_with(db, photos, lite0, models_dir)
    assert index_with(db, photos, int8, models_dir).embedded == N  # nothing reused across precisions
    with Store(db, readonly=True) as store:
        entries = store.manifest.encoders
        assert entries["efficientnet-lite0-int8"].key == int8.key != entries["efficientnet-lite0"].key
        paths = [str(p) for p in sorted(photos.iterdir())]
        v32 = store.vectors_of(lite0.key, paths, lite0.dim)
        v8 = store.vectors_of(int8.key, paths, int8.dim)
    assert np.all(np.einsum("nd,nd->n", v32, v8) > 0.95)  # the same space (parity bounds: tests/encoders/test_quantize.py)
    assert_finds_itself(self_hits(db, photos, "efficientnet-lite0-int8")[1], photos)
    with pytest.raises(SimsearchError, match="made by .*int8.*, not by this encoder .*/resize"):
        Searcher.open(db, OnnxEncoder(int8.with_preprocess("resize"), models_dir=models_dir))
