"""CLIP encoders' speed on this machine, beside the default encoder in the same run: image tower fp32 and int8, the
text tower, and what a query by words costs.

    python -m simsearch.benchmarks clip CLIPNAME [--baseline efficientnet-lite0] [--out results/clip.json]

For the CLIP encoder and the baseline, each in fp32 and int8: img/s at --batch on real photos (decoded and
preprocessed once: the towers alone), on every core, and each int8 vector's cosine to its fp32 vector (min, mean).
For the text tower: texts/s at batch 64 over Tiny ImageNet-like prompts, and the latency of one text query's
embedding (tokenise + text tower, p50 and p95 of --queries single texts). Speed does not depend on the weights, so
a CLIP model exported with --random-weights measures what its trained twin would; its cosines and rankings do not.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simsearch.benchmarks.common import (Clock, config_json, default_images, machine, option, photos, precisions,
                                         real_batch, throughput, timed)
from simsearch.encoders.registry import DEFAULT_BASE
from simsearch.errors import DatasetError, ModelError

log = logging.getLogger(__name__)

# What a user types: short captions and prompts of a few words.
PROMPTS = ("a photo of a {}.", "a red {} at night", "{} on the beach at sunset", "two {}s")
NOUNS = ("dog", "car", "goldfish", "mountain", "bicycle", "teapot", "lighthouse", "pizza", "violin", "umbrella",
         "castle", "butterfly", "tractor", "snowman", "parrot", "volcano")


@dataclass(frozen=True)
class ClipConfig:
    encoder: str = option(help="a CLIP encoder (fp32 or int8 name: both precisions are measured).")
    baseline: str = option(DEFAULT_BASE, "the image encoder measured beside it, in the same run.")
    images: Path = option(help="folder of JPEGs (default: the shared imagenet-samples).", factory=default_images)
    photos: int = option(64, "distinct real photos (the batch repeats them).")
    batch: int = option(32, "images per encoder call.")
    queries: int = option(200, "single text queries timed for the latency.")
    min_seconds: float = option(5.0, "each throughput is timed for at least this long (after one warm-up call).")
    models_dir: Path | None = option(None, "encoder cache folder (default: simsearch's).")


def texts() -> list[str]:
    return [p.format(n) for p in PROMPTS for n in NOUNS]  # 64 texts


def image_rows(cfg: ClipConfig, name: str, clock: Clock) -> list[dict]:
    """fp32 and int8 img/s of one encoder family, and the int8 vectors' cosine to fp32."""
    from simsearch.encoders.runtime import OnnxEncoder, cpu_count

    fp32, int8 = precisions(name, cfg.models_dir)
    base = real_batch(photos(cfg.images, cfg.photos), fp32)  # (P, 3, S, S)
    batch = np.resize(base, (cfg.batch, *base.shape[1:]))
    encoders = {spec.name: OnnxEncoder(spec, models_dir=cfg.models_dir) for spec in (fp32, int8)}
    vectors = {n: e.embed(base) for n, e in encoders.items()}
    cos = np.sum(vectors[fp32.name] * vectors[int8.name], axis=1)
    rows = []
    for spec in (fp32, int8):
        ips = throughput(lambda e=encoders[spec.name]: e.embed(batch), cfg.batch, cfg.min_seconds, clock)
        rows.append({"encoder": spec.name, "precision": spec.precision.value, "image_size": spec.image_size,
                     "dim": spec.dim, "img_s": ips, "threads": cpu_count(),
                     **({"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}
                        if spec is int8 else {})})
        log.info("%s: %.0f img/s", spec.name, ips)
    return rows


def text_row(cfg: ClipConfig, clock: Clock) -> dict:
    from simsearch.encoders.text import TextEncoder

    fp32, _ = precisions(cfg.encoder, cfg.models_dir)
    encoder = TextEncoder(fp32)
    prompts = texts()
    tps = throughput(lambda: encoder.embed(prompts), len(prompts), cfg.min_seconds, clock)
    encoder.embed(prompts[:1])  # warm
    single = np.array([timed(lambda t=t: encoder.embed([t]), clock)[1] for t in
                       (prompts * (cfg.queries // len(prompts) + 1))[:cfg.queries]])
    tokenize = np.array([timed(lambda t=t: encoder.tokenizer([t]), clock)[1] for t in prompts])
    return {"encoder": fp32.name, "texts_s": tps, "query_ms_p50": 1000 * float(np.median(single)),
            "query_ms_p95": 1000 * float(np.percentile(single, 95)),
            "tokenize_ms_p50": 1000 * float(np.median(tokenize))}


def run(cfg: ClipConfig, clock: Clock = time.perf_counter) -> dict:
    fp32, _ = precisions(cfg.encoder, cfg.models_dir)
    if not fp32.has_text:
        raise ModelError(f"{cfg.encoder} is not a CLIP encoder: `simsearch encoders add` one (docs/clip.md)")
    n = len(photos(cfg.images, cfg.photos))
    if n < cfg.photos:
        raise DatasetError(f"{cfg.images} holds {n} JPEGs, {cfg.photos} needed (--photos)")
    images = image_rows(cfg, cfg.baseline, clock) + image_rows(cfg, cfg.encoder, clock)
    baseline = images[0]["img_s"]
    for row in images:
        row["vs_baseline"] = row["img_s"] / baseline
    return {"machine": machine(), "config": config_json(cfg), "images": images, "text": text_row(cfg, clock)}


def render(result: dict) -> tuple:
    from rich.table import Table

    m = result["machine"]
    where = f"{m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cores']} cores"
    images = Table("encoder", "input", "dim", "img/s", f"vs {result['images'][0]['encoder']}", "int8 cosine min / mean",
                   title=f"Image towers, batch {result['config']['batch']}, ONNX Runtime on {where}")
    for r in result["images"]:
        cos = f"{r['cosine_min']:.4f} / {r['cosine_mean']:.4f}" if "cosine_min" in r else ""
        images.add_row(r["encoder"], f"{r['image_size']} px", str(r["dim"]), f"{r['img_s']:.0f}",
                       f"{r['vs_baseline']:.2f}x", cos)
    t = result["text"]
    text = Table("encoder", "texts/s (batch 64)", "one text query p50 / p95", "tokenise p50",
                 title="Text tower (fp32; the int8 variant shares it)")
    text.add_row(t["encoder"], f"{t['texts_s']:.0f}", f"{t['query_ms_p50']:.2f} / {t['query_ms_p95']:.2f} ms",
                 f"{t['tokenize_ms_p50']:.3f} ms")
    return images, text
