"""What every benchmark shares: the machine it ran on, the timers, the real photos, and its config as JSON.

The timers take the clock as an argument (default `time.perf_counter`), so a test passes a fake one and knows
the figure it must get.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from simsearch.paths import shared_data

Clock = Callable[[], float]

# The CPU features that decide how fast the encoders and FAISS run: AVX2 / AVX-512 for fp32 kernels and FAISS's SIMD
# builds, VNNI (AVX-512 or AVX) and AMX for ONNX Runtime's int8 kernels, ARM's dot product (asimddp) for int8 on
# ARM. A figure read without them cannot be compared with another machine's.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimddp")
VERSIONED = ("onnxruntime", "faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "numpy", "hnswlib", "usearch", "pymilvus",
             "milvus-lite")


def default_images() -> Path:
    """The real photos the benchmarks read by default: the 1,000 shared ImageNet samples."""
    return shared_data() / "imagenet-samples"


def photos(folder: Path, limit: int | None = None) -> list[Path]:
    """The JPEGs of `folder` in name order (the first `limit` of them): every benchmark reads the same ones."""
    return sorted(Path(folder).glob("*.JPEG"))[:limit]


def real_batch(paths: list[Path], spec) -> np.ndarray:
    """(len(paths), 3, S, S): the photos as `spec`'s encoder receives them (decode and preprocess as `index` does)."""
    from simsearch.encoders.preprocess import decode_side, to_input
    from simsearch.indexer.images import load_rgb

    return np.stack([to_input(load_rgb(p, decode_side(spec)), spec) for p in paths])


def precisions(encoder: str, models_dir: Path | None = None):
    """(fp32, int8) specs of the encoder family `encoder` names (either of its two names works)."""
    from simsearch.encoders.registry import get_encoder
    from simsearch.encoders.spec import INT8_SUFFIX, Precision

    spec = get_encoder(encoder, models_dir)
    fp32 = spec.fp32()
    int8 = spec if spec.precision is Precision.int8 else get_encoder(fp32.name + INT8_SUFFIX, models_dir)
    return fp32, int8


def throughput(fn: Callable[[], object], items_per_call: int, min_seconds: float,
               clock: Clock = time.perf_counter) -> float:
    """Items per second of `fn`, after one warm-up call, timed for at least `min_seconds` and two calls."""
    fn()
    calls, t0 = 0, clock()
    while (elapsed := clock() - t0) < min_seconds or calls < 2:
        fn()
        calls += 1
    return calls * items_per_call / elapsed


def timed(fn: Callable[[], object], clock: Clock = time.perf_counter) -> tuple[object, float]:
    """(what `fn` returned, the seconds it took)."""
    t = clock()
    out = fn()
    return out, clock() - t


def cpu_model_and_flags(cpuinfo: str) -> tuple[str, list[str]]:
    """The CPU's model name and which of SPEED_FLAGS it has, from a /proc/cpuinfo text (x86 or ARM)."""
    from simsearch.encoders.quantize import parse_cpuinfo_flags

    model = ""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("model name", "cpu model", "hardware") and value.strip():
            model = value.strip()
            break
    have = parse_cpuinfo_flags(cpuinfo)
    return model, [f for f in SPEED_FLAGS if f in have]


def machine(cpuinfo: str | None = None) -> dict:
    """Where a figure was measured: CPU model and its speed-relevant flags, cores this process may use, RAM,
    Python, platform, the versions of the libraries measured, and FAISS's compile options (its SIMD level)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:  # not Linux: the model from platform, flags unknown
            cpuinfo = ""
    model, flags = cpu_model_and_flags(cpuinfo)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 0
    versions = {}
    for pkg in VERSIONED:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        import faiss

        faiss_compile = faiss.get_compile_options()
    except (ImportError, AttributeError):
        faiss_compile = ""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return {"cpu": model or platform.processor(), "cpu_flags": flags, "cores": cores, "ram_gib": round(ram / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "faiss_compile": faiss_compile}


def config_json(cfg) -> dict:
    """A config dataclass as the JSON document records it (paths as text)."""
    return {f.name: str(v) if isinstance(v := getattr(cfg, f.name), Path) else v for f in dataclasses.fields(cfg)}


def json_default(x):
    """What json.dumps cannot write itself: numpy numbers and arrays as numbers and lists, anything else (paths,
    outcomes) as its text."""
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def option(default=dataclasses.MISSING, help: str = "", *, factory=None):
    """A config field and the help of the command-line option `python -m simsearch.benchmarks` makes of it."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})
