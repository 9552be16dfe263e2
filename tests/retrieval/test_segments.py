"""Index segments: a base, its id list and delta files. Searches over base + deltas equal brute force over the live
vectors (exact kinds), tombstoned ids never come back, updates write only the change, compaction folds the deltas in,
and a cold open maps the base instead of reading it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from simsearch.indexer.store import Store
from simsearch.retrieval.backend import RefreshConfig
from simsearch.retrieval.faiss_index import FaissBackend, FaissState, SegmentConfig, load_index
from simsearch.retrieval.index_plan import IndexConfig
from simsearch.retrieval.segments import Delta, SegmentError, is_file_of, merge

DIM = 16
NEVER = SegmentConfig(delta_bytes=1 << 40, share=1e9, max_deltas=1000)  # deltas only: compaction never due


def unit(n, seed, dim=DIM):
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Collection:
    """A store of /img/<i>.jpg items and the truth about them: path -> vector of every live item."""

    def __init__(self, root, n, seed=0, dim=DIM):
        self.store = Store(root, create=True)
        self.store.register_encoder("x", "x@1", dim, "crop")
        self.dim, self.live, self.rng, self.next = dim, {}, np.random.default_rng(seed), 0
        self.add(n)

    def add(self, n):
        vecs = unit(n, int(self.rng.integers(1 << 30)), self.dim)
        items = [(f"/img/{self.next + i}.jpg", f"h{self.rng.integers(1 << 60)}", 1, 1, v) for i, v in enumerate(vecs)]
        self.store.put_items("x@1", items)
        self.live.update({p: v for p, _, _, _, v in items})
        self.next += n
        return [p for p, *_ in items]

    def change(self, n):
        paths = list(self.rng.choice(sorted(self.live), n, replace=False))
        vecs = unit(n, int(self.rng.integers(1 << 30)), self.dim)
        self.store.put_items("x@1", [(p, f"h{self.rng.integers(1 << 60)}", 2, 2, v) for p, v in zip(paths, vecs)])
        self.live.update(zip(paths, vecs))
        return paths

    def remove(self, n):
        paths = list(self.rng.choice(sorted(self.live), n, replace=False))
        self.store.remove_items(paths)
        for p in paths:
            del self.live[p]

    def brute(self, queries, k):
        """The exact top-k paths and scores over the live vectors: (Q, k) each."""
        paths = sorted(self.live)
        scores = queries @ np.stack([self.live[p] for p in paths]).T  # (Q, n)
        order = np.argsort(-scores, axis=1)[:, :k]
        return [[paths[j] for j in row] for row in order], np.take_along_axis(scores, order, axis=1)

    def state(self):
        return FaissState.of(self.store.manifest.encoders["x"], "x")


def search_paths(c, queries, k):
    index, _ = load_index(c.store, "x")
    scores, ids = index.search(queries, k)
    return [c.store.paths_of(row) for row in ids], scores, index


@pytest.mark.parametrize("segments", [NEVER, SegmentConfig(max_deltas=3), SegmentConfig(delta_bytes=40 * DIM * 4)],
                         ids=["deltas-only", "merged-deltas", "compacting"])
def test_base_plus_deltas_equals_brute_force_through_adds_changes_and_removals(tmp_path, segments):
    backend = FaissBackend(segments)
    c = Collection(tmp_path, 3000)
    assert backend.refresh(c.store, "x").action == "built" and c.state().kind == "flat"
    queries = unit(20, 99)
    compacted = 0
    for step in range(12):
        c.add(int(c.rng.integers(1, 30)))
        c.change(int(c.rng.integers(0, 10)))
        c.remove(int(c.rng.integers(0, 10)))
        outcome = backend.refresh(c.store, "x")
        assert outcome.action == "updated" and outcome.count == len(c.live)
        compacted += outcome.compacted
        got, scores, index = search_paths(c, queries, 10)
        want, want_scores = c.brute(queries, 10)
        assert got == want  # the exact top-10 of the live vectors, ranked the same
        np.testing.assert_allclose(scores, want_scores, atol=1e-5)
        assert index.ntotal == len(c.live) == c.state().count
        assert sorted(c.store.paths_of(index.live_ids())) == sorted(c.live)
        files = {p.name for p in c.store.index_dir().iterdir()}
        assert files == c.state().files()  # superseded segments are deleted once the manifest no longer names them
        assert len(c.state().deltas) <= segments.max_deltas
    if segments is NEVER:
        assert compacted == 0 and len(c.state().deltas) == 12
    else:
        assert compacted >= 1 if segments.delta_bytes < NEVER.delta_bytes else len(c.state().deltas) <= 3
    # every vector is found by itself, removed ones never come back
    paths = sorted(c.live)
    got, _, _ = search_paths(c, np.stack([c.live[p] for p in paths]), 1)
    assert [row[0] for row in got] == paths


def test_an_update_writes_only_the_change_and_never_reads_the_base(tmp_path):
    c = Collection(tmp_path, 2000)
    backend = FaissBackend(NEVER)
    backend.refresh(c.store, "x")
    base = c.store.index_dir() / c.state().file
    # Junk of the same size in place of the base: an update that read it would fail (or rebuild); it writes a delta.
    base.write_bytes(b"\0" * base.stat().st_size)
    c.add(3)
    c.remove(2)
    outcome = backend.refresh(c.store, "x")
    assert (outcome.action, outcome.added, outcome.removed) == ("updated", 3, 2)
    delta = c.state().deltas[-1]
    assert delta["bytes"] == 32 + 8 * (5 + 3) + 4 * 3 * DIM  # header, 5 replaced ids, 3 live ids, 3 vectors
    assert backend.refresh(c.store, "x", RefreshConfig(verify=True)).action == "rebuilt"  # `check --repair` sees it


def test_ann_kinds_return_base_results_merged_with_exact_deltas(tmp_path):
    """IVF (and ivfpq, re-scored) over a base, with deltas: a changed or new item is found by its vector at rank 1
    with its exact score, a removed one never, and recall@10 holds."""
    for kind in ("ivf", "ivfpq", "hnsw"):
        c = Collection(tmp_path / kind, 12_000, dim=32)
        backend = FaissBackend(NEVER)
        backend.refresh(c.store, "x", RefreshConfig(IndexConfig(kind=kind)))
        assert c.state().kind == kind
        before = set(c.live)
        touched = set(c.add(40)) | set(c.change(30))
        c.remove(60)
        assert backend.refresh(c.store, "x", RefreshConfig(IndexConfig(kind=kind))).action == "updated"
        removed, fresh = before - set(c.live), sorted(touched & set(c.live))
        got, scores, index = search_paths(c, np.stack([c.live[p] for p in fresh]), 1)
        assert len(index.delta.ids) == len(fresh) and len(c.state().deltas) == 1
        assert [row[0] for row in got] == fresh  # found by their new vectors, exactly
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
        queries = unit(100, 7, 32)
        got, _, _ = search_paths(c, queries, 10)
        assert not removed & {p for row in got for p in row}
        want, _ = c.brute(queries, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
        assert recall >= 0.9, (kind, recall)
        c.store.close()


def test_compaction_folds_the_deltas_into_one_base_and_keeps_the_answers(tmp_path):
    c = Collection(tmp_path, 1000)
    backend = FaissBackend(SegmentConfig(share=0.05))
    backend.refresh(c.store, "x")
    first = c.state().file
    c.remove(20)
    c.add(10)
    assert not backend.refresh(c.store, "x").compacted and len(c.state().deltas) == 1  # 30 replaced: under 5%
    queries = unit(10, 3)
    before, before_scores, _ = search_paths(c, queries, 5)
    c.change(25)  # 55 replaced in all: over 5% of the base
    outcome = backend.refresh(c.store, "x")
    assert outcome.compacted and str(outcome) == "updated: 25 added or changed, 0 removed; deltas folded into the base"
    state = c.state()
    assert state.file != first and not state.deltas and state.count == len(c.live) == 990
    assert {p.name for p in c.store.index_dir().iterdir()} == state.files()
    got, scores, _ = search_paths(c, queries, 5)
    assert got == c.brute(queries, 5)[0]
    ids = np.frombuffer((c.store.index_dir() / state.ids["file"]).read_bytes(), "<i8")
    assert sorted(c.store.paths_of(ids)) == sorted(c.live)  # the new base's id list
    assert backend.refresh(c.store, "x", RefreshConfig(compact=True)).action == "unchanged"  # nothing to fold


def test_deltas_merge_as_if_applied_in_order():
    v = unit(6, 1)
    first = Delta.of_change(np.array([5, 1, 2]), np.array([1, 2]), v[:2])  # 1, 2 added; 5 removed
    second = Delta.of_change(np.array([2, 3]), np.array([3]), v[2:3])  # 2 removed, 3 added
    third = Delta.of_change(np.array([2, 1]), np.array([2]), v[3:4])  # 2 back with a new vector, 1 removed
    merged = merge([first, second, third], DIM)
    assert merged.replaced.tolist() == [1, 2, 3, 5]
    assert dict(zip(merged.ids.tolist(), map(tuple, merged.vectors))) == {3: tuple(v[2]), 2: tuple(v[3])}
    again = Delta.from_bytes(merged.to_bytes(), DIM, "d")
    assert again.replaced.tolist() == merged.replaced.tolist() and np.array_equal(again.vectors, merged.vectors)
    with pytest.raises(SegmentError, match="not a 8-d delta"):
        Delta.from_bytes(merged.to_bytes(), 8, "d")
    with pytest.raises(SegmentError):
        Delta.from_bytes(merged.to_bytes()[:-4], DIM, "d")


def test_segment_files_are_recognised_with_their_temp_files():
    for name in ("x.3.abcdef012345.faiss", "x.3.abcdef012345.ids", "x.12.abcdef012345.delta", "x.faiss",
                 ".x.3.abcdef012345.delta.k2j_x9.tmp"):
        assert is_file_of(name, "x"), name
    for name in ("y.3.abcdef012345.faiss", "x.3.abcdef012345.json", "x.y.3.abcdef012345.faiss", "manifest.json"):
        assert not is_file_of(name, "x"), name


_COLD = """
import json, sys
from simsearch.indexer.store import Store
from simsearch.retrieval.faiss_index import load_index
import numpy as np

def resident(name):
    # bytes of the process's mappings of files called `name` that are in RAM (/proc/self/smaps)
    total, mine = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and ":" not in head[0]:
            mine = head[-1].endswith(name)
        elif mine and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total

with Store(sys.argv[1], readonly=True) as store:
    index, entry = load_index(store, "x")
    _, ids = index.search(np.ones((1, entry.dim), np.float32), 10)
    print(json.dumps({"resident": resident(sys.argv[2]), "ids": ids[0].tolist(), "ntotal": index.ntotal}))
"""


def test_a_cold_open_maps_the_base_and_reads_little_of_it(tmp_path):
    """A fresh process opens a 60k x 64 IVF index (~16 MB) and searches it: the pages of the base file in its memory
    are the quantiser and the lists it probed, a fraction of the file (it was read whole, then deserialised: 2x)."""
    c = Collection(tmp_path, 60_000, dim=64)
    # Uniform random vectors have no neighbourhoods: at recall 0.95 a search probes ~40% of the lists. A low target
    # keeps nprobe small, as clustered real embeddings do (1M x 256: 18 of 4096 lists).
    FaissBackend(NEVER).refresh(c.store, "x", RefreshConfig(IndexConfig(kind="ivf", recall=0.3)))
    assert c.state().params["nprobe"] <= c.state().params["nlist"] / 16
    c.add(5)
    FaissBackend(NEVER).refresh(c.store, "x")
    state = c.state()
    c.store.close()
    # Cold: the file's pages out of the page cache, as after a reboot. (Just written, they sit in 2 MiB folios that a
    # mapping maps whole: one page read would show the folio resident.)
    fd = os.open(c.store.index_dir() / state.file, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    out = subprocess.run([sys.executable, "-c", _COLD, str(tmp_path), state.file], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["ntotal"] == 60_005 and min(doc["ids"]) >= 0
    print(f"cold open + one search of a {state.bytes / 2**20:.1f} MiB base: {doc['resident'] / 2**20:.1f} MiB of it "
          "in memory")
    assert state.bytes > 15 * 2**20 and 0 < doc["resident"] < state.bytes / 4
