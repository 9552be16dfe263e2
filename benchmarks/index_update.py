"""What one added, changed or removed image costs the index of a large db, and what a cold query costs.

    python -m simsearch.benchmarks index-update --count 1000000 --dim 256 [--work-dir DIR] [--out FILE]

Builds (once, kept in --work-dir) a db of `count` clustered synthetic vectors (benchmarks/ann_data.py)
through the real Store, builds its index with `retrieval.backend.refresh` (--index auto: the baseline, a
full build), then:
- adds one item, changes one, removes one: each timed end to end (the store write, then the refresh, which
  writes a delta segment), with the bytes it wrote to the index;
- compacts (`simsearch compact`: the deltas folded into a new base), timed;
- a cold query in a fresh process, once on this db and once on a demo-sized one (1,000 vectors): interpreter
  start, imports, the index opened (the base memory-mapped), one search and its paths, and the process's peak
  RSS. "Cold": the db's files are first dropped from the page cache (posix_fadvise DONTNEED on each file, the
  rest of the machine's cache untouched). Embedding the query image is the same on both dbs and left out;
- what a delta of n vectors adds to one query (p50 over single queries, one thread): the measure behind the
  compaction threshold (retrieval/faiss_index.py, SegmentConfig).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simsearch.benchmarks.ann_data import Mixture, MixtureSpec, Throttle
from simsearch.benchmarks.common import machine, option, timed
from simsearch.indexer.store import Store

log = logging.getLogger(__name__)

DEMO_COUNT = 1_000  # the demo's db: the 1,000 shared ImageNet samples
DELTA_SIZES = (1024, 4096, 8192, 16384)


@dataclass(frozen=True)
class IndexUpdateConfig:
    count: int = option(1_000_000, "items of the db.")
    dim: int = option(256, "width of their synthetic vectors.")
    work_dir: Path = option(Path("/tmp/simsearch-index-update"), "where the db is built once and kept.")


def make_db(root: Path, count: int, dim: int, encoder: str = "synthetic", key: str | None = None,
            preprocess: str = "pad") -> None:
    """A db of `count` items /synthetic/<i> with vectors of encoder key "synthetic@<dim>", if not there yet.

    encoder, key, preprocess: store the vectors as a real encoder's instead (a db of that encoder's photos padded
    with synthetic items up to `count`, which its queries embedded from real images search).
    """
    key = key or f"synthetic@{dim}"
    with Store(root, create=True) as store:
        store.register_encoder(encoder, key, dim, preprocess)
        have = store.item_count()
        if have >= count:
            return
        throttle, done = Throttle(), 0
        for block in Mixture(MixtureSpec(dim)).rows_of(0, count):
            rows = range(done, done + len(block))
            if done + len(block) > have:
                store.put_items(key, [(f"/synthetic/{i}", f"{i:064x}", 1, 1, v)
                                      for i, v in zip(rows, block) if i >= have])
            done += len(block)
            if throttle.due(done == count):
                log.info("db: %d/%d items", done, count)


def _delta_bytes(state) -> int:
    return state.deltas[-1]["bytes"] if state.deltas else 0


def measure(root: Path, count: int, dim: int) -> dict:
    """The build, the three one-image updates and the compaction on the db at `root` (made if missing)."""
    from simsearch.retrieval.backend import RefreshConfig, refresh
    from simsearch.retrieval.faiss_index import FaissState

    make_db(root, count, dim)
    key = f"synthetic@{dim}"
    rng = np.random.default_rng(1)
    with Store(root) as store:
        state = lambda: FaissState.of(store.manifest.encoders["synthetic"], "synthetic")  # noqa: E731
        store.set_index_state("synthetic", "faiss", -1, {})  # the baseline: a full build, every run
        outcome, build_s = timed(lambda: refresh(store, "synthetic"))
        log.info("index: %s (%s) in %.1f s", state().kind, outcome, build_s)
        rows = {"build": {"seconds": build_s, "outcome": str(outcome), "kind": state().kind, "params": state().params,
                          "recall_at_10": state().recall, "index_bytes": state().bytes}}
        new = rng.standard_normal(dim).astype(np.float32)
        new /= np.linalg.norm(new)
        victims = iter(rng.permutation(count)[:2])  # a different existing item for the change and the removal
        steps = {
            "add one": lambda: store.put_items(key, [(f"/new/{time.time_ns()}", f"{time.time_ns():064x}", 1, 1, new)]),
            "change one": lambda: store.put_items(key, [(f"/synthetic/{next(victims)}", f"{time.time_ns():064x}", 2, 2,
                                                         -new)]),
            "remove one": lambda: store.remove_items([f"/synthetic/{next(victims)}"]),
        }
        for name, change in steps.items():
            _, store_s = timed(change)
            outcome, refresh_s = timed(lambda: refresh(store, "synthetic"))
            rows[name] = {"seconds": store_s + refresh_s, "store_s": store_s, "refresh_s": refresh_s,
                          "outcome": str(outcome), "written_bytes": _delta_bytes(state()),
                          "deltas": len(state().deltas)}
            log.info("%s: %s in %.3f s (store %.3f, index %.3f; %d bytes written)", name, outcome, store_s + refresh_s,
                     store_s, refresh_s, _delta_bytes(state()))
        outcome, compact_s = timed(lambda: refresh(store, "synthetic", RefreshConfig(compact=True)))
        rows["compact"] = {"seconds": compact_s, "outcome": str(outcome), "written_bytes": state().bytes}
        log.info("compaction: %s in %.1f s", outcome, compact_s)
        steps["add one"]()  # the cold opens below find a base and a delta, as a db between compactions has
        refresh(store, "synthetic")
    return rows


_COLD_QUERY = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from simsearch.indexer.store import Store
from simsearch.retrieval.faiss_index import load_index
t1 = time.perf_counter()
with Store(sys.argv[1], readonly=True) as store:
    index, entry = load_index(store, "synthetic")
    t2 = time.perf_counter()
    query = store.vectors_of_ids(entry.key, [int(sys.argv[2])], entry.dim)  # a stored vector: what `similar` does
    scores, ids = index.search(query, 10)
    paths = store.paths_of(ids[0])
    t3 = time.perf_counter()
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"imports_s": t1 - t0, "open_s": t2 - t1, "search_s": t3 - t2, "ntotal": index.ntotal,
                  "found_itself": paths[0] == f"/synthetic/{sys.argv[2]}",
                  "peak_rss_bytes": int(status["VmHWM"].split()[0]) * 1024}))
"""


def evict(root: Path) -> None:
    """Drop the db's files from the page cache (only theirs): the next open reads them from the disk."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def cold_query(root: Path) -> dict:
    """A fresh process's cold open and one query of the db at `root`: its stages, wall seconds and peak RSS."""
    evict(root)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _COLD_QUERY, str(root), "7"], capture_output=True, text=True,
                         check=True, timeout=600)
    return {**json.loads(out.stdout), "process_s": time.perf_counter() - t}


def delta_cost(root: Path, dim: int, queries: int = 200) -> dict:
    """p50 ms of one query (one thread) on the db's index alone and with a delta of n random vectors, for each n."""
    import faiss

    from simsearch.retrieval.faiss_index import LoadedIndex, load_index
    from simsearch.retrieval.segments import Delta

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(2)
    q = np.ascontiguousarray(next(Mixture(MixtureSpec(dim)).rows_of(1, queries)), dtype=np.float32)  # not the db's rows
    with Store(root, readonly=True) as store:
        published, _ = load_index(store, "synthetic")
        base, params, kind = published.cpu_index, published.params, published.state.kind

        def p50(index) -> float:
            index.search(q, 10)  # warm: the lists the queries probe are read from the disk once, not timed
            times = []
            for row in q:
                t = time.perf_counter()
                index.search(row[None], 10)
                times.append(time.perf_counter() - t)
            return float(np.median(times) * 1e3)

        out = {"base_ms": p50(LoadedIndex(base, params=params, kind=kind, count=base.ntotal))}
        for n in DELTA_SIZES:
            vecs = rng.standard_normal((n, dim)).astype(np.float32)
            ids = np.arange(n, dtype=np.int64) + (1 << 40)  # new ids; as many base ids replaced (tombstones)
            delta = Delta(np.concatenate([np.arange(n, dtype=np.int64), ids]), ids, vecs / np.linalg.norm(vecs, axis=1,
                                                                                                             keepdims=True))
            out[n] = p50(LoadedIndex(base, params=params, kind=kind, delta=delta, count=base.ntotal))
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return out


def run(cfg: IndexUpdateConfig) -> dict:
    root = cfg.work_dir / f"db-{cfg.count}x{cfg.dim}"
    rows = measure(root, cfg.count, cfg.dim)
    demo = cfg.work_dir / f"db-{DEMO_COUNT}x{cfg.dim}"
    make_db(demo, DEMO_COUNT, cfg.dim)
    with Store(demo) as store:
        from simsearch.retrieval.backend import refresh

        refresh(store, "synthetic")
    cold = {"db": cold_query(root), "demo": cold_query(demo)}
    log.info("cold query: %.2f s (%.2f s on the demo db); peak RSS %.0f MiB", cold["db"]["process_s"],
             cold["demo"]["process_s"], cold["db"]["peak_rss_bytes"] / 2**20)
    return {"machine": machine(), "count": cfg.count, "dim": cfg.dim, "rows": rows, "cold": cold,
            "delta_ms": delta_cost(root, cfg.dim), "load_average": os.getloadavg()}


def render(result: dict) -> tuple:
    from rich.table import Table

    rows = result["rows"]
    build = rows["build"]["seconds"]
    table = Table("step", "total s", "store s", "index s", "written", "vs rebuild", "outcome",
                  title=f"index updates, {result['count']:,} x {result['dim']} ({rows['build']['kind']}, "
                        f"{rows['build']['index_bytes'] / 2**20:.0f} MiB base)")
    for name, r in rows.items():
        written = r.get("written_bytes")
        size = "" if written is None else f"{written:,} B" if written < 2**10 else f"{written / 2**10:,.1f} KiB"
        table.add_row(name, f"{r['seconds']:.3f}", f"{r.get('store_s', 0):.3f}", f"{r.get('refresh_s', 0):.3f}", size,
                      f"{r['seconds'] / build:.4f}x", str(r["outcome"]))
    cold = Table("db", "process s", "imports s", "open s", "search s", "peak RSS MiB",
                 title="a cold query in a fresh process (page cache dropped for the db's files)")
    for name, c in (("this db", result["cold"]["db"]), (f"demo ({DEMO_COUNT:,})", result["cold"]["demo"])):
        cold.add_row(name, f"{c['process_s']:.2f}", f"{c['imports_s']:.2f}", f"{c['open_s']:.3f}",
                     f"{c['search_s']:.3f}", f"{c['peak_rss_bytes'] / 2**20:.0f}")
    delta = Table("delta vectors", "p50 ms", title="one query (one thread) with a delta of n vectors beside the base")
    for n, ms in result["delta_ms"].items():
        delta.add_row("none" if n == "base_ms" else f"{int(n):,}", f"{ms:.3f}")
    return table, cold, delta
