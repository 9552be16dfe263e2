"""What one added, changed or removed image costs the index of a large db.

    python -m simsearch.benchmarks index-update --count 1000000 --dim 256 [--work-dir DIR] [--out FILE]

Builds (once, kept in --work-dir) a db of `count` clustered synthetic vectors (benchmarks/ann_data.py)
through the real Store, builds its index with `retrieval.backend.refresh` (--index auto), then times
the refresh after adding one item, changing one and removing one. Each update is timed end to
end and broken down into the stages a user waits for: reading + verifying the index file
(load_index), the FAISS work itself (update_index: add_with_ids / remove_ids), and publishing the
new file (serialize, sha256, atomic write). The baseline in the same run is a
full rebuild of the same index.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simsearch.benchmarks.ann_data import Mixture, MixtureSpec, Throttle
from simsearch.benchmarks.common import machine, option, timed
from simsearch.indexer.store import Store

log = logging.getLogger(__name__)


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


def measure(root: Path, count: int, dim: int) -> dict:
    from simsearch.retrieval.backend import refresh
    from simsearch.retrieval.faiss_index import FaissState, load_index, update_index, write_index

    make_db(root, count, dim)
    key = f"synthetic@{dim}"
    rng = np.random.default_rng(1)
    with Store(root) as store:
        store.set_index_state("synthetic", "faiss", -1, {})  # the baseline: a full build, every run
        outcome, build_s = timed(lambda: refresh(store, "synthetic"))
        state = FaissState.of(store.manifest.encoders["synthetic"], "synthetic")
        log.info("index: %s (%s) in %.1f s", state.kind, outcome, build_s)
        rows = {"build": {"seconds": build_s, "outcome": str(outcome), "kind": state.kind, "params": state.params,
                          "recall_at_10": state.recall, "index_bytes": state.bytes}}
        new = rng.standard_normal(dim).astype(np.float32)
        new /= np.linalg.norm(new)
        victims = iter(rng.permutation(count)[:4])  # a different existing item for each change and removal
        steps = {
            "add one": lambda: store.put_items(key, [(f"/new/{time.time_ns()}", f"{time.time_ns():064x}", 1, 1, new)]),
            "change one": lambda: store.put_items(key, [(f"/synthetic/{next(victims)}", f"{time.time_ns():064x}", 2, 2,
                                                         -new)]),
            "remove one": lambda: store.remove_items([f"/synthetic/{next(victims)}"]),
        }
        for name, change in steps.items():
            change()
            # The stages on their own (the same work the FAISS backend's in-place update does), then the real call.
            entry = store.manifest.encoders["synthetic"]
            state = FaissState.of(entry, "synthetic")
            loaded, load_s = timed(lambda: load_index(store, "synthetic")[0].cpu_index)
            changed = store.changed_ids(entry.index_generation)
            ids, vectors = store.vectors_by_id(key, changed, dim)
            _, op_s = timed(lambda: update_index(loaded, changed, ids, vectors))
            _, publish_s = timed(lambda: write_index(store, "synthetic", loaded, store.generation, state.kind,
                                                     state.params, state.recall, state.recall_target,
                                                     state.trained_count))
            change()  # the same kind of change again, for the end-to-end call
            outcome, total_s = timed(lambda: refresh(store, "synthetic"))
            rows[name] = {"seconds": total_s, "outcome": str(outcome), "load_s": load_s, "index_op_s": op_s,
                          "publish_s": publish_s}
            log.info("%s: %s in %.2f s (load %.2f, index op %.4f, publish %.2f)", name, outcome, total_s, load_s,
                     op_s, publish_s)
    return rows


def run(cfg: IndexUpdateConfig) -> dict:
    rows = measure(cfg.work_dir / f"db-{cfg.count}x{cfg.dim}", cfg.count, cfg.dim)
    return {"machine": machine(), "count": cfg.count, "dim": cfg.dim, "rows": rows}


def render(result: dict) -> tuple:
    from rich.table import Table

    rows = result["rows"]
    build = rows["build"]["seconds"]
    table = Table("step", "total s", "load s", "index op ms", "publish s", "vs rebuild", "outcome",
                  title=f"index updates, {result['count']:,} x {result['dim']} ({rows['build']['kind']}, "
                        f"{rows['build']['index_bytes'] / 2**20:.0f} MiB file)")
    for name, r in rows.items():
        table.add_row(name, f"{r['seconds']:.2f}", f"{r.get('load_s', 0):.2f}", f"{r.get('index_op_s', 0) * 1e3:.1f}",
                      f"{r.get('publish_s', 0):.2f}", f"{r['seconds'] / build:.3f}x", str(r["outcome"]))
    return (table,)
