"""Speed benchmark: encoder throughput (fp32 and int8), end-to-end indexing against the machine's limit,
warm query latency, cold start.

    python -m simsearch.benchmarks speed [--out results/speed.json] [--encoder efficientnet-lite0]

Every figure is measured in this one run on this machine, and each is reported as a ratio against a
baseline measured alongside it (timings on shared machines drift by tens of percent between runs):
  (a) torch eager vs ONNX Runtime, same fp32 model, same real-photo batch   target: ORT >= 2x torch
  (b) `index` on a folder of real JPEGs (decode included) vs pure ORT img/s  target: >= 0.85x
  (c) warm FAISS search p50/p95 over 1,000 queries on 100,000 vectors        target: p50 <= 5 ms
      (the default "auto" index, i.e. IVF at this size, against exact search; recall@10 against exact)
  (d) cold `simsearch query` as a process vs `python -c pass`               target: <= 1.5 s
  (e) ORT int8 (`<encoder>-int8`) vs fp32, same batch, same threads          target: int8 >= 3x fp32
      (3x needs fast int8 kernels: AVX-512 VNNI / AVX-VNNI or ARM dotprod; without them ~1.6x)
  (f) `index` with the int8 encoder vs pure int8 ORT img/s                  target: >= 0.85x
  (g) `index` (b) and (f) vs the physical limit of this machine, fp32 and int8   target: >= 0.9x
      limit = cores / (decode core-seconds per image + encoder core-seconds per image), where decode =
      single-threaded read + load_rgb + to_input of the photos `index` reads, and encoder = 1 / img/s of
      ORT at 1 thread: what `index` could reach if every core did nothing but decode and encode.

--encoder names the model family: given an int8 name (`<name>-int8`), its fp32 encoder is the fp32 side of
(a), (b) and (e), and the int8 name itself the int8 side.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from simsearch.benchmarks.common import (Clock, config_json, default_images, machine, option, photos, precisions,
                                         real_batch, throughput, timed)
from simsearch.encoders.registry import DEFAULT_BASE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedConfig:
    images: Path = option(help="folder of JPEGs (default: the shared imagenet-samples).", factory=default_images)
    max_images: int = option(1000, "photos indexed in (b) and (f); the real batch of (a) and (e) is their first.")
    encoder: str = option(DEFAULT_BASE, "fp32 or int8 name of one encoder: both precisions are measured.")
    batch_size: int = option(32, "images per encoder call.")
    min_seconds: float = option(8.0, "each throughput is timed for at least this long (after one warm-up batch).")
    decode_images: int = option(300, "of the indexed photos, decoded on one thread for the physical limit (g).")
    vectors: int = option(100_000, "synthetic vectors searched in (c).")
    dim: int = option(1280, "their width (the baseline encoder's).")
    queries: int = option(1000, "single queries timed in (c).")
    k: int = option(10, "neighbours per query in (c).")
    cold_runs: int = option(5, "fresh `simsearch query` processes in (d); the best counts.")
    models_dir: Path | None = option(None, "encoder cache folder (default: simsearch's).")


@dataclass
class Measure:
    name: str
    value: float
    unit: str
    baseline: float | None = None  # same quantity measured for the baseline in this run
    baseline_name: str = ""
    target: str = ""
    met: bool | None = None
    detail: str = ""

    @property
    def ratio(self) -> float | None:
        return self.value / self.baseline if self.baseline else None


def _ort_throughput(cfg: SpeedConfig, spec, batch: np.ndarray, threads: int, clock: Clock) -> float:
    """img/s of ONNX Runtime on CPU with `threads` intra-op threads (int8: quantised first, untimed)."""
    from simsearch.devices import Device
    from simsearch.encoders.runtime import OnnxEncoder

    encoder = OnnxEncoder(spec, Device.cpu, cfg.models_dir, threads=threads)
    return throughput(lambda: encoder.embed(batch), len(batch), cfg.min_seconds, clock)


def encoder_throughput(cfg: SpeedConfig, spec, batch: np.ndarray, clock: Clock = time.perf_counter
                       ) -> tuple[Measure, float]:
    """(a): torch eager vs ONNX Runtime (fp32) on the same batch; returns the measure and ORT img/s."""
    import torch

    from simsearch.encoders.export import build_embedding_model
    from simsearch.encoders.runtime import cpu_count

    ort_ips = _ort_throughput(cfg, spec, batch, cpu_count(), clock)
    torch.set_num_threads(cpu_count())
    model = build_embedding_model(spec)
    x = torch.from_numpy(batch)
    with torch.inference_mode():
        torch_ips = throughput(lambda: model(x), len(batch), cfg.min_seconds, clock)
    m = Measure("(a) encoder, ORT vs torch", ort_ips, "img/s", torch_ips, "torch eager", ">= 2x",
                detail=f"{spec.name}, batch {len(batch)} of real photos, {cpu_count()} threads")
    m.met = m.ratio >= 2.0
    return m, ort_ips


def int8_throughput(cfg: SpeedConfig, fp32, int8, batch: np.ndarray, fp32_ips: float,
                    clock: Clock = time.perf_counter) -> tuple[Measure, float]:
    """(e): ORT int8 vs ORT fp32 (fp32_ips: (a)'s ORT figure), same batch, same threads; returns the measure
    and int8 img/s."""
    from simsearch.encoders.quantize import int8_fast_here
    from simsearch.encoders.runtime import cpu_count

    int8_ips = _ort_throughput(cfg, int8, batch, cpu_count(), clock)
    fast = int8_fast_here()
    m = Measure("(e) encoder, int8 vs fp32", int8_ips, "img/s", fp32_ips, "fp32 ORT", ">= 3x",
                detail=f"{int8.name} vs {fp32.name}, batch {len(batch)} of real photos, {cpu_count()} threads; "
                       f"fast int8 kernels on this CPU (VNNI/dotprod): {'yes' if fast else 'no'}")
    m.met = m.ratio >= 3.0
    return m, int8_ips


def index_throughput(cfg: SpeedConfig, spec, ort_ips: float, folder: Path, db: Path,
                     name: str = "(b) index, end to end", baseline_name: str = "pure ORT",
                     clock: Clock = time.perf_counter) -> Measure:
    """(b), (f): a fresh `index` of real JPEGs (scan, read, hash, decode, embed, write, FAISS build)."""
    from simsearch.devices import Device
    from simsearch.encoders.runtime import OnnxEncoder
    from simsearch.indexer.pipeline import Indexer, IndexerConfig
    from simsearch.indexer.store import Store
    from simsearch.retrieval.backend import refresh

    encoder = OnnxEncoder(spec, Device.cpu, cfg.models_dir)
    t = clock()
    with Store(db, create=True) as store:
        report = Indexer(encoder, store, IndexerConfig(batch_size=cfg.batch_size)).run(folder)
        t_index = clock()
        refresh(store, encoder.spec.name)
        report.seconds["index"] = clock() - t_index
    report.wall = clock() - t
    log.info("index (%s): %d images in %.1f s, stages %s", spec.name, report.embedded,
             report.wall, {k: round(v, 2) for k, v in report.seconds.items()})
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
    m = Measure(name, report.images_per_second, "img/s", ort_ips, baseline_name, ">= 0.85x",
                detail=f"{spec.name}: {report.embedded} JPEGs in {report.wall:.1f} s; "
                       f"stage seconds (decode summed over threads): {stages}")
    m.met = m.ratio >= 0.85
    return m


def decode_core_seconds(cfg: SpeedConfig, spec, clock: Clock = time.perf_counter) -> dict:
    """Single-threaded wall (and CPU) seconds per image of what `index` does to a new photo before the encoder:
    read the file, load_rgb at decode_side(spec), to_input; over up to cfg.decode_images of the photos `index`
    reads (evenly spaced), after one untimed warm-up. Left out: sha256 (~0.07 ms of ~4.5 ms per photo on a 2-core AMD EPYC with AVX2, no VNNI) and the
    store write."""
    from simsearch.encoders.preprocess import decode_side, to_input
    from simsearch.indexer.images import load_rgb

    indexed = photos(cfg.images, cfg.max_images)
    sample = indexed[:: max(1, len(indexed) // cfg.decode_images)][: cfg.decode_images]
    side = decode_side(spec)

    def prepare(p: Path) -> None:
        to_input(load_rgb(p, side, data=p.read_bytes()), spec)

    prepare(sample[0])
    wall, cpu = clock(), time.thread_time()
    for p in sample:
        prepare(p)
    return {"images": len(sample), "wall_seconds_per_image": (clock() - wall) / len(sample),
            "cpu_seconds_per_image": (time.thread_time() - cpu) / len(sample)}


def physical_limit(cfg: SpeedConfig, spec, batch: np.ndarray, decode: dict, clock: Clock = time.perf_counter) -> dict:
    """The end-to-end img/s ceiling of this machine for `spec`: cores / (decode + encoder core-seconds per image)."""
    from simsearch.encoders.runtime import cpu_count

    one_thread_ips = _ort_throughput(cfg, spec, batch, 1, clock)
    encoder_s = 1.0 / one_thread_ips
    decode_s = decode["wall_seconds_per_image"]
    return {"encoder": spec.name, "cores": cpu_count(), "decode_core_seconds": decode_s,
            "encoder_core_seconds": encoder_s, "encoder_1_thread_ips": one_thread_ips,
            "limit_ips": cpu_count() / (decode_s + encoder_s)}


def limit_measure(index: Measure, limit: dict, decode: dict, precision: str) -> Measure:
    """(g): `index` img/s (index: (b) or (f)) as a fraction of the physical limit."""
    m = Measure(f"(g) index vs physical limit, {precision}", index.value, "img/s", limit["limit_ips"],
                "physical limit", ">= 0.9x",
                detail=f"{precision}: limit = {limit['cores']} cores / (decode {limit['decode_core_seconds'] * 1e3:.2f} ms "
                       f"+ encoder {limit['encoder_core_seconds'] * 1e3:.2f} ms core-seconds per image); decode: "
                       f"read + load_rgb + to_input, 1 thread, {decode['images']} of the indexed photos "
                       f"(CPU {decode['cpu_seconds_per_image'] * 1e3:.2f} ms); encoder: 1 / {limit['encoder']} ORT "
                       f"at 1 thread ({limit['encoder_1_thread_ips']:.1f} img/s)")
    m.met = m.ratio >= 0.9
    return m


def clustered_vectors(n: int, dim: int, rng: np.random.Generator, centers: int = 1000) -> np.ndarray:
    """(n, dim) L2-normalised vectors around random centres: structure like image embeddings.

    Uniform random vectors have no neighbourhoods, so an IVF index's recall on them says nothing.
    """
    c = rng.standard_normal((centers, dim), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for i in range(0, n, 10_000):  # blocks keep the temporary noise small
        m = min(10_000, n - i)
        x = c[rng.integers(0, centers, m)] + 0.8 * rng.standard_normal((m, dim), dtype=np.float32)
        out[i:i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def query_latency(cfg: SpeedConfig, clock: Clock = time.perf_counter) -> tuple[Measure, dict]:
    """(c): one query at a time, as a user's query arrives; the "auto" index vs exact search."""
    from simsearch.retrieval.faiss_index import IndexConfig, LoadedIndex, build_index
    from simsearch.retrieval.tuning import recall_at_k

    rng = np.random.default_rng(0)
    vecs = clustered_vectors(cfg.vectors, cfg.dim, rng)
    ids = np.arange(cfg.vectors, dtype=np.int64)
    queries = vecs[rng.integers(0, cfg.vectors, cfg.queries)] + 0.05 * rng.standard_normal((cfg.queries, cfg.dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    def blocks():
        return ((ids[i:i + 65536], vecs[i:i + 65536]) for i in range(0, cfg.vectors, 65536))

    results = {}
    for kind in ("flat", "auto"):
        built, build_s = timed(lambda: build_index(blocks, cfg.dim, cfg.vectors, IndexConfig(kind=kind)), clock)
        index = LoadedIndex(built.index, params=built.params)
        index.search(queries[:10], cfg.k)  # warm-up
        lat, found = np.empty(cfg.queries), np.empty((cfg.queries, cfg.k), dtype=np.int64)
        for i in range(cfg.queries):
            (_, found[i]), lat[i] = timed(lambda: index.search(queries[i:i + 1], cfg.k), clock)
        params = ",".join(f"{k}{v}" for k, v in built.params.items())
        results[kind] = {"index": built.plan.kind + (f"{built.plan.nlist},{params}" if params else ""), "build_seconds": build_s,
                         "p50_ms": float(np.percentile(lat, 50) * 1e3), "p95_ms": float(np.percentile(lat, 95) * 1e3),
                         "found": found}
    exact = results["flat"].pop("found")
    approx = results["auto"].pop("found")
    results["auto"]["recall_at_k"] = recall_at_k(approx, exact, cfg.k)
    auto, flat = results["auto"], results["flat"]
    m = Measure("(c) warm search p50", auto["p50_ms"], "ms", flat["p50_ms"], "exact search", "p50 <= 5 ms",
                detail=f"{cfg.queries} single queries, k={cfg.k}, {cfg.vectors:,} x {cfg.dim}: {auto['index']} "
                       f"p95 {auto['p95_ms']:.2f} ms, recall@{cfg.k} {auto['recall_at_k']:.3f} vs exact "
                       f"(p95 {flat['p95_ms']:.1f} ms); build {auto['build_seconds']:.1f} s vs {flat['build_seconds']:.1f} s")
    m.met = m.value <= 5.0
    return m, results


def cold_query(cfg: SpeedConfig, db: Path, clock: Clock = time.perf_counter) -> Measure:
    """(d): wall time of `simsearch query` as a fresh process, best of `cold_runs` (page cache warm)."""
    query = photos(cfg.images, 1)[0]
    cmd = [sys.executable, "-m", "simsearch.cli", "query", str(query), "-k", "10", "--db", str(db)]
    env_models = {"SIMSEARCH_MODELS_DIR": str(cfg.models_dir)} if cfg.models_dir else {}

    def best(argv: list[str]) -> float:
        env = {**os.environ, **env_models}
        return min(timed(lambda: subprocess.run(argv, check=True, capture_output=True, env=env), clock)[1]
                   for _ in range(cfg.cold_runs))

    m = Measure("(d) cold `simsearch query`", best(cmd), "s", best([sys.executable, "-c", "pass"]),
                "python -c pass", "<= 1.5 s", detail=f"best of {cfg.cold_runs} processes, k=10")
    m.met = m.value <= 1.5
    return m


def run(cfg: SpeedConfig, clock: Clock = time.perf_counter) -> dict:
    """Every measure, (a) to (g), in one run; `clock` times them all (a test passes a fake one)."""
    from simsearch.encoders.quantize import int8_fast_here

    fp32, int8 = precisions(cfg.encoder, cfg.models_dir)
    indexed = photos(cfg.images, cfg.max_images)
    # int8 variants share their fp32 encoder's preprocessing: the same batch
    batch = real_batch(indexed[: cfg.batch_size], fp32)
    with tempfile.TemporaryDirectory(prefix="simsearch-speed-") as tmp:
        db = Path(tmp) / "db"
        folder = Path(tmp) / "images"
        folder.mkdir()
        for p in indexed:
            (folder / p.name).symlink_to(p)
        a, fp32_ips = encoder_throughput(cfg, fp32, batch, clock)
        e, int8_ips = int8_throughput(cfg, fp32, int8, batch, fp32_ips, clock)
        b = index_throughput(cfg, fp32, fp32_ips, folder, db, clock=clock)
        f = index_throughput(cfg, int8, int8_ips, folder, Path(tmp) / "db-int8",
                             "(f) index, end to end, int8", "pure int8 ORT", clock)
        decode = decode_core_seconds(cfg, fp32, clock)  # after (b): the photos are in the page cache, as for (f)
        limits = {"fp32": physical_limit(cfg, fp32, batch, decode, clock),
                  "int8": physical_limit(cfg, int8, batch, decode, clock)}
        g = [limit_measure(index, limits[precision], decode, precision) for index, precision in ((b, "fp32"), (f, "int8"))]
        c, search = query_latency(cfg, clock)
        d = cold_query(cfg, db, clock)
    measures = [a, b, c, d, e, f, *g]
    return {
        "config": config_json(cfg),
        "machine": {**machine(), "int8_fast": int8_fast_here()},
        "measures": [{**asdict(m), "ratio": m.ratio} for m in measures],
        "search": search,
        "limit": {"decode": decode, **limits},
    }


def render(result: dict) -> tuple:
    from rich.table import Table

    table = Table("measure", "value", "baseline", "ratio", "target", "met", title="simsearch speed",
                  caption="\n".join(f"{m['name'][:3]} {m['detail']}" for m in result["measures"]), caption_justify="left")
    for m in result["measures"]:
        table.add_row(m["name"], f"{m['value']:.2f} {m['unit']}", f"{m['baseline']:.2f} {m['unit']} ({m['baseline_name']})",
                      f"{m['ratio']:.2f}x", m["target"], "yes" if m["met"] else "[red]no[/red]")
    return (table,)
