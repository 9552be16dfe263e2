"""Load benchmark of `simsearch serve`: latency and throughput of the HTTP API against the library's own rate.

    python -m simsearch.benchmarks load [--db DB] [--vectors 100000] [--workers 1,2] [--max-requests 3000]
                                       [--max-seconds 10] [--rounds 3] [--work-dir DIR] [--out results/load.json]

Two dbs: the demo db (the 1,000 imagenet-samples photos, indexed here in --work-dir, or --db), and a db of
--vectors items: a copy of the demo db padded with clustered synthetic vectors stored as the same encoder's
(benchmarks/index_update.make_db), so its index is the one `index` would build at that size.

Two operations, as the web page calls them:
  similar   GET  /api/items/{id}/similar?k=10   ids drawn (seeded) from the db's items
  query     POST /api/query?k=10                a real photo uploaded (multipart), 32 demo photos in turn
at concurrency 1, 4 and 16: that many client threads in this process, each with its own keep-alive connection,
sending its next request when the last one is answered, against the real server (`simsearch serve --workers N` as a
child process for each N of --workers, on 127.0.0.1 only, an ephemeral port). Reported: p50/p95 latency as the client
sees it, requests/s, errors (a non-200 answer, an answer with no hits, a failed connection: must be 0), and the
server's CPU time per request (its processes together: the parent and its workers).

Baseline: the library in this process doing the same work with the same parameters, from the same number of threads
sharing one Searcher: similar = Searcher.similar (what the route runs); query = Searcher.search on a query of the
photo's file (the route runs it on the upload saved to a temporary file). Its rate is what the server would reach if
HTTP cost nothing.

The machine's other load moves between runs, so the baseline and the servers take turns: each (operation,
concurrency) is --rounds slices of each side in turn (the baseline, then each server), each slice at most
--max-requests / --rounds requests or --max-seconds / --rounds seconds, after a warm-up of two requests per thread;
the sides' figures are their slices together.
Targets (issue 24): at concurrency 16, "query" >= 0.85x the in-process rate and "similar" <= 0.3 ms of server CPU a
request; "similar" p50 <= 5 ms at concurrency 1; no errors.

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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simsearch.benchmarks.common import Clock, config_json, default_images, machine, option, photos

log = logging.getLogger(__name__)

CONCURRENCY = (1, 4, 16)
WORKERS = (1, 2)
STALE_SECONDS = 3.0  # uvicorn's keep-alive timeout is 5 s
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
    max_requests: int = option(3000, "requests per (db, operation, concurrency) and side (the baseline, each "
                                      "server).")
    max_seconds: float = option(10.0, "a side's run stops after this long if --max-requests are not sent yet.")
    rounds: int = option(3, "slices each side's run is cut in, the sides taking turns.")
    concurrency: tuple[int, ...] = option(CONCURRENCY, "client threads, each its own connection.")
    workers: tuple[int, ...] = option(WORKERS, "a server for each: `simsearch serve --workers N`.")
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
    """User + system CPU seconds so far of a process and its children (`serve --workers`: the parent and its
    workers), from Linux's /proc; None elsewhere."""
    ticks, found = 0, False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # fields[1]: the parent's pid
        except OSError:  # ended meanwhile
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            ticks += int(fields[11]) + int(fields[12])
            found |= stat.parent.name == str(pid)
    return ticks / os.sysconf("SC_CLK_TCK") if found else None


class Client:
    """One keep-alive HTTP/1.1 connection (http.client: the standard library, no extra dependency).

    A connection left idle for STALE_SECONDS is opened afresh before the next request, as browsers do: uvicorn
    closes a keep-alive connection idle for 5 s, and while the other sides take their turn (take_turns) a server's
    connections wait longer than that. A request is never sent twice."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=120)
        self.last = time.monotonic()

    def send(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
        if time.monotonic() - self.last > STALE_SECONDS:
            self.conn.close()
        try:
            self.conn.request(method, path, body=body, headers=headers or {})
            response = self.conn.getresponse()
            answer = response.status, response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()  # reconnects on the next request
            raise
        self.last = time.monotonic()
        return answer

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


@dataclass
class Tally:
    """A side's requests over its slices: latencies (s), errors, seconds spent, server CPU seconds (None: unknown),
    and the machine's load average at the start and end of each slice."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    cpu: float | None = 0.0
    loads: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        lat = np.asarray(self.latencies) if self.latencies else np.zeros(1)
        n = len(self.latencies)
        return {"requests": n, "seconds": self.seconds, "rps": n / self.seconds if self.seconds else 0.0,
                "p50_ms": float(np.percentile(lat, 50) * 1e3), "p95_ms": float(np.percentile(lat, 95) * 1e3),
                "errors": self.errors}


def _drive(op: Op, concurrency: int, max_requests: int, max_seconds: float, tally: Tally,
           clock: Clock = time.perf_counter) -> None:
    """Run `op` from `concurrency` threads, each calling again as soon as its last call returned, until
    max_requests calls were started or max_seconds passed; added to `tally`. An exception counts as an error."""
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
    tally.seconds += clock() - t0
    tally.latencies += itertools.chain.from_iterable(latencies)
    tally.errors += sum(errors)


def drive(op: Op, concurrency: int, max_requests: int, max_seconds: float, clock: Clock = time.perf_counter) -> dict:
    """One run of `op` (see `_drive`): requests, seconds, rps, p50_ms, p95_ms, errors."""
    tally = Tally()
    _drive(op, concurrency, max_requests, max_seconds, tally, clock)
    return tally.summary()


@dataclass(frozen=True)
class Side:
    """What is measured: the library in this process (pid None) or a server (the pid whose CPU is counted)."""

    name: str
    op: Op
    pid: int | None = None


def take_turns(sides: list[Side], concurrency: int, max_requests: int, max_seconds: float, rounds: int
               ) -> list[Tally]:
    """Each side warmed up (two requests a thread), then `rounds` slices of each side in turn, each at most
    max_requests / rounds requests or max_seconds / rounds seconds: the machine's other load, which moves between
    runs, falls on every side alike. A server's CPU is read around its own slices only."""
    for side in sides:
        drive(side.op, concurrency, 2 * concurrency, max_seconds)  # connections, worker threads, caches
    tallies = [Tally() for _ in sides]
    per_requests, per_seconds = -(-max_requests // rounds), max_seconds / rounds
    for _ in range(rounds):
        for side, tally in zip(sides, tallies):
            tally.loads.append(os.getloadavg()[0])
            before = _cpu_seconds(side.pid) if side.pid is not None else None
            _drive(side.op, concurrency, min(per_requests, max_requests - len(tally.latencies)), per_seconds, tally)
            after = _cpu_seconds(side.pid) if side.pid is not None else None
            tally.cpu = None if before is None or after is None or tally.cpu is None else tally.cpu + after - before
            tally.loads.append(os.getloadavg()[0])
    return tallies


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
    with Store(demo, readonly=True) as store:
        name = store.manifest.default_encoder
        entry = store.manifest.encoders[name]
    if (root / "manifest.json").is_file():  # kept from an earlier run: reused unless its encoder changed since
        with Store(root, readonly=True) as store:
            kept = store.manifest.encoders.get(name)
        if kept is None or kept.key != entry.key:
            shutil.rmtree(root)
    if not (root / "manifest.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(demo, root, ignore=shutil.ignore_patterns("thumbnails", "lock"))
    make_db(root, cfg.vectors, entry.dim, encoder=name, key=entry.key, preprocess=entry.preprocess)
    with Store(root) as store:
        outcome = refresh(store, name)
        log.info("large db %s: %d items; index %s (%s)", root, store.item_count(),
                 FaissState.of(store.manifest.encoders[name], name).kind, outcome)
    return root


# -- one db ----------------------------------------------------------------------------------------------------------
def measure_db(cfg: LoadConfig, label: str, db: Path, query_photos: list[Path]) -> list[dict]:
    """Every (operation, concurrency) on one db: in this process and through each server, taking turns."""
    from simsearch.retrieval.faiss_index import FaissState
    from simsearch.retrieval.query import Query, Term
    from simsearch.retrieval.search import Searcher

    rng = np.random.default_rng(cfg.seed)
    uploads = [multipart("image", p.name, p.read_bytes()) for p in query_photos]
    queries = [Query((Term("image", str(p)),)) for p in query_photos]
    rows = []
    with Searcher.open(db, models_dir=cfg.models_dir) as searcher, ExitStack() as servers:
        ids = np.fromiter((i for i, _, live in searcher.store.iter_ids() if live), dtype=np.int64)
        draws = rng.choice(ids, size=cfg.max_requests + 64)
        encoder, count = searcher.name, searcher.index.ntotal
        index = FaissState.of(searcher.store.read_manifest().encoders[encoder], encoder).kind

        def similar_here(w: int, i: int) -> bool:
            return bool(searcher.similar(int(draws[i % len(draws)]), K))

        def query_here(w: int, i: int) -> bool:
            return bool(searcher.search(queries[i % len(queries)], K).hits)

        here = {"similar": similar_here, "query": query_here}
        http: list[tuple[int, int, dict[str, Op]]] = []  # (workers, pid, operation -> op)
        for workers in cfg.workers:
            url, proc = servers.enter_context(served(db, cfg.models_dir, ("--workers", str(workers))))
            clients = [Client(url) for _ in range(max(cfg.concurrency))]
            servers.callback(lambda clients=clients: [c.close() for c in clients])

            def similar_http(w: int, i: int, clients=clients) -> bool:
                return _answered(*clients[w].send("GET", f"/api/items/{int(draws[i % len(draws)])}/similar?k={K}"))

            def query_http(w: int, i: int, clients=clients) -> bool:
                body, headers = uploads[i % len(uploads)]
                return _answered(*clients[w].send("POST", f"/api/query?k={K}", body, headers))

            http.append((workers, proc.pid, {"similar": similar_http, "query": query_http}))
        for op in OPERATIONS:
            for c in cfg.concurrency:
                sides = [Side("in-process", here[op])] + [Side(f"{w} workers", ops[op], pid) for w, pid, ops in http]
                base, *tallies = take_turns(sides, c, cfg.max_requests, cfg.max_seconds, cfg.rounds)
                baseline = base.summary()
                for (workers, _, _), tally in zip(http, tallies):
                    r = tally.summary()
                    rows.append({
                        "db": label, "items": count, "encoder": encoder, "index": index, "operation": op,
                        "concurrency": c, "workers": workers, **r,
                        "server_cpu_ms_per_request": tally.cpu / r["requests"] * 1e3
                        if tally.cpu is not None and r["requests"] else None,
                        "in_process": baseline, "ratio": r["rps"] / baseline["rps"] if baseline["rps"] else None,
                        "load_average": [min(tally.loads), max(tally.loads)],
                    })
                    log.info("%s %s c=%d workers=%d: p50 %.2f ms, %.0f req/s (in-process %.0f), %d errors", label,
                             op, c, workers, r["p50_ms"], r["rps"], baseline["rps"], r["errors"])
    return rows


QUERY_RATIO = 0.85
SIMILAR_CPU_MS = 0.3
SIMILAR_P50_MS = 5.0


def _judge(rows: list[dict]) -> list[dict]:
    targets = []
    for r in rows:
        at = f"{r['db']}, {r['workers']} workers"
        if r["operation"] == "similar" and r["concurrency"] == 1:
            targets.append({"db": at, "target": f"similar p50 <= {SIMILAR_P50_MS:g} ms at concurrency 1",
                            "value": r["p50_ms"], "met": r["p50_ms"] <= SIMILAR_P50_MS})
        if r["concurrency"] == 16 and r["operation"] == "query":
            targets.append({"db": at, "target": f"query req/s at concurrency 16 >= {QUERY_RATIO:g}x in-process",
                            "value": r["ratio"], "met": r["ratio"] is not None and r["ratio"] >= QUERY_RATIO})
        if r["concurrency"] == 16 and r["operation"] == "similar":
            cpu = r["server_cpu_ms_per_request"]
            targets.append({"db": at, "target": f"similar server CPU ms/request at concurrency 16 <= "
                                                f"{SIMILAR_CPU_MS:g}",
                            "value": cpu, "met": cpu is not None and cpu <= SIMILAR_CPU_MS})
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
    m = result["machine"]
    table = Table("db", "operation", "conc.", "workers", "requests", "p50 ms", "p95 ms", "req/s", "errors",
                  "server CPU ms/req", "in-process req/s", "ratio", title="simsearch serve under load (loopback)",
                  caption=f"{m['cpu']}, {m['cores']} cores; load average during the runs "
                          f"{min(loads):.1f}-{max(loads):.1f}; in-process = the same library calls from as many "
                          f"threads in one process, no HTTP, taking turns with the servers "
                          f"({result['config']['rounds']} rounds)", caption_justify="left")
    for r in result["rows"]:
        cpu = r["server_cpu_ms_per_request"]
        table.add_row(f"{r['db']} ({r['items']:,})", r["operation"], str(r["concurrency"]), str(r["workers"]),
                      str(r["requests"]), f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}", f"{r['rps']:.0f}",
                      str(r["errors"]) if not r["errors"] else f"[red]{r['errors']}[/red]",
                      "-" if cpu is None else f"{cpu:.2f}", f"{r['in_process']['rps']:.0f}", f"{r['ratio']:.2f}x")
    targets = Table("target", "db", "value", "met", title="targets")
    for t in result["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        targets.add_row(t["target"], t["db"], value, "yes" if t["met"] else "[red]no[/red]")
    return table, targets
