"""Encoder throughput per device: ONNX Runtime on CUDA against the same machine's CPU, in one run.

    python -m simsearch.benchmarks encoder-device [--encoder efficientnet-lite0] [--batch-sizes 1,32,128,256]
        [--images DIR] [--out results/encoder_device.json]

For the fp32 encoder and its int8 variant, at each batch size: img/s of `OnnxEncoder` with `--device cuda`
(what `index --device cuda` embeds with; the device it really ran on is read back from the session) and with
`--device cpu` on every core, on the same batch of real photos (the first photos of --images, repeated up to
the batch size: an encoder's cost does not depend on the pixels). The CPU figure is the baseline of the
ratio. Parity: the cosine between the CUDA and CPU vector of each photo (min and mean), since a db built on
one device is queried on the other.

On a machine without a GPU every "cuda" row says it ran on the CPU (with the fallback warning): no CUDA
figure is ever reported for a run that did not get one.
"""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simsearch.benchmarks.common import (Clock, config_json, default_images, machine, option, photos, precisions,
                                         real_batch, throughput)
from simsearch.encoders.registry import DEFAULT_BASE
from simsearch.errors import DatasetError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceConfig:
    images: Path = option(help="folder of JPEGs (default: the shared imagenet-samples).", factory=default_images)
    photos: int = option(64, "distinct real photos; larger batches repeat them.")
    encoder: str = option(DEFAULT_BASE, "fp32 or int8 name of one encoder: both precisions are measured.")
    batch_sizes: tuple[int, ...] = option((1, 32, 128, 256), "batch sizes measured.")
    min_seconds: float = option(3.0, "each throughput is timed for at least this long (after one warm-up batch).")
    models_dir: Path | None = option(None, "encoder cache folder (default: simsearch's).")


def _batch(cfg: DeviceConfig, spec, size: int) -> np.ndarray:
    base = real_batch(photos(cfg.images, cfg.photos), spec)
    return np.resize(base, (size, *base.shape[1:]))  # (size, 3, S, S): the photos, repeated


def measure(cfg: DeviceConfig, spec, clock: Clock = time.perf_counter) -> list[dict]:
    """One row per batch size: CUDA and CPU img/s of `spec`, and the CUDA/CPU vectors' cosine."""
    from simsearch.devices import Device
    from simsearch.encoders.runtime import OnnxEncoder, cpu_count

    encoders = {d: OnnxEncoder(spec, d, cfg.models_dir) for d in (Device.cuda, Device.cpu)}
    photos = _batch(cfg, spec, cfg.photos)
    cos = np.sum(encoders[Device.cuda].embed(photos) * encoders[Device.cpu].embed(photos), axis=1)
    rows = []
    for size in cfg.batch_sizes:
        batch = _batch(cfg, spec, size)
        ips = {d.value: throughput(lambda e=e: e.embed(batch), size, cfg.min_seconds, clock)
               for d, e in encoders.items()}
        rows.append({"encoder": spec.name, "batch": size, "cuda_ran_on": encoders[Device.cuda].device,
                     "cuda_img_s": ips["cuda"], "cpu_img_s": ips["cpu"], "cpu_threads": cpu_count(),
                     "ratio": ips["cuda"] / ips["cpu"],
                     "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())})
        log.info("%s batch %d: cuda(%s) %.0f img/s, cpu %.0f img/s", spec.name, size,
                 rows[-1]["cuda_ran_on"], ips["cuda"], ips["cpu"])
    return rows


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def run(cfg: DeviceConfig, clock: Clock = time.perf_counter) -> dict:
    import onnxruntime as ort

    fp32, int8 = precisions(cfg.encoder, cfg.models_dir)
    n = len(photos(cfg.images, cfg.photos))
    if n < cfg.photos:
        raise DatasetError(f"{cfg.images} holds {n} JPEGs, {cfg.photos} needed (--photos)")
    return {"machine": {**machine(), "gpu": gpu_name(), "onnxruntime": ort.__version__,
                        "providers": ort.get_available_providers()},
            "config": config_json(cfg),
            "rows": measure(cfg, fp32, clock) + measure(cfg, int8, clock)}


def render(result: dict) -> tuple:
    from rich.table import Table

    m = result["machine"]
    table = Table("encoder", "batch", "CUDA img/s", "CPU img/s", "CUDA / CPU", "cosine min / mean",
                  title=f"ONNX Runtime {m['onnxruntime']}: {m['gpu']} vs CPU")
    for r in result["rows"]:
        cuda = f"{r['cuda_img_s']:.0f}" + ("" if r["cuda_ran_on"] == "cuda" else " [red](ran on CPU)[/red]")
        table.add_row(r["encoder"], str(r["batch"]), cuda, f"{r['cpu_img_s']:.0f} ({r['cpu_threads']} thr)",
                      f"{r['ratio']:.1f}x", f"{r['cosine_min']:.4f} / {r['cosine_mean']:.4f}")
    return (table,)
