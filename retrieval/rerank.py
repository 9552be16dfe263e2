"""Rerankers: learned pair classifiers that reorder the top candidates of a vector search. No torch here.

A reranker is a folder <models_dir>/rerankers/<name>/ with
    tower.onnx    one image's input -> its representation (run once per image): MatchNet's (B, 256)
                  bottleneck, or the BEiT pair classifier's (B, C, h, w) token grid
    metric.onnx   two representations -> (B,) P(same)   (run once per pair)
    card.json     what it was trained from and how well it did
Its input is either an encoder's stored embedding ("encoder": the db already holds it for every
item, so reranking a candidate costs one small matrix product and the metric network), or the image
itself at the tower's size ("pixels": MatchNet trained from scratch at 64x64, and the BEiT pair
classifier; every candidate image is read and decoded again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simsearch.devices import Device
from simsearch.encoders.cards import CARD, METRIC, TOWER, Card
from simsearch.errors import ModelError, UnknownNameError
from simsearch.paths import rerankers_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RerankerSpec:
    """A registered reranker: its folder, and its card (encoders/cards.py), which says what its tower reads."""

    name: str
    folder: Path
    card: Card

    @property
    def input(self) -> str:
        """"encoder" (an encoder's stored embedding) | "pixels" (the image at image_size)."""
        return self.card.details.input

    @property
    def encoder(self) -> str:
        """Input "encoder": whose embeddings it reads."""
        return self.card.base if self.input == "encoder" else ""

    @property
    def image_size(self) -> int:
        """Input "pixels": side of the square RGB input, pixels scaled to [0, 1]."""
        return self.card.details.image_size

    @property
    def fusion_weight(self) -> float:
        """Weight of the vector score against the reranker's in the final order (`fuse`); 0 on older cards."""
        return self.card.details.fusion_weight

    def held_out_gain(self) -> tuple[float, float] | None:
        """(held-out hit@1 of the vector search alone, after reranking) from its card; None when it was not
        validated for reranking (trained on pairs, or by an older simsearch)."""
        best = self.card.validation["best"]
        return (best["hit1_before"], best["hit1"]) if "hit1_before" in best else None


def list_rerankers(models_dir: Path | None = None) -> list[RerankerSpec]:
    """Every reranker in models_dir; one whose card cannot be read (or is from a newer simsearch) is logged and left out."""
    root = rerankers_dir(models_dir)
    specs = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith(".") or not (folder / CARD).is_file():
            continue
        try:
            specs.append(RerankerSpec(folder.name, folder, Card.load(folder / CARD, "reranker")))
        except ModelError as e:
            log.warning("ignoring reranker %s: %s", folder, e)
    return specs


def get_reranker(name: str, models_dir: Path | None = None) -> RerankerSpec:
    """A reranker by name; one whose card cannot be used raises that card's ModelError rather than "unknown"."""
    folder = rerankers_dir(models_dir) / name
    if folder.name == name and not name.startswith(".") and (folder / CARD).is_file():  # a folder of the registry
        return RerankerSpec(name, folder, Card.load(folder / CARD, "reranker"))
    specs = list_rerankers(models_dir)
    raise UnknownNameError(f"unknown reranker {name!r}; trained rerankers: {', '.join(s.name for s in specs) or 'none'} "
                           f"(train one with `simsearch train matchnet` or `simsearch train beit`)")


def pixels(paths: list[str | Path], size: int) -> np.ndarray:
    """(N, 3, size, size) float32 in [0, 1]: the whole image squashed to size x size, as Tiny ImageNet is."""
    from PIL import Image

    from simsearch.indexer.images import load_rgb

    return np.stack([np.asarray(load_rgb(p, size).resize((size, size), Image.BICUBIC), dtype=np.float32)
                     .transpose(2, 0, 1) / 255.0 for p in paths])


class Reranker:
    """P(same) for pairs, through ONNX Runtime: the tower once per image, the metric network per pair.

    `represent_images` and `rerank` are the one way a query's candidates are reordered: `simsearch query
    --rerank` (`Searcher.rerank`) and `simsearch bench --reranker` (the harness) both go through them.
    """

    def __init__(self, spec: RerankerSpec, device: Device = Device.auto, threads: int | None = None):
        from simsearch.encoders.runtime import ort_session

        self.spec = spec
        try:
            self.tower, self.device = ort_session(spec.folder / TOWER, device, threads)
            self.metric, _ = ort_session(spec.folder / METRIC, device, threads)
        except Exception as e:  # onnxruntime raises its own types for missing/corrupt files
            raise ModelError(f"reranker {spec.name!r}: cannot load its ONNX models from {spec.folder} ({e})") from None
        gain = spec.held_out_gain()
        if gain is None:
            log.warning("reranker %s was not validated for reranking (held-out hit@k before/after unknown): it may "
                        "make results worse", spec.name)
        elif gain[1] <= gain[0]:
            log.warning("reranker %s did not improve held-out hit@1 (%.1f%% -> %.1f%%): it may make results worse",
                        spec.name, 100 * gain[0], 100 * gain[1])

    def represent(self, inputs: np.ndarray, block: int = 256) -> np.ndarray:
        """(N, ...) tower inputs (embeddings or pixels) -> (N, ...) representations, the tower's outputs
        (MatchNet: (N, 256) bottlenecks; BEiT pair classifier: (N, C, h, w) token grids)."""
        name = self.tower.get_inputs()[0].name
        return np.concatenate([self.tower.run(None, {name: np.ascontiguousarray(inputs[i:i + block], np.float32)})[0]
                               for i in range(0, max(len(inputs), 1), block)])[: len(inputs)]

    def represent_images(self, paths: list[str | Path], embeddings: Callable[[], np.ndarray], block: int = 512,
                         on_progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """(N, ...) representations of N images, one per image: compute them once, reuse them in every pair.

        The tower reads what `spec.input` says: "encoder", the images' embeddings by `spec.encoder`, which
        `embeddings()` returns as (N, dim) from wherever the caller keeps them (the db, the bench cache);
        "pixels", the images themselves, decoded here `block` at a time so memory stays bounded
        (on_progress(done, N) after each block).
        """
        if self.spec.input == "encoder":
            return self.represent(embeddings())
        parts = []
        for i in range(0, len(paths), block):
            parts.append(self.represent(pixels(paths[i:i + block], self.spec.image_size)))  # (b, 3, S, S) -> (b, ...)
            if on_progress:
                on_progress(min(i + block, len(paths)), len(paths))
        return np.concatenate(parts)

    def rerank(self, query: np.ndarray, candidates: np.ndarray, vector_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One query's candidates reordered: query (...) and candidates (D, ...) representations, (D,) their
        vector scores -> (D,) candidate indices, best first (P(same) fused with the vector score by the card's
        weight, ties: vector score), and (D,) P(same) of each candidate (in the candidates' order)."""
        # a read-only view (D, ...) of the query: `score` copies only one bounded block of it at a time
        probs = self.score(np.broadcast_to(query, candidates.shape), candidates)
        return rerank_order(probs, vector_scores, self.spec.fusion_weight), probs

    def score(self, a: np.ndarray, b: np.ndarray, block_bytes: int = 64 << 20) -> np.ndarray:
        """(N, ...), (N, ...) representations (MatchNet: (N, 256); BEiT: (N, C, h, w) token grids) -> (N,) P(same).

        Pairs go through the metric network in blocks of about block_bytes of input.
        """
        na, nb = (i.name for i in self.metric.get_inputs())
        block = max(1, block_bytes // max(1, 2 * a[:1].nbytes))
        out = [self.metric.run(None, {na: np.ascontiguousarray(a[i:i + block], np.float32),
                                      nb: np.ascontiguousarray(b[i:i + block], np.float32)})[0]
               for i in range(0, len(a), block)]
        return np.concatenate(out).reshape(-1) if out else np.empty(0, np.float32)

    def score_block(self, rows: np.ndarray, cols: np.ndarray, block_bytes: int = 64 << 20) -> np.ndarray:
        """All (row, col) pairs of representations: (R, ...), (C, ...) -> (R, C) P(same), in column chunks
        so the repeated inputs stay near block_bytes (a BEiT token grid is 12 KiB, a MatchNet bottleneck 1 KiB)."""
        r, c = len(rows), len(cols)
        out = np.empty((r, c), np.float32)
        step = max(1, block_bytes // max(1, 2 * rows[:1].nbytes * r))
        for c0 in range(0, c, step):
            part = cols[c0:c0 + step]
            tiled = np.tile(part, (r,) + (1,) * (cols.ndim - 1))  # (r * len(part), ...): row-major pairs
            out[:, c0:c0 + len(part)] = self.score(np.repeat(rows, len(part), axis=0), tiled).reshape(r, len(part))
        return out


def logit(probs: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), clipped where float32 saturates."""
    p = np.clip(probs.astype(np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def fuse(logits: np.ndarray, vector_scores: np.ndarray, weight: float) -> np.ndarray:
    """(..., D) scores of each query's D candidates: (1 - weight) z(logits) + weight z(vector scores), each
    standardised over the query's own candidates, so the weight does not depend on either score's scale.
    weight 0: the reranker alone; 1: the vector search's order."""

    def z(v: np.ndarray) -> np.ndarray:
        v = v.astype(np.float64)
        return (v - v.mean(-1, keepdims=True)) / (v.std(-1, keepdims=True) + 1e-9)

    return (1 - weight) * z(logits) + weight * z(vector_scores)


def rerank_order(probs: np.ndarray, vector_scores: np.ndarray, fusion_weight: float = 0.0) -> np.ndarray:
    """Indices sorting candidates by their fused score (`fuse`; weight 0: P(same)) descending, ties broken by
    vector score descending."""
    return np.lexsort((-vector_scores, -fuse(logit(probs), vector_scores, fusion_weight)))
