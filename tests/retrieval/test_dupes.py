"""Duplicate groups on a real db (photos and edited copies made here, the real encoder and FAISS): each tier, the
two stages against verifying every pair, features cached for candidates only, a db from before hashes; and the
similar tier against brute force on synthetic vectors."""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from simsearch.benchmarks.edits import make_copy
from simsearch.cli import app
from simsearch.encoders.registry import default_encoder
from simsearch.errors import DbCorruptError, SimsearchError
from simsearch.indexer.images import load_rgb
from simsearch.indexer.phash import DECODE_SIDE, Hashes, hashes_of
from simsearch.indexer.store import LMDB_DIR, Store
from simsearch.retrieval import dupes
from simsearch.retrieval.backend import RefreshConfig, refresh
from simsearch.retrieval.dupes import DEFAULT_THRESHOLD, DupesConfig, find_candidates, find_duplicates
from simsearch.retrieval.index_plan import IndexConfig
from simsearch.retrieval.verify import VerifyConfig, features_of, verify

from ..conftest import copy_samples

ENCODER = default_encoder()
runner = CliRunner()
EDITED = ("thumbnail", "crop", "frame", "mirror_grey", "caption", "recompress")
SEP = "__"


@pytest.fixture(scope="module")
def db(tmp_path_factory, models_dir):
    """10 photos; 4 of them with six edited copies each; one with a byte-identical copy and a copy of the same pixels
    in another file (a PNG saved twice with different metadata)."""
    root = tmp_path_factory.mktemp("dupes")
    photos = copy_samples(root / "imgs", 10)
    for k, p in enumerate(photos[:4]):
        img = load_rgb(p)
        for i, edit in enumerate(EDITED):
            copy, quality = make_copy(img, edit, np.random.default_rng([k, i]))
            copy.save(p.with_name(f"{p.stem}{SEP}{edit}.jpg"), quality=quality)
    shutil.copy2(photos[5], photos[5].with_name(photos[5].stem + SEP + "same.JPEG"))
    png = load_rgb(photos[6])
    png.save(photos[6].with_name(photos[6].stem + SEP + "a.png"))
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("Comment", "same pixels, other bytes")
    png.save(photos[6].with_name(photos[6].stem + SEP + "b.png"), pnginfo=info)
    result = runner.invoke(app, ["index", str(root / "imgs"), "--db", str(root / "db")])
    assert result.exit_code == 0, result.output
    return root / "db"


def base(path: str) -> str:
    return Path(path).stem.partition(SEP)[0]


def members(group):
    return [group.keeper, *group.others]


def components(ids, pairs):
    """Connected components (frozensets of ids, 2 or more) of the pairs over the ids."""
    adj = {i: set() for i in ids}
    for a, b in pairs:
        adj[a].add(b)
        adj[b].add(a)
    seen, out = set(), set()
    for start in ids:
        if start in seen:
            continue
        comp, todo = {start}, [start]
        while todo:
            for j in adj[todo.pop()] - comp:
                comp.add(j)
                todo.append(j)
        seen |= comp
        if len(comp) > 1:
            out.add(frozenset(comp))
    return out


def all_pairs_reference(db, threshold=None):
    """Every pair of the db verified, plus same-content pairs (and cosine >= threshold pairs when given): components."""
    with Store(db, readonly=True) as store:
        entry = store.manifest.encoders[ENCODER]
        items = list(store.iter_items())
        ids = [r.id for _, r in items]
        vecs = store.vectors_of(entry.key, [p for p, _ in items], entry.dim)
        pixels = [Hashes.from_bytes(raw).pixels for raw in store.get_hashes(r.sha256 for _, r in items)]
    feats = [features_of(p, VerifyConfig()) for p, _ in items]
    pairs = []
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            same = items[i][1].sha256 == items[j][1].sha256 or pixels[i] == pixels[j]
            near = threshold is not None and vecs[i] @ vecs[j] >= threshold - 1e-6
            if same or near or VerifyConfig().accepts(verify(feats[i], feats[j], VerifyConfig())):
                pairs.append((ids[i], ids[j]))
    return components(ids, pairs), {(ids[i], ids[j]): float(vecs[i] @ vecs[j]) for i in range(len(ids))
                                   for j in range(len(ids))}


def test_each_tier_on_edited_photos(db):
    with Store(db, readonly=True) as store:
        groups = find_duplicates(store, ENCODER)
    by_base = {}
    for g in groups:
        names = {base(m.path) for m in members(g)}
        assert len(names) == 1, [m.path for m in members(g)]  # never two different photos
        by_base[names.pop()] = g
    assert len(groups) == 6
    for stem, g in by_base.items():
        paths = [Path(m.path).name for m in members(g)]
        if SEP + "same" in "".join(paths) or ".png" in "".join(paths):  # the byte-identical and same-pixels copies
            # (the PNGs hold the very pixels the JPEG decodes to: all three are one picture)
            assert g.tier == "exact" and len(g.others) == (2 if ".png" in "".join(paths) else 1)
            assert all(o.tier == "exact" and o.score == pytest.approx(1.0, abs=1e-5) for o in g.others)
            continue
        # every edited copy with its original, verified; the keeper has all of the picture: the original, or a copy of
        # as many pixels and more bytes (grey, mirrored, recompressed), never the larger screenshot or captioned copy
        assert g.tier == "edited" and len(g.others) == len(EDITED), paths
        assert {o.tier for o in g.others} == {"edited"}
        keeper_edit = Path(g.keeper.path).stem.partition(SEP)[2]
        assert keeper_edit in ("", "mirror_grey", "recompress"), paths
        assert g.keeper.tier == "keeper" and g.keeper.score == 1.0
    # the PNG pair is exact by its pixels (two files, two sha256s)
    png = next(g for g in groups if any(m.path.endswith(".png") for m in members(g)))
    with Store(db, readonly=True) as store:
        assert len({store.get_item(m.path).sha256 for m in members(png)}) == 3


def test_two_stages_group_as_verifying_every_pair(db):
    """The candidates (index + hashes) lose no pair that verifying all pairs finds, and add none."""
    expected, _ = all_pairs_reference(db)
    with Store(db, readonly=True) as store:
        groups = find_duplicates(store, ENCODER)
    assert {frozenset(m.id for m in members(g)) for g in groups} == expected


@pytest.mark.parametrize("threshold", [0.8, 0.95])
def test_the_similar_tier_adds_the_pairs_at_the_threshold(db, threshold):
    expected, sims = all_pairs_reference(db, threshold)
    with Store(db, readonly=True) as store:
        groups = find_duplicates(store, ENCODER, threshold)  # a threshold asks for the similar tier
        plain = find_duplicates(store, ENCODER)
    assert {frozenset(m.id for m in members(g)) for g in groups} == expected
    for g in plain:  # the similar tier only joins groups
        assert any({m.id for m in members(g)} <= {m.id for m in members(h)} for h in groups)
    for g in groups:
        for o in g.others:
            assert o.score == pytest.approx(sims[g.keeper.id, o.id], abs=1e-5)
            if o.tier == "similar":  # joined by a cosine, not a verification: some cosine on its way is >= threshold
                assert g.tier == "similar"
        assert g.min_score <= min(o.score for o in g.others) + 1e-5 or g.tier != "similar"


def test_features_are_made_for_candidates_only_and_cached(db, tmp_path, caplog):
    copy = tmp_path / "db"
    shutil.copytree(db, copy)
    with Store(copy) as store:
        cands = find_candidates(store, ENCODER)
        first = find_duplicates(store, ENCODER)
        in_pairs = set(np.concatenate(cands.pairs).tolist())
        for path, record in store.iter_items():
            cached = store.get_features(VerifyConfig().key, [record.sha256])[0] is not None
            assert cached == (record.id in in_pairs), path
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="simsearch.retrieval.dupes"):
            assert find_duplicates(store, ENCODER) == first
    assert "features of 0 images made" in caplog.text
    assert len(in_pairs) < sum(1 for _ in Store(copy, readonly=True).iter_items())  # lone photos are never described


def test_index_stores_the_hashes_of_each_file(db):
    with Store(db, readonly=True) as store:
        for path, record in list(store.iter_items())[:6]:
            stored = Hashes.from_bytes(store.get_hashes([record.sha256])[0])
            made = hashes_of(load_rgb(path, DECODE_SIDE))
            assert (stored.full, stored.content, stored.pixels) == (made.full, made.content, made.pixels)
            np.testing.assert_allclose(stored.box, made.box, atol=1e-6)  # stored as float32


def test_a_db_from_before_hashes_still_finds_its_copies(db, tmp_path, caplog):
    """No hashes and no features table (a db indexed by an older simsearch): hashed when needed, same groups."""
    old = tmp_path / "old"
    shutil.copytree(db, old)
    env = lmdb.open(str(old / LMDB_DIR), max_dbs=8)
    with env.begin(write=True) as txn:
        for table in (b"hashes", b"features"):
            txn.drop(env.open_db(table, txn=txn), delete=True)
    env.close()
    with Store(db, readonly=True) as store:
        want = find_duplicates(store, ENCODER)
    with Store(old, readonly=True) as store:
        assert store.get_hashes(["0" * 64]) == [None]
        with caplog.at_level(logging.WARNING):
            assert find_duplicates(store, ENCODER) == want
    assert "have no perceptual hash" in caplog.text and "not kept" in caplog.text
    with Store(old) as store:  # open for writing: the hashes it makes are kept
        assert find_duplicates(store, ENCODER) == want
        assert all(raw is not None for raw in store.get_hashes(r.sha256 for _, r in store.iter_items()))


def test_blocks_smaller_than_the_collection_give_the_same_groups(db):
    with Store(db, readonly=True) as store:
        whole = find_duplicates(store, ENCODER, 0.85)
        for block in (1, 7):
            assert find_duplicates(store, ENCODER, 0.85, block=block) == whole


def test_progress_is_reported(db):
    calls = []
    with Store(db, readonly=True) as store:
        find_duplicates(store, ENCODER, on_progress=lambda *a: calls.append(a))
    stages = [c[0] for c in calls]
    assert stages[0] == "finding candidates" and calls[-1][1] == calls[-1][2]
    assert "verifying candidate pairs" in stages and "reading image headers" in stages


def test_a_removed_file_gets_no_pixels_and_is_never_the_keeper(db, tmp_path):
    copy = tmp_path / "db"
    shutil.copytree(db, copy)
    with Store(copy, readonly=True) as store:
        g = next(g for g in find_duplicates(store, ENCODER, 0.8) if g.tier == "similar" or len(g.others) > 2)
        gone = g.keeper.path
    moved = tmp_path / "moved"
    shutil.move(gone, moved)
    try:
        with Store(copy, readonly=True) as store:
            again = next(x for x in find_duplicates(store, ENCODER, 0.8) if gone in [m.path for m in members(x)])
    finally:
        shutil.move(moved, gone)
    lost = next(m for m in members(again) if m.path == gone)
    assert (lost.width, lost.height) == (0, 0) and again.keeper.path != gone


def test_hash_pairs_equal_brute_force_within_three_bits():
    """Pigeonhole over 16-bit quarters finds every pair within 3 bits (mirrors included), and only pairs within
    the limit; random hashes with planted near pairs."""
    rng = np.random.default_rng(3)
    n = 3000
    full = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, n).astype(np.uint64)
    for i in range(0, 600, 2):  # planted: i+1 is i with 0-6 bits flipped, every third one mirrored
        flips = rng.choice(64, rng.integers(0, 7), replace=False)
        h = int(full[i]) ^ int(sum(1 << int(b) for b in flips))
        full[i + 1] = dupes.mirrored(h) if i % 3 == 0 else h
    ids = np.arange(100, 100 + n)
    share = np.ones(n, np.float32)
    a, b = dupes._hash_pairs(ids, (full, full.copy(), np.zeros(n, np.uint64), share), 3)
    got = set(zip(a.tolist(), b.tolist()))
    d = np.minimum(dupes.hamming(full[:, None], full[None, :]), dupes.hamming(full[:, None], dupes.mirrored(full)[None, :]))
    i, j = np.nonzero(np.triu(d <= 3, 1))
    assert got == {(int(ids[x]), int(ids[y])) for x, y in zip(i, j)} and len(got) >= 150


def test_never_deletes_or_moves_a_file(db):
    folder = Path(next(Store(db, readonly=True).iter_items())[0]).parent
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for args in ([], ["--similar"], ["--json"], ["--csv", "-"]):
        assert runner.invoke(app, ["dupes", "--db", str(db), *args]).exit_code == 0
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def synthetic_db(root, kind, n=3000, dim=64, planted=40, seed=0):
    """n clustered vectors (cosines within a cluster ~0.7) of which `planted` are noisy copies (cosine ~0.97)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim)).astype(np.float32)
    x = centres[rng.integers(0, 20, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    src = rng.choice(n - planted, planted, replace=False)
    x[n - planted:] = x[src] + 0.2 * np.linalg.norm(x[src], axis=1, keepdims=True) * rng.standard_normal(
        (planted, dim)).astype(np.float32) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with Store(root, create=True) as store:
        store.register_encoder("synthetic", f"synthetic@{dim}", dim, "pad")
        store.put_items(f"synthetic@{dim}", [(f"/v/{i:05d}", f"{i:064x}", 10 + i, 1, v) for i, v in enumerate(x)])
        if kind == "milvus":
            refresh(store, "synthetic", backend="milvus")  # a Milvus Lite file in the db
        else:
            refresh(store, "synthetic", RefreshConfig(IndexConfig(kind=kind)))
        ids = np.array([store.get_item(f"/v/{i:05d}").id for i in range(n)])
    return x, ids


@pytest.mark.parametrize("kind", ["ivf", "sq8", "hnsw", "milvus"])
def test_approximate_indexes_find_the_planted_pairs_with_exact_scores(tmp_path, kind):
    if kind == "milvus":
        pytest.importorskip("milvus_lite", reason="the milvus extra is not installed")
    x, ids = synthetic_db(tmp_path / "db", kind)
    sims = x @ x.T
    a, b = np.nonzero(np.triu(sims >= 0.9, 1))
    expected = {frozenset((int(ids[i]), int(ids[j]))) for i, j in zip(a, b)}
    assert len(expected) == 40  # the planted pairs, and nothing else this close
    with Store(tmp_path / "db", readonly=True) as store:
        groups = find_duplicates(store, "synthetic", 0.9, block=500)
    assert {frozenset(m.id for m in members(g)) for g in groups} == expected
    pos = {int(i): k for k, i in enumerate(ids)}
    for g in groups:  # exact cosines, also from sq8's 8-bit codes
        assert g.min_score == pytest.approx(sims[pos[g.keeper.id], pos[g.others[0].id]], abs=1e-5)
        assert (g.keeper.width, g.keeper.bytes) == (0, max(10 + pos[m.id] for m in members(g)))


def test_a_db_without_index_or_items_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    Store(empty, create=True).close()
    result = runner.invoke(app, ["dupes", "--db", str(empty)])
    assert result.exit_code == 1 and "holds no images yet" in result.output and "Traceback" not in result.output
    never = tmp_path / "never"
    with Store(never, create=True) as store:
        store.register_encoder("synthetic", "synthetic@4", 4, "pad")
        store.put_items("synthetic@4", [("/v/0", "0" * 64, 1, 1, np.ones(4, np.float32) / 2)])
    with Store(never, readonly=True) as store:
        with pytest.raises(DbCorruptError, match="never built"):
            find_duplicates(store, "synthetic")
        with pytest.raises(SimsearchError, match="no vectors of encoder 'nope'"):
            find_duplicates(store, "nope")
    result = runner.invoke(app, ["dupes", "--db", str(never)])
    assert result.exit_code == 1 and "never built" in result.output and "Traceback" not in result.output


def test_cli_table_json_and_csv(db, tmp_path):
    with Store(db, readonly=True) as store:
        groups = find_duplicates(store, ENCODER)
    removable = [o for g in groups for o in g.others]
    result = runner.invoke(app, ["dupes", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert "keep" in result.stdout and "group 1" in result.stdout and "edited" in result.stdout
    assert f"{len(groups)} groups of duplicates (2 exact, 4 edited; exact and edited copies" in result.stdout
    assert f"{len(removable)} images could be removed" in result.stdout and "nothing was deleted" in result.stdout

    result = runner.invoke(app, ["dupes", "--db", str(db), "--json", "--threshold", "0.9", "--csv", str(tmp_path / "g.csv")])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    with Store(db, readonly=True) as store:
        at_09 = find_duplicates(store, ENCODER, 0.9)
    assert doc["threshold"] == 0.9 and doc["similar"] is True and doc["encoder"] == ENCODER
    assert [[g["keeper"]["id"], *[o["id"] for o in g["others"]]] for g in doc["groups"]] == \
        [[m.id for m in members(g)] for g in at_09]
    assert [g["tier"] for g in doc["groups"]] == [g.tier for g in at_09]
    assert doc["totals"] == {"groups": len(at_09), "by_tier": {t: sum(g.tier == t for g in at_09) for t in dupes.TIERS},
                             "removable_images": sum(len(g.others) for g in at_09),
                             "reclaimable_bytes": sum(o.bytes for g in at_09 for o in g.others)}
    assert set(doc["groups"][0]["keeper"]) >= {"id", "path", "width", "height", "bytes", "score", "tier"}
    rows = list(csv.DictReader((tmp_path / "g.csv").open()))
    assert len(rows) == sum(len(members(g)) for g in at_09)
    assert [r["role"] for r in rows if r["group"] == "1"][0] == "keeper"
    assert {r["tier"] for r in rows} <= {"exact", "edited", "similar"}

    result = runner.invoke(app, ["dupes", "--db", str(db), "--json"])
    doc = json.loads(result.stdout)
    assert doc["similar"] is False and doc["threshold"] == DEFAULT_THRESHOLD and len(doc["groups"]) == len(groups)

    result = runner.invoke(app, ["dupes", "--db", str(db), "--csv", "-"])
    assert result.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == sum(len(members(g)) for g in groups) and rows[0]["path"] == groups[0].keeper.path

    result = runner.invoke(app, ["dupes", "--db", str(db), "--csv", str(tmp_path / "no" / "such" / "dir.csv")])
    assert result.exit_code == 1 and "cannot write" in result.output


def test_a_group_larger_than_the_first_k_is_found_whole(tmp_path, monkeypatch, caplog):
    """50 copies of one vector (every one has 49 neighbours above the threshold, past FIRST_K = 16) and 30 others."""
    from simsearch.retrieval import dupes

    rng = np.random.default_rng(1)
    x = rng.standard_normal((80, 32)).astype(np.float32)
    x[:50] = x[0] + 0.02 * rng.standard_normal((50, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with Store(tmp_path / "db", create=True) as store:
        store.register_encoder("synthetic", "synthetic@32", 32, "pad")
        store.put_items("synthetic@32", [(f"/v/{i:02d}", f"{i:064x}", 1, 1, v) for i, v in enumerate(x)])
        refresh(store, "synthetic", RefreshConfig(IndexConfig(kind="flat")))
    with Store(tmp_path / "db", readonly=True) as store:
        (group,) = find_duplicates(store, "synthetic", 0.99, block=7)
        assert sorted(m.path for m in members(group)) == [f"/v/{i:02d}" for i in range(50)]
        monkeypatch.setattr(dupes, "MAX_NEIGHBOURS", 16)  # lists cut at 16: the group still holds through the chains
        assert find_duplicates(store, "synthetic", 0.99) == [group]
    assert "50 images have over 16 neighbours above the threshold" in caplog.text
