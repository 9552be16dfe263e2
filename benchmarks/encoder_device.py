"""Encoder throughput per device: ONNX Runtime on CUDA against the same machine's CPU, in one run.

    python -m simsearch.benchmarks.encoder_device [--encoder efficientnet-lite0] [--batch-sizes 1,32,128,256]
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
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simsearch.benchmarks.speed import SpeedConfig, _photos, _real_batch, _specs, _throughput
from simsearch.encoders.registry import DEFAULT_BASE
from simsearch.paths import shared_data

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceConfig:
    images: Path = field(default_factory=lambda: shared_data() / "imagenet-samples")
    photos: int = 64  # distinct real photos; larger batches repeat them
    encoder: str = DEFAULT_BASE
    batch_sizes: tuple[int, ...] = (1, 32, 128, 256)
    min_seconds: float = 3.0
    models_dir: Path | None = None


def _batch(cfg: DeviceConfig, spec, size: int) -> np.ndarray:
    base = _real_batch(SpeedConfig(images=cfg.images, batch_size=cfg.photos, models_dir=cfg.models_dir), spec)
    return np.resize(base, (size, *base.shape[1:]))  # (size, 3, S, S): the photos, repeated


def measure(cfg: DeviceConfig, spec) -> list[dict]:
    """One row per batch size: CUDA and CPU img/s of `spec`, and the CUDA/CPU vectors' cosine."""
    from simsearch.devices import Device
    from simsearch.encoders.runtime import OnnxEncoder, cpu_count

    encoders = {d: OnnxEncoder(spec, d, cfg.models_dir) for d in (Device.cuda, Device.cpu)}
    photos = _batch(cfg, spec, cfg.photos)
    cos = np.sum(encoders[Device.cuda].embed(photos) * encoders[Device.cpu].embed(photos), axis=1)
    rows = []
    for size in cfg.batch_sizes:
        batch = _batch(cfg, spec, size)
        ips = {d.value: _throughput(lambda e=e: e.embed(batch), size, cfg.min_seconds) for d, e in encoders.items()}
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


def run(cfg: DeviceConfig) -> dict:
    import onnxruntime as ort

    fp32, int8 = _specs(SpeedConfig(encoder=cfg.encoder, models_dir=cfg.models_dir))
    n = len(_photos(SpeedConfig(images=cfg.images, max_images=cfg.photos)))
    if n < cfg.photos:
        raise ValueError(f"{cfg.images} holds {n} JPEGs, {cfg.photos} needed (--photos)")
    return {"machine": {"gpu": gpu_name(), "cpu": platform.processor(), "python": platform.python_version(),
                        "onnxruntime": ort.__version__, "providers": ort.get_available_providers()},
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()},
            "rows": measure(cfg, fp32) + measure(cfg, int8)}


def render(result: dict):
    from rich.table import Table

    m = result["machine"]
    table = Table("encoder", "batch", "CUDA img/s", "CPU img/s", "CUDA / CPU", "cosine min / mean",
                  title=f"ONNX Runtime {m['onnxruntime']}: {m['gpu']} vs CPU")
    for r in result["rows"]:
        cuda = f"{r['cuda_img_s']:.0f}" + ("" if r["cuda_ran_on"] == "cuda" else " [red](ran on CPU)[/red]")
        table.add_row(r["encoder"], str(r["batch"]), cuda, f"{r['cpu_img_s']:.0f} ({r['cpu_threads']} thr)",
                      f"{r['ratio']:.1f}x", f"{r['cosine_min']:.4f} / {r['cosine_mean']:.4f}")
    return table


def main(argv: list[str] | None = None) -> None:
    import argparse

    from simsearch.benchmarks.report import script_logging, show_and_save

    d = DeviceConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", default=d.encoder, help="fp32 or int8 name: both precisions are measured")
    p.add_argument("--batch-sizes", type=lambda s: tuple(int(x) for x in s.split(",")), default=d.batch_sizes)
    p.add_argument("--images", type=Path, default=None, help="folder of JPEGs (default: the shared imagenet-samples)")
    p.add_argument("--photos", type=int, default=d.photos)
    p.add_argument("--min-seconds", type=float, default=d.min_seconds)
    p.add_argument("--models-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("results/encoder_device.json"))
    a = p.parse_args(argv)
    script_logging()
    cfg = DeviceConfig(**({"images": a.images} if a.images else {}), photos=a.photos, encoder=a.encoder,
                       batch_sizes=a.batch_sizes, min_seconds=a.min_seconds, models_dir=a.models_dir)
    result = run(cfg)
    show_and_save([render(result)], result, a.out, 110)


if __name__ == "__main__":
    main()
