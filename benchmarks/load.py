"""Load benchmark of `simsearch serve`: latency and throughput of the HTTP API against the library's own rate.

    python -m simsearch.benchmarks load [--db DB] [--vectors 100000] [--max-requests 3000] [--max-seconds 10]
                                       [--work-dir DIR] [--out results/load.json]

Two dbs: the demo db (the 1,000 imagenet-samples photos, indexed here in --work-dir, or --db), and a db of
--vectors items: a copy of the demo db padded with clustered synthetic vectors stored as the same encoder's
(benchmarks/index_update.make_db), so its index is the one `index` would build at that size.

Two operations, as the web page calls them:
  similar   GET  /api/items/{id}/similar?k=10   ids drawn (seeded) from the db's items
  query     POST /api/query?k=10                a real photo uploaded (multipart), 32 demo photos in turn
at concurrency 1, 4 and 16: that many client threads in this process, each with its own keep-alive connection,
sending its next request when the last one is answered, against the real server (`simsearch serve` as a child
process, on 127.0.0.1 only, an ephemeral port). A run stops after --max-requests requests or --max-seconds,
whichever comes first, after a warm-up of two requests per thread. Reported: p50/p95 latency as the client sees
it, requests/s, errors (a non-200 answer, an answer with no hits, a failed connection: must be 0), and the
server process's CPU time per request.

Baseline, in the same run: the library in this process doing the same work with the same parameters, from the
same number of threads sharing one Searcher, bounded the same way: similar = Store.vectors_of_ids +
Searcher.search_vectors (what the route runs); query = Searcher.query on the photo's file (the route runs it on
the upload saved to a temporary file). Its rate is what the server would reach if HTTP cost nothing.
Targets: "similar" p50 <= 5 ms at concurrency 1; at concurrency 16, server requests/s >= 0.8x the in-process rate.

Both sides run with OMP_WAIT_POLICY=PASSIVE, as `simsearch serve` sets it (FAISS's idle OpenMP threads otherwise
spin after each single-query search and starve the others on a busy machine).
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simsearch.benchmarks.common import Clock, config_json, default_images, machine, option, photos

log = logging.getLogger(__name__)

CONCURRENCY = (1, 4, 16)
OPERATIONS = ("similar", "query")
K = 10
QUERY_PHOTOS = 32
URL_LINE = re.compile(r"on (http://127\.0\.0\.1:(\d+))")


@dataclass(frozen=True)
class LoadConfig:
    images: Path = option(help="photos of the demo db and the uploads (default: the shared imagenet-samples).",
                          factory=default_images)
    max_images: int = option(1000, "photos in the demo db.")
    db: Path | None = option(None, "the demo db as it is (default: the photos indexed in --work-dir).")
    vectors: int = option(100_000, "items of the large db (0: measure the demo db only).")
    max_requests: int = option(3000, "requests per (db, operation, concurrency), and as many for the baseline.")
    max_seconds: float = option(10.0, "a run stops after this long if --max-requests are not sent yet.")
    concurrency: tuple[int, ...] = option(CONCURRENCY, "client threads, each its own connection.")
    work_dir: Path = option(Path("/tmp/simsearch-load"), "where the dbs are built once and kept.")
    models_dir: Path | None = option(None, "encoder cache folder (default: simsearch's).")
    seed: int = option(0, "seed of the items drawn for `similar`.")


# -- the server as a child process -----------------------------------------------------------------------------------
@contextmanager
def served(db: Path, models_dir: Path | None = None, extra: tuple[str, ...] = (), timeout: float = 300.0
           ) -> Iterator[tuple[str, subprocess.Popen]]:
    """`simsearch serve --db DB --port 0` on 127.0.0.1 as a child process: yields (base URL, process) once it
    listens, and stops it afterwards. RuntimeError with its last output if it exits or does not start in time."""
    cmd = [sys.executable, "-m", "simsearch.cli", "serve", "--db", str(db), "--host", "127.0.0.1", "--port", "0",
           *extra]
    env = {**os.environ, **({"SIMSEARCH_MODELS_DIR": str(models_dir)} if models_dir else {})}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def drain() -> None:  # read stderr to the end: a full pipe would block the server
        for line in proc.stderr:
            lines.append(line.rstrip())
            del lines[:-50]
            if not found.is_set() and (m := URL_LINE.search(line)):
                url.append(m.group(1))
                found.set()
        found.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        if not found.wait(timeout) or not url:
            raise RuntimeError(f"`simsearch serve` did not start (exit code {proc.poll()}): " + " | ".join(lines[-10:]))
        yield url[0], proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(5)


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Client:
    """One keep-alive HTTP/1.1 connection (http.client: the standard library, no extra dependency)."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=120)

    def send(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
        try:
            self.conn.request(method, path, body=body, headers=headers or {})
            response = self.conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()  # reconnects on the next request
            raise

    def close(self) -> None:
        self.conn.close()


def multipart(field_name: str, filename: str, data: bytes) -> tuple[bytes, dict]:
    """(body, headers) of a multipart/form-data upload of one file."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field_name}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _answered(status: int, body: bytes) -> bool:
    return status == 200 and bool(json.loads(body)["hits"])


# -- driving load ----------------------------------------------------------------------------------------------------
Op = Callable[[int, int], bool]  # (thread, request number) -> answered


def drive(op: Op, concurrency: int, max_requests: int, max_seconds: float, clock: Clock = time.perf_counter) -> dict:
    """Run `op` from `concurrency` threads, each calling again as soon as its last call returned, until
    max_requests calls were started or max_seconds passed. An exception counts as an error."""
    numbers = itertools.count()
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    t0 = clock()
    deadline = t0 + max_seconds

    def worker(w: int) -> None:
        while (i := next(numbers)) < max_requests and clock() < deadline:
            t = clock()
            try:
                ok = op(w, i)
            except Exception as e:  # noqa: BLE001 - any failure of a request is an error to count
                log.debug("request %d failed: %r", i, e)
                ok = False
            latencies[w].append(clock() - t)
            errors[w] += not ok

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = clock() - t0
    lat = np.concatenate([np.asarray(x) for x in latencies]) if any(latencies) else np.zeros(1)
    return {"requests": int(sum(map(len, latencies))), "seconds": seconds,
            "rps": sum(map(len, latencies)) / seconds, "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p95_ms": float(np.percentile(lat, 95) * 1e3), "errors": int(sum(errors))}


def _warm_and_drive(op: Op, concurrency: int, cfg: LoadConfig) -> dict:
    drive(op, concurrency, 2 * concurrency, cfg.max_seconds)  # connections, worker threads, caches
    return drive(op, concurrency, cfg.max_requests, cfg.max_seconds)


# -- the dbs ---------------------------------------------------------------------------------------------------------
def demo_db(cfg: LoadConfig) -> Path:
    """The demo db: --db as given, else the photos indexed once into work_dir (kept: a re-run reuses it)."""
    if cfg.db is not None:
        return cfg.db
    from simsearch.encoders.registry import default_encoder, get_encoder
    from simsearch.encoders.runtime import OnnxEncoder
    from simsearch.indexer.pipeline import Indexer
    from simsearch.indexer.store import Store
    from simsearch.retrieval.backend import refresh

    root = cfg.work_dir / f"demo-{cfg.max_images}"
    folder = cfg.work_dir / f"photos-{cfg.max_images}"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for p in photos(cfg.images, cfg.max_images):
            (folder / p.name).symlink_to(p.resolve())
    encoder = OnnxEncoder(get_encoder(default_encoder(), cfg.models_dir), models_dir=cfg.models_dir)
    with Store(root, create=True) as store:
        report = Indexer(encoder, store).run(folder)
        refresh(store, encoder.spec.name)
    log.info("demo db %s: %d items (%d embedded now)", root, report.total_items, report.embedded)
    return root


def large_db(cfg: LoadConfig, demo: Path) -> Path:
    """A copy of the demo db padded to cfg.vectors items with synthetic vectors of its encoder, indexed."""
    from simsearch.benchmarks.index_update import make_db
    from simsearch.indexer.store import Store
    from simsearch.retrieval.backend import refresh
    from simsearch.retrieval.faiss_index import FaissState

    root = cfg.work_dir / f"large-{cfg.vectors}-{demo.name}"
    if not (root / "manifest.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(demo, root, ignore=shutil.ignore_patterns("thumbnails", "lock"))
    with Store(root, readonly=True) as store:
        name = store.manifest.default_encoder
        entry = store.manifest.encoders[name]
    make_db(root, cfg.vectors, entry.dim, encoder=name, key=entry.key, preprocess=entry.preprocess)
    with Store(root) as store:
        outcome = refresh(store, name)
        log.info("large db %s: %d items; index %s (%s)", root, store.item_count(),
                 FaissState.of(store.manifest.encoders[name], name).kind, outcome)
    return root


# -- one db ----------------------------------------------------------------------------------------------------------
def measure_db(cfg: LoadConfig, label: str, db: Path, query_photos: list[Path]) -> list[dict]:
    """Every (operation, concurrency) on one db: through the server, then in this process."""
    from simsearch.retrieval.faiss_index import FaissState
    from simsearch.retrieval.search import Searcher

    rng = np.random.default_rng(cfg.seed)
    uploads = [multipart("image", p.name, p.read_bytes()) for p in query_photos]
    rows = []
    with Searcher.open(db, models_dir=cfg.models_dir) as searcher:
        ids = np.fromiter((i for i, _, live in searcher.store.iter_ids() if live), dtype=np.int64)
        draws = rng.choice(ids, size=cfg.max_requests + 64)
        spec = searcher.encoder.spec
        encoder, count = searcher.name, searcher.index.ntotal
        index = FaissState.of(searcher.store.read_manifest().encoders[encoder], encoder).kind

        def similar_here(w: int, i: int) -> bool:
            vector = searcher.store.vectors_of_ids(spec.key, [int(draws[i % len(draws)])], spec.dim)
            return bool(searcher.search_vectors(vector, K)[0])

        def query_here(w: int, i: int) -> bool:
            return bool(searcher.query([query_photos[i % len(query_photos)]], K)[0].hits)

        here = (("similar", similar_here), ("query", query_here))
        baseline = {(op, c): _warm_and_drive(fn, c, cfg) for op, fn in here for c in cfg.concurrency}
    with served(db, cfg.models_dir) as (url, proc):
        clients = [Client(url) for _ in range(max(cfg.concurrency))]

        def similar_http(w: int, i: int) -> bool:
            return _answered(*clients[w].send("GET", f"/api/items/{int(draws[i % len(draws)])}/similar?k={K}"))

        def query_http(w: int, i: int) -> bool:
            body, headers = uploads[i % len(uploads)]
            return _answered(*clients[w].send("POST", f"/api/query?k={K}", body, headers))

        for op, fn in (("similar", similar_http), ("query", query_http)):
            for c in cfg.concurrency:
                load_before, cpu_before = os.getloadavg()[0], _cpu_seconds(proc.pid)
                r = _warm_and_drive(fn, c, cfg)
                cpu = _cpu_seconds(proc.pid)
                base = baseline[(op, c)]
                rows.append({
                    "db": label, "items": count, "encoder": encoder, "index": index, "operation": op,
                    "concurrency": c, **r,
                    "server_cpu_ms_per_request": (cpu - cpu_before) / r["requests"] * 1e3
                    if cpu is not None and cpu_before is not None and r["requests"] else None,
                    "in_process": base, "ratio": r["rps"] / base["rps"] if base["rps"] else None,
                    "load_average": [load_before, os.getloadavg()[0]],
                })
                log.info("%s %s c=%d: p50 %.2f ms, %.0f req/s (in-process %.0f), %d errors", label, op, c,
                         r["p50_ms"], r["rps"], base["rps"], r["errors"])
        for client in clients:
            client.close()
    return rows


def _judge(rows: list[dict]) -> list[dict]:
    targets = []
    for r in rows:
        if r["operation"] == "similar" and r["concurrency"] == 1:
            targets.append({"db": r["db"], "target": "similar p50 <= 5 ms at concurrency 1",
                            "value": r["p50_ms"], "met": r["p50_ms"] <= 5.0})
        if r["concurrency"] == 16:
            targets.append({"db": r["db"], "target": f"{r['operation']} req/s at concurrency 16 >= 0.8x in-process",
                            "value": r["ratio"], "met": r["ratio"] is not None and r["ratio"] >= 0.8})
    targets.append({"db": "all", "target": "no errors", "value": sum(r["errors"] for r in rows),
                    "met": all(r["errors"] == 0 for r in rows)})
    return targets


def run(cfg: LoadConfig) -> dict:
    """Both dbs, every operation and concurrency. Set OMP_WAIT_POLICY=PASSIVE before FAISS is first imported, as
    `simsearch serve` does, to give the in-process baseline the server's footing (the entry point does)."""
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    query_photos = photos(cfg.images, QUERY_PHOTOS)
    demo = demo_db(cfg)
    dbs = [("demo", demo)] + ([(f"{cfg.vectors // 1000}k", large_db(cfg, demo))] if cfg.vectors else [])
    rows = []
    for label, db in dbs:
        rows += measure_db(cfg, label, db, query_photos)
    return {"config": config_json(cfg),
            "machine": {**machine(), "load_average_at_end": list(os.getloadavg()),
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
            "rows": rows, "targets": _judge(rows), "wall_seconds": time.perf_counter() - t0}


def render(result: dict) -> tuple:
    from rich.table import Table

    loads = [x for r in result["rows"] for x in r["load_average"]]
    table = Table("db", "operation", "conc.", "requests", "p50 ms", "p95 ms", "req/s", "errors", "server CPU ms/req",
                  "in-process req/s", "ratio", title="simsearch serve under load (loopback)",
                  caption=f"load average during the runs {min(loads):.1f}-{max(loads):.1f} on "
                          f"{result['machine']['cores']} cores; in-process = the same library calls from as many "
                          "threads in one process, no HTTP", caption_justify="left")
    for r in result["rows"]:
        cpu = r["server_cpu_ms_per_request"]
        table.add_row(f"{r['db']} ({r['items']:,})", r["operation"], str(r["concurrency"]), str(r["requests"]),
                      f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}", f"{r['rps']:.0f}",
                      str(r["errors"]) if not r["errors"] else f"[red]{r['errors']}[/red]",
                      "-" if cpu is None else f"{cpu:.2f}", f"{r['in_process']['rps']:.0f}", f"{r['ratio']:.2f}x")
    targets = Table("target", "db", "value", "met", title="targets")
    for t in result["targets"]:
        targets.add_row(t["target"], t["db"], f"{t['value']:.2f}", "yes" if t["met"] else "[red]no[/red]")
    return table, targets
