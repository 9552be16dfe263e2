"""What one added, changed or removed image costs the index of a large db.

    python -m simsearch.benchmarks.index_update --count 1000000 --dim 256 [--work-dir DIR] [--out FILE]

Builds (once, kept in --work-dir) a db of `count` clustered synthetic vectors (benchmarks/ann_data.py)
through the real Store, builds its index with `refresh_index` (--index auto), then times
`refresh_index` after adding one item, changing one and removing one. Each update is timed end to
end and broken down into the stages a user waits for: reading + verifying the index file
(load_index), the FAISS work itself (update_index: add_with_ids / remove_ids), and publishing the
new file (serialize, sha256, atomic write, manifest, tombstones). The baseline in the same run is a
full rebuild of the same index. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from simsearch.benchmarks.ann import machine
from simsearch.benchmarks.ann_data import Mixture, MixtureSpec, Throttle
from simsearch.indexer.store import Store
from simsearch.retrieval.faiss_index import IndexConfig, load_index, publish_index, refresh_index, update_index

log = logging.getLogger(__name__)


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


def _timed(fn) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def measure(root: Path, count: int, dim: int) -> dict:
    make_db(root, count, dim)
    key = f"synthetic@{dim}"
    rng = np.random.default_rng(1)
    with Store(root) as store:
        store.manifest.encoders["synthetic"].index_file = None  # the baseline: a full build, every run
        outcome, build_s = _timed(lambda: refresh_index(store, "synthetic", IndexConfig()))
        entry = store.manifest.encoders["synthetic"]
        log.info("index: %s (%s) in %.1f s", entry.index_type, outcome, build_s)
        rows = {"build": {"seconds": build_s, "outcome": outcome, "kind": entry.index_type,
                          "params": entry.index_params, "recall_at_10": entry.recall, "index_bytes": entry.index_bytes}}
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
            # The stages on their own (same work as refresh_index does in place), then the real call.
            entry = store.manifest.encoders["synthetic"]
            loaded, load_s = _timed(lambda: load_index(store, "synthetic")[0].cpu_index)
            changed = store.changed_ids(entry.index_generation)
            ids, vectors = store.vectors_by_id(key, changed, dim)
            _, op_s = _timed(lambda: update_index(loaded, changed, ids, vectors))
            _, publish_s = _timed(lambda: publish_index(store, "synthetic", loaded, store.generation, entry.index_type,
                                                        entry.index_params))
            change()  # the same kind of change again, for the end-to-end call
            outcome, total_s = _timed(lambda: refresh_index(store, "synthetic"))
            rows[name] = {"seconds": total_s, "outcome": outcome, "load_s": load_s, "index_op_s": op_s,
                          "publish_s": publish_s}
            log.info("%s: %s in %.2f s (load %.2f, index op %.4f, publish %.2f)", name, outcome, total_s, load_s,
                     op_s, publish_s)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/simsearch-index-update"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/index_update.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    rows = measure(args.work_dir / f"db-{args.count}x{args.dim}", args.count, args.dim)
    build = rows["build"]["seconds"]
    table = Table("step", "total s", "load s", "index op ms", "publish s", "vs rebuild", "outcome",
                  title=f"index updates, {args.count:,} x {args.dim} ({rows['build']['kind']}, "
                        f"{rows['build']['index_bytes'] / 2**20:.0f} MiB file)")
    for name, r in rows.items():
        table.add_row(name, f"{r['seconds']:.2f}", f"{r.get('load_s', 0):.2f}", f"{r.get('index_op_s', 0) * 1e3:.1f}",
                      f"{r.get('publish_s', 0):.2f}", f"{r['seconds'] / build:.3f}x", str(r["outcome"]))
    Console(width=140).print(table)
    doc = {"machine": machine(), "count": args.count, "dim": args.dim, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=str))
    return doc


if __name__ == "__main__":
    main()
