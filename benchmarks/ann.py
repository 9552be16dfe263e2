"""ANN benchmark: simsearch's FAISS indexes against the libraries a user would pick instead.

    python -m simsearch.benchmarks ann [--sizes 100000,1000000] [--dims 256,1280] [--kinds auto,ivf,...]
        [--peers hnswlib,usearch,milvus] [--queries 1000] [--slow] [--db PATH [--encoder NAME]] [--out results/ann.json]

Data: (a) clustered synthetic vectors (`ann_data.Mixture`: a hierarchy of clusters of very different sizes and
spreads, each varying along a few directions; L2-normalised; written block by block to a float32 file in
--work-dir, so 10M x 256 never needs more RAM than a block), queries from the same mixture but never rows of
the base; (b) with --db, the real embeddings of a simsearch db, a seeded sample held out as queries.
Ground truth: exact top-10 by inner product of every query, block by block (faiss.knn merged in a ResultHeap).

Methods, all on the same vectors in the same run, each in a fresh process (so its peak RSS is its own):
  simsearch   `build_index` with --index auto and each explicit kind (flat only up to --flat-max vectors),
              searched through `LoadedIndex` with the parameters it tuned at build to recall@10 >= --recall
              on its own sample (not on these queries); ladder: nprobe / efSearch around the tuned value
  hnswlib     HNSW, space "ip", M=32 (as simsearch's hnsw), ef_construction --efc; ef over a ladder
  usearch     HNSW, metric "ip", connectivity 32, expansion_add --efc; expansion_search over a ladder
  milvus      Milvus Lite (MilvusClient on a local file), HNSW M=32, efConstruction --efc, inserted in
              batches; ef over a ladder; searched through the client (its gRPC round trip included)
Peers get their search parameter picked on the benchmark queries themselves (the smallest ladder rung that
reaches --recall), which favours them: simsearch tunes blind, on a sample of the collection.

Figures per row: build seconds (wall, all threads), bytes per vector (the serialized index / saved file / db
folder over n; sq8's and ivfpq's re-scoring also reads the stored float32 vectors, not counted), single-query p50/p95
(one query per call on --single-threads threads, 1 by default, for everyone: hnswlib and usearch run one query
on one thread anyway, while FAISS's default OpenMP team of every core only adds barrier waits to a single query
and, on a machine other work shares, multi-millisecond stalls), batch QPS (all queries in one call, --threads
threads for everyone, default every core), recall@10 against the exact top-10 (an id tied with the 10th exact
score counts), peak RSS (VmHWM of the method's own process: build + search; includes the Python interpreter
and libraries, reported beside it as base RSS) with its peak anonymous memory in brackets (AnonPeak: VmHWM also
counts file pages the kernel can drop), and the load average around it (noisy when above the cores).

Targets checked: 1M x 256 recall@10 >= 0.95 with single-query p50 <= 1 ms (auto); 1M builds <= 120 s (auto);
10M x 256 (--slow) recall@10 >= 0.90 with peak anonymous memory <= 8 GiB; auto at or ahead of the best peer in batch QPS at
equal recall (each method's best QPS among its rows reaching the --recall target).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from simsearch.benchmarks import ann_data
from simsearch.benchmarks.ann_data import MixtureSpec, Throttle, VectorFile
from simsearch.benchmarks.common import Clock, config_json, json_default, machine, option
from simsearch.benchmarks.report import save_json
from simsearch.errors import DatasetError, UnknownNameError

log = logging.getLogger("simsearch.benchmarks.ann")

KINDS = ("auto", "flat", "ivf", "sq8", "ivfpq", "hnsw")
COMPRESSED = ("auto", "sq8", "ivfpq")  # what runs at 10M (--slow): the kinds meant to fit that in RAM
PEERS = ("hnswlib", "usearch", "milvus")
PEER_PACKAGES = {"hnswlib": ("hnswlib", ".[bench]"), "usearch": ("usearch", ".[bench]"),
                 "milvus": ("milvus_lite", ".[milvus]")}
PEER_LADDER = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
SLOW_N = 10_000_000
SLOW_BUDGET = 8 << 30  # the 10M target's RAM, also the index memory budget auto gets there
HNSW_M = 32
WORKER = "ann-worker"  # `python -m simsearch.benchmarks ann-worker TASK`: one method in a fresh process


@dataclass(frozen=True)
class AnnConfig:
    sizes: tuple[int, ...] = option((100_000, 1_000_000), "synthetic collection sizes.")
    dims: tuple[int, ...] = option((256, 1280), "synthetic vector widths.")
    kinds: tuple[str, ...] = option(KINDS, f"simsearch index kinds, of {', '.join(KINDS)}.")
    peers: tuple[str, ...] = option(PEERS, f"peer libraries, of {', '.join(PEERS)} (empty: none).")
    queries: int = option(1000, "queries, never rows of the base.")
    k: int = option(10, "neighbours per query.")
    recall: float = option(0.95, "recall@k simsearch tunes to; a peer's main row is its first ladder rung reaching it.")
    slow: bool = option(False, f"add {SLOW_N:,} x 256 for {', '.join(COMPRESSED)}.")
    synthetic: bool = option(True, "measure the synthetic data (--no-synthetic: only the --db data).")
    db: Path | None = option(None, "a simsearch db whose real embeddings are measured too.")
    encoder: str | None = option(None, "the db's encoder (a manifest name, or a registry name).")
    preprocess: str | None = option(None, "the policy of a registry --encoder (a db without manifest entries).")
    threads: int = option(0, "threads for builds and batch search (0: every core).")
    single_threads: int = option(1, "threads for single-query latency (0: every core, FAISS's default).")
    work_dir: Path = option(Path("/tmp/simsearch-ann"), "vector files, ground truth, temporary indexes.")
    max_memory: float = option(0.0, "auto's index budget in GiB (0: simsearch's default, half the RAM; the 10M rows: "
                                    f"{SLOW_BUDGET >> 30} GiB).")
    flat_max: int = option(100_000, "exact search is measured up to this many vectors.")
    efc: int = option(128, "construction beam of the peers' HNSW graphs.")
    milvus_max: int = option(1_000_000, "Milvus Lite above this many vectors is skipped (insertion is slow).")
    milvus_index_wait: float = option(900.0, "seconds to wait for Milvus Lite's background index build.")
    latency_seconds: float = option(5.0, "single queries stop after this long (at least --min-latency-queries).")
    min_latency_queries: int = option(100, "single queries timed at least.")
    qps_seconds: float = option(1.0, "the batch search repeats for at least this long.")
    ladder: bool = option(True, "measure settings around each method's tuned one (--no-ladder: only that one).")
    method_timeout: float = option(1800.0, "seconds one method may take; killed past it (its row marked skipped).")
    budget_minutes: float = option(0.0, "past this no method is started (rows marked skipped); 0: no limit.")
    seed: int = option(0, "seed of the data and of simsearch's index builds.")

    def __post_init__(self):
        for what, names, allowed in (("index kind", self.kinds, KINDS), ("peer", self.peers, PEERS)):
            if bad := [x for x in names if x not in allowed]:
                raise UnknownNameError(f"unknown {what} {', '.join(bad)} (choose from {', '.join(allowed)})")

    def nthreads(self) -> int:
        return self.threads or os.cpu_count() or 1

    def index_budget(self, n: int) -> int:
        """Bytes auto may give an index of n vectors (0: simsearch's default)."""
        return int(self.max_memory * 2**30) or (SLOW_BUDGET if n >= SLOW_N else 0)


def rss() -> dict:
    """Current and peak resident set size of this process, in MiB (from /proc/self/status)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line[:5]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return {"rss_mb": out.get("VmRSS"), "peak_mb": out.get("VmHWM")}


class AnonPeak:
    """The peak of this process's anonymous memory (RssAnon: heap, FAISS's index, numpy arrays), sampled by a daemon
    thread every `every` seconds. VmHWM also counts file pages mapped in: the vector file's rows the re-scoring
    reads, and the neighbours the kernel maps around each fault from the page cache. The kernel drops those under
    pressure, so they are not memory a machine must have (10M x 256 as sq8: VmHWM 13 GiB for a 2.6 GiB index)."""

    def __init__(self, every: float = 0.02):
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while True:
            try:
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        self.peak = max(self.peak, int(line.split()[1]) / 1024)
            except OSError:
                return
            if self._stop.wait(every):
                return

    def stop(self) -> float:
        """The peak in MiB (0 where /proc is not there)."""
        self._stop.set()
        self._thread.join()
        return self.peak


# ----------------------------------------------------------------------------------------------------------
# Measuring one searcher (inside a worker)

SearchFn = Callable[[np.ndarray], np.ndarray]  # (Q, dim) -> ids (Q, k) int64, -1 for "no answer"


def _faiss_threads(n: int) -> None:
    import faiss

    faiss.omp_set_num_threads(n)


def measure(one: SearchFn, batch: SearchFn, queries: np.ndarray, task: dict,
            clock: Clock = time.perf_counter) -> tuple[dict, np.ndarray]:
    """Single-query latency (one query per call, on task["single_threads"] threads), then batch QPS (all
    queries per call, on task["threads"]); and the ids the batch search found (the parent computes recall)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    _faiss_threads(task["single_threads"])  # peers' single-query calls pass their thread count themselves
    for i in range(min(10, len(q))):  # warm-up
        one(q[i:i + 1])
    lat = []
    deadline = clock() + task["latency_seconds"]
    for i in range(len(q)):
        t = clock()
        one(q[i:i + 1])
        lat.append(clock() - t)
        if len(lat) >= task["min_latency_queries"] and clock() > deadline:
            break
    lat_ms = np.asarray(lat) * 1e3
    _faiss_threads(task["threads"])
    reps, t0 = 0, clock()
    while True:
        found = batch(q)
        reps += 1
        if (elapsed := clock() - t0) >= task["qps_seconds"]:
            break
    qps = reps * len(q) / elapsed
    return {"p50_ms": float(np.percentile(lat_ms, 50)), "p95_ms": float(np.percentile(lat_ms, 95)),
            "latency_queries": len(lat), "qps": float(qps)}, np.asarray(found, dtype=np.int64)


def _progress(prefix: str) -> Callable[[str, int, int], None]:
    throttle, last = Throttle(), {"stage": None}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage != last["stage"] or throttle.due(done >= total):
            last["stage"] = stage
            log.info("%s: %s %s/%s", prefix, stage, f"{done:,}", f"{total:,}")

    return on_progress


def around(value: int, lo: int, hi: int) -> list[int]:
    """A few values around a tuned one: /4, /2, x1, x2, x4, within [lo, hi]."""
    return sorted({min(hi, max(lo, int(round(value * f)))) for f in (0.25, 0.5, 1, 2, 4)})


def run_simsearch(task: dict, base: VectorFile, queries: np.ndarray) -> list[dict]:
    import faiss

    from simsearch.retrieval.faiss_index import IndexConfig, LoadedIndex, build_index

    n, dim, kind = task["n"], task["dim"], task["kind"]
    cfg = IndexConfig(kind=kind, max_memory=task["max_memory"], recall=task["recall"], seed=task["seed"])
    t = time.perf_counter()
    built = build_index(lambda: base.blocks(n), dim, n, cfg, fetch=base.fetch, on_progress=_progress(task["label"]))
    build_s = time.perf_counter() - t
    plan = built.plan
    tmp = Path(task["work"]) / f"index-{os.getpid()}.faiss"
    faiss.write_index(built.index, str(tmp))  # streamed to disk: no second copy in RAM (serialize_index makes one)
    index_bytes = tmp.stat().st_size
    tmp.unlink()
    fetch = base.fetch  # as load_index does: the compressed kinds re-score their candidates from the stored vectors
    common = {"kind": plan.kind if kind != "auto" else f"auto: {plan.kind}", "factory": plan.factory(dim),
              "build_s": build_s, "build_stages": built.seconds, "index_bytes": index_bytes,
              "planned_bytes": plan.memory_bytes(n, dim), "tuned_recall": built.recall, "tuned_params": built.params}
    rows = []

    def point(params: dict, role: str) -> None:
        index = LoadedIndex(built.index, params=params, fetch=fetch)
        m, found = measure(lambda q: index.search(q, task["k"])[1], lambda q: index.search(q, task["k"])[1],
                           queries, task)
        rows.append({**common, **m, "params": dict(params), "role": role, "found": found})
        log.info("%s %s: p50 %.3f ms, %.0f QPS", task["label"], params, m["p50_ms"], m["qps"])

    point(built.params, "tuned")
    if task["ladder"]:
        if plan.kind in ("ivf", "sq8", "ivfpq"):
            name, tuned, hi = "nprobe", built.params.get("nprobe", 1), plan.nlist
        elif plan.kind == "hnsw":
            name, tuned, hi = "efSearch", built.params.get("efSearch", 16), 4096
        else:
            name = None
        if name:
            for v in around(tuned, 1 if name == "nprobe" else task["k"], hi):
                if v != tuned:
                    params = {**built.params, name: v}
                    if "quantizer_efSearch" in params:
                        params["quantizer_efSearch"] = max(64, 2 * params.get("nprobe", v))
                    point(params, "ladder")
    return rows


def _peer_ladder(task: dict, set_ef: Callable[[int], None], one: SearchFn, batch: SearchFn,
                 queries: np.ndarray, common: dict, recall_of: Callable[[np.ndarray], float]) -> list[dict]:
    """Ladder rungs up to recall 0.995 or the third reaching --recall (the first one without --ladder); the
    first rung reaching --recall is the method's main row."""
    rows, past = [], 0
    for ef in PEER_LADDER:
        if ef < task["k"]:
            continue
        set_ef(ef)
        m, found = measure(one, batch, queries, task)
        r = recall_of(found)
        rows.append({**common, **m, "params": {"ef": ef}, "role": "ladder", "found": found, "recall_hint": r})
        log.info("%s ef %d: recall %.3f, p50 %.3f ms, %.0f QPS", task["label"], ef, r, m["p50_ms"], m["qps"])
        past += r >= task["recall"]
        if r >= 0.995 or past >= (3 if task["ladder"] else 1):
            break
    reaching = [r for r in rows if r["recall_hint"] >= task["recall"]]
    (reaching or rows[-1:])[0]["role"] = "tuned"
    return rows


def run_hnswlib(task: dict, base: VectorFile, queries: np.ndarray, recall_of) -> list[dict]:
    import hnswlib

    n, dim, threads = task["n"], task["dim"], task["threads"]
    t = time.perf_counter()
    p = hnswlib.Index(space="ip", dim=dim)
    p.init_index(max_elements=n, M=HNSW_M, ef_construction=task["efc"], random_seed=task["seed"])
    p.set_num_threads(threads)
    on_progress, done = _progress(task["label"]), 0
    for ids, x in base.blocks(n):
        p.add_items(x, ids, num_threads=threads)
        done += len(ids)
        on_progress("adding vectors", done, n)
    build_s = time.perf_counter() - t
    tmp = Path(task["work"]) / f"hnswlib-{os.getpid()}.bin"
    p.save_index(str(tmp))
    size = tmp.stat().st_size
    tmp.unlink()
    common = {"kind": "hnsw", "factory": f"hnswlib M={HNSW_M} ef_construction={task['efc']}", "build_s": build_s,
              "index_bytes": size}
    k = task["k"]
    one = task["single_threads"]
    return _peer_ladder(task, p.set_ef, lambda q: p.knn_query(q, k, num_threads=one)[0].astype(np.int64),
                        lambda q: p.knn_query(q, k, num_threads=threads)[0].astype(np.int64), queries, common, recall_of)


def run_usearch(task: dict, base: VectorFile, queries: np.ndarray, recall_of) -> list[dict]:
    from usearch.index import Index

    n, dim, threads, k = task["n"], task["dim"], task["threads"], task["k"]
    t = time.perf_counter()
    ix = Index(ndim=dim, metric="ip", dtype="f32", connectivity=HNSW_M, expansion_add=task["efc"])
    on_progress, done = _progress(task["label"]), 0
    for ids, x in base.blocks(n):
        ix.add(ids.astype(np.uint64), x, threads=threads)
        done += len(ids)
        on_progress("adding vectors", done, n)
    build_s = time.perf_counter() - t
    tmp = Path(task["work"]) / f"usearch-{os.getpid()}.usearch"
    ix.save(str(tmp))
    size = tmp.stat().st_size
    tmp.unlink()

    def keys(m) -> np.ndarray:
        out = np.asarray(m.keys, dtype=np.int64).reshape(-1, k)
        counts = np.asarray(m.counts).reshape(-1, 1) if hasattr(m, "counts") else np.full((len(out), 1), k)
        return np.where(np.arange(k)[None, :] < counts, out, -1)

    def set_ef(ef: int) -> None:
        ix.expansion_search = ef

    common = {"kind": "hnsw", "factory": f"usearch connectivity={HNSW_M} expansion_add={task['efc']}",
              "build_s": build_s, "index_bytes": size}
    one = task["single_threads"]
    return _peer_ladder(task, set_ef, lambda q: keys(ix.search(q, k, threads=one)),
                        lambda q: keys(ix.search(q, k, threads=threads)),
                        queries, common, recall_of)


def run_milvus(task: dict, base: VectorFile, queries: np.ndarray, recall_of) -> list[dict]:
    from pymilvus import DataType, MilvusClient

    n, dim, k = task["n"], task["dim"], task["k"]
    path = Path(task["work"]) / f"milvus-{os.getpid()}.db"
    shutil.rmtree(path, ignore_errors=True)
    t = time.perf_counter()
    client = MilvusClient(str(path))
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    index_params = client.prepare_index_params()
    index_params.add_index(field_name="vector", index_type="HNSW", metric_type="IP",
                           params={"M": HNSW_M, "efConstruction": task["efc"]})
    client.create_collection("bench", schema=schema, index_params=index_params)
    on_progress, done = _progress(task["label"]), 0
    for ids, x in base.blocks(n, rows=10_000):
        client.insert("bench", [{"id": int(i), "vector": v} for i, v in zip(ids, x)])
        done += len(ids)
        on_progress("inserting", done, n)
    insert_s = time.perf_counter() - t
    client.flush("bench")
    client.load_collection("bench")
    flush_s = time.perf_counter() - t - insert_s
    # Milvus Lite builds segment indexes (and compacts segments) in a background thread after the flush: until
    # it is done, searches brute-force the unindexed segments. Its describe_index says "Finished" regardless,
    # so wait until every data file has its HNSW sidecar (collections/*/partitions/*/{data,indexes}), steadily.
    state, steady, deadline = None, 0, time.perf_counter() + task["milvus_index_wait"]
    while steady < 3 and time.perf_counter() < deadline:
        data = {f.stem for f in path.glob("collections/*/partitions/*/data/*.parquet")}
        indexed = {f.name.split(".")[0] for f in path.glob("collections/*/partitions/*/indexes/*.idx")}
        now = (len(data), len(data & indexed))
        steady = steady + 1 if now == state and data and data <= indexed else 0
        if now != state:
            log.info("%s: %d segments, %d indexed", task["label"], *now)
        state = now
        time.sleep(1.0)
    build_s = time.perf_counter() - t
    if steady < 3:
        log.warning("%s: the index was not finished after %.0f s (%s): searches may brute-force", task["label"],
                    task["milvus_index_wait"], state)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    ef = {"ef": 64}

    def search(q: np.ndarray) -> np.ndarray:
        res = client.search("bench", data=[v for v in q], limit=k, output_fields=["id"],
                            search_params={"metric_type": "IP", "params": dict(ef)})
        out = np.full((len(q), k), -1, dtype=np.int64)
        for i, hits in enumerate(res):
            got = [h["id"] for h in hits][:k]
            out[i, :len(got)] = got
        return out

    def set_ef(value: int) -> None:
        ef["ef"] = value

    common = {"kind": "hnsw", "factory": f"Milvus Lite HNSW M={HNSW_M} efConstruction={task['efc']}",
              "build_s": build_s, "index_bytes": size, "index_state": state,
              "build_stages": {"insert": insert_s, "flush+load": flush_s, "index": build_s - insert_s - flush_s}}
    try:
        return _peer_ladder(task, set_ef, search, search, queries, common, recall_of)
    finally:
        client.close()
        shutil.rmtree(path, ignore_errors=True)


def worker(task_path: Path) -> None:
    """One method on one data set, in this (fresh) process: rows + found ids to <task>.out.json/.npz."""
    import faiss

    task = json.loads(task_path.read_text())
    faiss.omp_set_num_threads(task["threads"])
    base = VectorFile(Path(task["base"]), task["n"], task["dim"])
    queries = np.load(task["queries"])
    gt = np.load(task["gt"])
    before, load0, anon = rss(), os.getloadavg()[0], AnonPeak()

    def recall_of(found: np.ndarray) -> float:  # id overlap only (ties are the parent's job): picks peers' rung
        return float(np.mean([len(set(f) & set(g)) for f, g in zip(found, gt["ids"])]) / task["k"])

    method = task["method"]
    if method == "simsearch":
        rows = run_simsearch(task, base, queries)
    else:
        rows = {"hnswlib": run_hnswlib, "usearch": run_usearch, "milvus": run_milvus}[method](task, base, queries, recall_of)
    after, peak_anon = rss(), anon.stop()
    found = {f"r{i}": r.pop("found") for i, r in enumerate(rows)}
    for r in rows:
        r.pop("recall_hint", None)
        # The machine's 1-minute load average around this method: above its core count, other work competed.
        r.update(base_rss_mb=before["rss_mb"], peak_rss_mb=after["peak_mb"], peak_anon_mb=peak_anon,
                 load_avg=[load0, os.getloadavg()[0]])
    np.savez(task_path.with_suffix(".found.npz"), **found)
    save_json(rows, task_path.with_suffix(".out.json"), default=json_default)


# ----------------------------------------------------------------------------------------------------------
# The run (parent process)


@dataclass
class Dataset:
    name: str
    base: VectorFile
    queries: np.ndarray
    sizes: list[int]
    facts: dict = field(default_factory=dict)


def _datasets(cfg: AnnConfig) -> list[Dataset]:
    out = []
    work = Path(cfg.work_dir)
    if cfg.synthetic:
        for dim in cfg.dims:
            sizes = [n for n in cfg.sizes]
            if cfg.slow and dim == 256 and SLOW_N not in sizes:
                sizes.append(SLOW_N)
            if not sizes:
                continue
            spec = MixtureSpec(dim=dim, seed=cfg.seed)
            base, q = ann_data.write_synthetic(work, spec, max(sizes), cfg.queries, on_log=log.info)
            out.append(Dataset(f"synthetic {dim}-d", base, q, sorted(sizes),
                               {"kind": "synthetic", "spec": asdict(spec), "key": spec.key()}))
    if cfg.db is not None:
        if not cfg.encoder:
            from simsearch.indexer.store import Store

            with Store(cfg.db, readonly=True) as store:
                names = list(store.manifest.encoders)
            if len(names) != 1:
                raise DatasetError(f"--db {cfg.db}: pass --encoder (the manifest lists {', '.join(names) or 'none'})")
            encoder = names[0]
        else:
            encoder = cfg.encoder
        base, q, facts = ann_data.export_db(Path(cfg.db), encoder, work, cfg.queries, cfg.seed, cfg.preprocess,
                                            on_log=log.info)
        out.append(Dataset(f"db {Path(cfg.db).name}: {encoder}", base, q, [base.n],
                           {"kind": "db", **facts, "key": Path(base.path).stem}))
    return out


def _methods(cfg: AnnConfig, n: int) -> list[tuple[str, str]]:
    """(method, kind) pairs for a data set of n vectors."""
    kinds = [k for k in cfg.kinds if (k != "flat" or n <= cfg.flat_max) and (n < SLOW_N or k in COMPRESSED)]
    out = [("simsearch", k) for k in kinds]
    if n < SLOW_N:
        out += [(p, "hnsw") for p in cfg.peers]
    return out


def _plan(cfg: AnnConfig, kind: str, n: int, dim: int):
    """simsearch's plan for (kind, n, dim) under the budget the task gets (a pure function: no build)."""
    from simsearch.retrieval.faiss_index import IndexConfig

    return IndexConfig(kind=kind, max_memory=cfg.index_budget(n)).plan(n, dim)


def _skip_reason(cfg: AnnConfig, method: str, n: int, started: float) -> str | None:
    if method in PEER_PACKAGES:
        module, extra = PEER_PACKAGES[method]
        if importlib.util.find_spec(module) is None:
            return f"not installed: pip install -e '{extra}'"
        if method == "milvus" and n > cfg.milvus_max:
            return f"n > --milvus-max {cfg.milvus_max:,} (insertion through the client is slow)"
    if cfg.budget_minutes and time.monotonic() - started > cfg.budget_minutes * 60:
        return f"time budget of {cfg.budget_minutes:g} min spent"
    return None


def run(cfg: AnnConfig) -> dict:
    started = time.monotonic()
    work = Path(cfg.work_dir)
    (work / "tasks").mkdir(parents=True, exist_ok=True)
    result = {"config": config_json(cfg),
              "machine": machine(), "threads": cfg.nthreads(), "datasets": [], "rows": []}
    for ds in _datasets(cfg):
        for n in ds.sizes:
            gt_path = work / f"gt-{ds.facts['key']}-n{n}-q{len(ds.queries)}-k{cfg.k}.npz"
            t = time.perf_counter()
            scores, ids = ann_data.ground_truth(ds.base, n, ds.queries, cfg.k, gt_path, on_log=log.info)
            gt_s = time.perf_counter() - t
            q_path = work / f"queries-{ds.facts['key']}-q{len(ds.queries)}.npy"
            np.save(q_path, ds.queries)
            stats = ann_data.data_stats(ds.base, n, ds.queries, scores)
            result["datasets"].append({"name": ds.name, "n": n, "dim": ds.base.dim, "queries": len(ds.queries),
                                       "ground_truth_seconds": gt_s, "stats": stats, **ds.facts})
            log.info("%s, n=%s: %s", ds.name, f"{n:,}", {k: round(v, 3) for k, v in stats.items()})
            auto_plan = _plan(cfg, "auto", n, ds.base.dim) if "auto" in cfg.kinds else None
            for method, kind in _methods(cfg, n):
                label = f"{ds.name} n={n:,} {method}" + (f" {kind}" if method == "simsearch" else "")
                row0 = {"data": ds.name, "n": n, "dim": ds.base.dim, "method": method, "kind": kind}
                reason = _skip_reason(cfg, method, n, started)
                if method == "simsearch" and kind != "auto" and _plan(cfg, kind, n, ds.base.dim) == auto_plan:
                    reason = "the index auto builds: see the auto row"
                if reason:
                    log.info("%s: skipped (%s)", label, reason)
                    result["rows"].append({**row0, "role": "tuned", "skipped": reason})
                    continue
                log.info("%s: starting", label)
                rows = _run_task(cfg, ds, n, method, kind, label, q_path, gt_path)
                for r in rows:
                    found = r.pop("found", None)
                    if found is not None:
                        r["recall"] = ann_data.recall_at_k(found, ids, scores, ds.base, ds.queries)
                    r["bytes_per_vector"] = r["index_bytes"] / n if r.get("index_bytes") else None
                    result["rows"].append({**row0, **r})
                tuned = [r for r in rows if r.get("role") == "tuned" and "recall" in r]
                if tuned:
                    r = tuned[0]
                    log.info("%s: recall@10 %.3f, p50 %.3f ms, %.0f QPS, build %.1f s, peak RSS %.0f MiB", label,
                             r["recall"], r["p50_ms"], r["qps"], r["build_s"], r.get("peak_rss_mb") or 0)
    result["targets"] = targets(result, cfg)
    result["wall_seconds"] = time.monotonic() - started
    return result


def _run_task(cfg: AnnConfig, ds: Dataset, n: int, method: str, kind: str, label: str, q_path: Path,
              gt_path: Path) -> list[dict]:
    work = Path(cfg.work_dir)
    task = {"method": method, "kind": kind, "label": label, "base": str(ds.base.path), "n": n, "dim": ds.base.dim,
            "queries": str(q_path), "gt": str(gt_path), "k": cfg.k, "recall": cfg.recall, "threads": cfg.nthreads(),
            "single_threads": cfg.single_threads or cfg.nthreads(),
            "work": str(work), "max_memory": cfg.index_budget(n), "efc": cfg.efc, "seed": cfg.seed, "ladder": cfg.ladder,
            "latency_seconds": cfg.latency_seconds, "min_latency_queries": cfg.min_latency_queries,
            "qps_seconds": cfg.qps_seconds, "milvus_index_wait": cfg.milvus_index_wait}
    path = work / "tasks" / f"{method}-{kind}-{ds.facts['key']}-{n}.json"
    for suffix in (".out.json", ".found.npz"):
        path.with_suffix(suffix).unlink(missing_ok=True)
    save_json(task, path)
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.nthreads())}
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "simsearch.benchmarks", WORKER, str(path)],
                              timeout=cfg.method_timeout, env=env, stdout=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        log.warning("%s: killed after %.0f s", label, cfg.method_timeout)
        return [{"role": "tuned", "skipped": f"over the per-method time limit ({cfg.method_timeout:.0f} s)"}]
    if proc.returncode != 0 or not path.with_suffix(".out.json").is_file():
        return [{"role": "tuned", "skipped": f"failed (exit {proc.returncode}; its log is above)"}]
    rows = json.loads(path.with_suffix(".out.json").read_text())
    found = np.load(path.with_suffix(".found.npz"))
    for i, r in enumerate(rows):
        r["found"] = found[f"r{i}"]
        r["worker_seconds"] = time.perf_counter() - t
    return rows


# ----------------------------------------------------------------------------------------------------------
# Targets and rendering


def best_at_recall(rows: list[dict], recall: float) -> dict | None:
    """The row with the highest batch QPS among those reaching `recall`."""
    ok = [r for r in rows if r.get("recall", 0) >= recall and not r.get("skipped")]
    return max(ok, key=lambda r: r["qps"]) if ok else None


def _tuned(result: dict, method: str, kind: str | None = None) -> list[dict]:
    return [r for r in result["rows"] if r["method"] == method and r.get("role") == "tuned" and not r.get("skipped")
            and (kind is None or r["kind"] == kind or r["kind"].startswith(f"{kind}:"))]


def targets(result: dict, cfg: AnnConfig) -> list[dict]:
    out = []
    synth = [r for r in result["rows"] if r["data"].startswith("synthetic")]
    for r in _tuned({"rows": synth}, "simsearch", "auto"):
        if r["n"] == 1_000_000 and r["dim"] == 256:
            out.append({"name": "1M x 256: auto recall@10 >= 0.95 with single-query p50 <= 1 ms",
                        "value": f"recall {r['recall']:.3f}, p50 {r['p50_ms']:.3f} ms ({r['kind']})",
                        "met": r["recall"] >= 0.95 and r["p50_ms"] <= 1.0})
        if r["n"] == 1_000_000:
            out.append({"name": f"1M x {r['dim']}: auto build <= 120 s", "value": f"{r['build_s']:.1f} s ({r['kind']})",
                        "met": r["build_s"] <= 120})
    slow = [r for r in _tuned({"rows": synth}, "simsearch") if r["n"] >= SLOW_N]
    if slow:
        ok = [r for r in slow if r["recall"] >= 0.90 and (r.get("peak_anon_mb") or 1e18) <= SLOW_BUDGET / 2**20]
        best = max(ok or slow, key=lambda r: (r in ok, r["recall"]))
        out.append({"name": "10M x 256: recall@10 >= 0.90 within 8 GiB (peak anonymous memory)",
                    "value": "; ".join(f"{r['kind']}: recall {r['recall']:.3f}, peak anon {r.get('peak_anon_mb', 0) / 1024:.2f} "
                                       f"GiB (RSS {r.get('peak_rss_mb', 0) / 1024:.2f})" for r in slow),
                    "met": bool(ok), "best": best["kind"]})
    groups = {(r["data"], r["n"], r["dim"]) for r in result["rows"]}
    for g in sorted(groups, key=lambda g: (g[0], g[2], g[1])):
        rows = [r for r in result["rows"] if (r["data"], r["n"], r["dim"]) == g and not r.get("skipped")]
        autos = [r for r in rows if r["method"] == "simsearch" and r["kind"].startswith("auto")]
        peers = {m: best_at_recall([r for r in rows if r["method"] == m], cfg.recall) for m in PEERS}
        peers = {m: r for m, r in peers.items() if r}
        if not autos or not peers:
            continue
        a = best_at_recall(autos, cfg.recall)
        pm, pr = max(peers.items(), key=lambda kv: kv[1]["qps"])
        value = (f"auto {a['qps']:.0f} QPS (recall {a['recall']:.3f}, {a['params']})" if a else
                 f"auto never reaches recall {cfg.recall}") + \
            f" vs {pm} {pr['qps']:.0f} QPS (recall {pr['recall']:.3f}, {pr['params']})"
        out.append({"name": f"{g[0]}, {g[1]:,}: auto QPS >= best peer's at recall@10 >= {cfg.recall}",
                    "value": value, "met": bool(a and a["qps"] >= pr["qps"])})
    return out


def _fmt(x, spec: str, unit: str = "") -> str:
    return "" if x is None else f"{x:{spec}}{unit}"


def _params(r: dict) -> str:
    p = r.get("params") or {}
    return ", ".join(f"{k}={v}" for k, v in p.items() if k != "quantizer_efSearch")


def _peak(r: dict) -> str:
    """VmHWM and, in brackets, the peak anonymous memory (AnonPeak), MiB."""
    anon = r.get("peak_anon_mb")
    return _fmt(r.get("peak_rss_mb"), ",.0f") + (f" ({anon:,.0f})" if anon else "")


def render(result: dict) -> tuple:
    """(main table, trade-off table, targets table) as rich Tables."""
    from rich.table import Table

    m = result["machine"]
    cols = ("data", "n", "method", "kind", "search params", "build s", "B/vec", "p50 ms", "p95 ms", "QPS",
            "recall@10", "at build", "peak RSS (anon) MiB")
    c = result["config"]
    main = Table(*cols, title=f"ANN: each method at recall@10 >= {c['recall']} (simsearch: as tuned at build; "
                              "peers: first ladder rung reaching it)",
                 caption=f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; single queries on "
                         f"{c['single_threads'] or result['threads']} thread(s), batch QPS on {result['threads']}; "
                         f"{c['queries']} queries not in the base; 'at build': the recall simsearch measured on its "
                         "own tuning sample",
                 caption_justify="left")
    ladder = Table("data", "n", "method", "kind", "search params", "recall@10", "p50 ms", "QPS",
                   title="recall / speed trade-off (every measured setting)")
    for r in result["rows"]:
        base = (r["data"], f"{r['n']:,}", r["method"], r["kind"])
        if r.get("skipped"):
            main.add_row(*base, f"[dim]skipped: {r['skipped']}[/dim]", *[""] * 8)
            continue
        cells = (_params(r), _fmt(r["recall"], ".3f"), _fmt(r["p50_ms"], ".3f"), _fmt(r["qps"], ",.0f"))
        ladder.add_row(*base, *cells, style=None if r["role"] == "tuned" else "dim")
        if r["role"] == "tuned":
            main.add_row(*base, _params(r), _fmt(r["build_s"], ".1f"), _fmt(r.get("bytes_per_vector"), ",.0f"),
                         _fmt(r["p50_ms"], ".3f"), _fmt(r["p95_ms"], ".3f"), _fmt(r["qps"], ",.0f"),
                         _fmt(r["recall"], ".3f"), _fmt(r.get("tuned_recall"), ".3f"), _peak(r))
    tgt = Table("target", "measured", "met", title="targets")
    for t in result["targets"]:
        tgt.add_row(t["name"], t["value"], "yes" if t["met"] else "[red]no[/red]")
    return main, ladder, tgt


def markdown(result: dict) -> str:
    """The main rows as a markdown table (for docs/scale.md)."""
    lines = ["| data | n | method | kind | params | build s | B/vec | p50 ms | p95 ms | QPS | recall@10 | at build | peak RSS (anon) MiB |",
             "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r.get("role") != "tuned":
            continue
        if r.get("skipped"):
            lines.append(f"| {r['data']} | {r['n']:,} | {r['method']} | {r['kind']} | skipped: {r['skipped']} |"
                         + " |" * 8)
            continue
        lines.append(f"| {r['data']} | {r['n']:,} | {r['method']} | {r['kind']} | {_params(r)} | {r['build_s']:.1f} | "
                     f"{_fmt(r.get('bytes_per_vector'), ',.0f')} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | "
                     f"{r['qps']:,.0f} | {r['recall']:.3f} | {_fmt(r.get('tuned_recall'), '.3f')} | "
                     f"{_peak(r)} |")
    return "\n".join(lines)
