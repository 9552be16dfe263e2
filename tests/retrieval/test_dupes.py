"""Near-duplicate groups on a real db (photos, their made copies, the real encoder and FAISS) against brute force."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.encoders.registry import default_encoder
from simsearch.errors import DbCorruptError, SimsearchError
from simsearch.indexer.store import Store
from simsearch.retrieval.dupes import DEFAULT_THRESHOLD, find_duplicates
from simsearch.retrieval.backend import RefreshConfig, refresh
from simsearch.retrieval.index_plan import IndexConfig

from ..conftest import copy_samples

ENCODER = default_encoder()
runner = CliRunner()


@pytest.fixture(scope="module")
def db(tmp_path_factory, models_dir):
    """8 photos; 4 of them with a mirror, a half-size copy and a JPEG q20 copy; one byte-identical copy."""
    root = tmp_path_factory.mktemp("dupes")
    photos = copy_samples(root / "imgs", 8)
    for p in photos[:4]:
        img = Image.open(p).convert("RGB")
        img.transpose(Image.FLIP_LEFT_RIGHT).save(p.with_name(p.stem + "_mirror.jpg"), quality=95)
        img.resize((img.width // 2, img.height // 2)).save(p.with_name(p.stem + "_small.jpg"), quality=90)
        img.save(p.with_name(p.stem + "_q20.jpg"), quality=20)
    shutil.copy2(photos[5], photos[5].with_name(photos[5].stem + "_same.JPEG"))
    result = runner.invoke(app, ["index", str(root / "imgs"), "--db", str(root / "db")])
    assert result.exit_code == 0, result.output
    return root / "db"


def brute_force(db, threshold):
    """Connected components of the all-pairs cosine graph (pairs >= threshold), and the cosine matrix."""
    with Store(db, readonly=True) as store:
        entry = store.manifest.encoders[ENCODER]
        ids, vecs = map(np.concatenate, zip(*store.iter_vector_blocks(entry.key, entry.dim)))
    sims = vecs @ vecs.T  # (n, n): fine for a few dozen images
    adjacent = sims >= threshold - 1e-6
    seen, groups = set(), []
    for start in range(len(ids)):
        if start in seen:
            continue
        component, todo = {start}, [start]
        while todo:
            for j in np.flatnonzero(adjacent[todo.pop()]):
                if j not in component:
                    component.add(int(j))
                    todo.append(int(j))
        seen |= component
        if len(component) > 1:
            groups.append(frozenset(int(ids[i]) for i in component))
    return set(groups), {(int(a), int(b)): float(sims[i, j]) for i, a in enumerate(ids) for j, b in enumerate(ids)}


def members(group):
    return [group.keeper, *group.others]


def connected(ids, sims, cut):
    """Whether `ids` form one component using only pairs scoring >= cut."""
    ids = list(ids)
    reached, todo = {ids[0]}, [ids[0]]
    while todo:
        a = todo.pop()
        for b in ids:
            if b not in reached and sims[a, b] >= cut:
                reached.add(b)
                todo.append(b)
    return len(reached) == len(ids)


@pytest.mark.parametrize("threshold", [0.8, 0.9, 0.95, 1.0])
def test_groups_equal_brute_force_over_all_pairs(db, threshold):
    expected, sims = brute_force(db, threshold)
    with Store(db, readonly=True) as store:
        groups = find_duplicates(store, ENCODER, threshold)
    assert {frozenset(m.id for m in members(g)) for g in groups} == expected
    for g in groups:
        ids = [m.id for m in members(g)]
        assert threshold - 1e-6 <= g.min_score <= 1.0 + 1e-6
        # min_score is the bottleneck: the group holds together at it, and falls apart just above it.
        assert connected(ids, sims, g.min_score - 1e-6)
        assert len(ids) == 2 or not connected(ids, sims, g.min_score + 1e-5) or g.min_score >= 1 - 1e-5
        assert g.keeper.score == 1.0
        for o in g.others:
            assert o.score == pytest.approx(sims[g.keeper.id, o.id], abs=1e-5)
        assert [o.score for o in g.others] == sorted((o.score for o in g.others), reverse=True)
    if threshold == 1.0:  # only the byte-identical pair is left, and float rounding does not lose it
        assert len(groups) == 1 and len(groups[0].others) == 1
        assert {m.path.rsplit("/", 1)[1].removesuffix(".JPEG").removesuffix("_same") for m in members(groups[0])} == {
            groups[0].keeper.path.rsplit("/", 1)[1].removesuffix(".JPEG").removesuffix("_same")}


def test_made_copies_are_found_at_the_default_threshold(db):
    with Store(db, readonly=True) as store:
        groups = find_duplicates(store, ENCODER)
    names = [{m.path.rsplit("/", 1)[1] for m in members(g)} for g in groups]
    for g in names:
        stems = {n.split(".")[0].removesuffix("_mirror").removesuffix("_small").removesuffix("_q20")
                 .removesuffix("_same") for n in g}
        assert len(stems) == 1, g  # no group mixes two different photos
    assert sum(len(g) for g in names) >= 4 * 3 + 2  # most made copies are found


def test_keeper_has_most_pixels_then_largest_file(db):
    with Store(db, readonly=True) as store:
        groups = find_duplicates(store, ENCODER, 0.8)
    assert groups
    for g in groups:
        for m in members(g):
            with Image.open(m.path) as im:
                assert (m.width, m.height) == im.size
            with Store(db, readonly=True) as store:
                assert m.bytes == store.get_item(m.path).size
        best = max((m.width * m.height, m.bytes) for m in members(g))
        assert (g.keeper.width * g.keeper.height, g.keeper.bytes) == best
        assert not g.keeper.path.endswith("_small.jpg")


def test_blocks_smaller_than_the_collection_give_the_same_groups(db):
    with Store(db, readonly=True) as store:
        whole = find_duplicates(store, ENCODER, 0.85)
        for block in (1, 5, 7):
            assert find_duplicates(store, ENCODER, 0.85, block=block) == whole


def test_higher_thresholds_split_groups_never_join_them(db):
    with Store(db, readonly=True) as store:
        low = [set(m.id for m in members(g)) for g in find_duplicates(store, ENCODER, 0.8)]
        high = [set(m.id for m in members(g)) for g in find_duplicates(store, ENCODER, 0.95)]
        for bad in (0.0, -0.5, 1.5):
            with pytest.raises(SimsearchError, match="threshold"):
                find_duplicates(store, ENCODER, bad)
    assert all(any(h <= lo for lo in low) for h in high)
    assert sum(map(len, high)) <= sum(map(len, low))


def test_progress_is_reported(db):
    calls = []
    with Store(db, readonly=True) as store:
        find_duplicates(store, ENCODER, on_progress=lambda *a: calls.append(a))
    stages = [c[0] for c in calls]
    assert stages[0] == "finding near-duplicates" and calls[-1][1] == calls[-1][2]
    assert "reading image headers" in stages


def test_a_removed_file_gets_no_pixels_and_is_never_the_keeper(db, tmp_path):
    copy = tmp_path / "db"
    shutil.copytree(db, copy)
    with Store(copy, readonly=True) as store:
        g = find_duplicates(store, ENCODER, 0.8)[0]
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
    assert "keep" in result.stdout and "group 1" in result.stdout
    assert f"{len(groups)} groups of near-duplicates (cosine >= {DEFAULT_THRESHOLD:g}" in result.stdout
    assert f"{len(removable)} images could be removed" in result.stdout

    result = runner.invoke(app, ["dupes", "--db", str(db), "--json", "--threshold", "0.9", "--csv", str(tmp_path / "g.csv")])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    with Store(db, readonly=True) as store:
        at_09 = find_duplicates(store, ENCODER, 0.9)
    assert doc["threshold"] == 0.9 and doc["encoder"] == ENCODER
    assert [[g["keeper"]["id"], *[o["id"] for o in g["others"]]] for g in doc["groups"]] == \
        [[m.id for m in members(g)] for g in at_09]
    assert doc["totals"] == {"groups": len(at_09), "removable_images": sum(len(g.others) for g in at_09),
                             "reclaimable_bytes": sum(o.bytes for g in at_09 for o in g.others)}
    assert set(doc["groups"][0]["keeper"]) >= {"id", "path", "width", "height", "bytes", "score"}
    rows = list(csv.DictReader((tmp_path / "g.csv").open()))
    assert len(rows) == sum(len(members(g)) for g in at_09)
    assert [r["role"] for r in rows if r["group"] == "1"][0] == "keeper"

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
