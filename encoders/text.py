"""Words -> vectors in a CLIP encoder's image space, through ONNX Runtime (no torch): the text half of a query."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from simsearch.devices import Device
from simsearch.encoders.runtime import ort_session, run_batched, text_feed
from simsearch.encoders.spec import EncoderSpec
from simsearch.errors import ModelError

log = logging.getLogger(__name__)

TEXT_BATCH = 64  # texts per run: a zero-shot bench embeds a prompt per class (200 for Tiny ImageNet)


class TextEncoder:
    """list of N texts -> (N, dim) float32 L2-normalised, comparable by cosine with the encoder's image vectors.

    An int8 variant shares its fp32 encoder's text tower (only the image tower is quantised)."""

    def __init__(self, spec: EncoderSpec, device: Device = Device.auto, threads: int | None = None):
        from simsearch.encoders.clip import load_tokenizer

        if not spec.has_text:
            raise ModelError(f"encoder {spec.name!r} has no text tower, so it cannot search by words: add a CLIP "
                             "encoder (`simsearch encoders add NAME --open-clip MODEL ...`, docs/clip.md) and index with it")
        self.spec = spec
        self.tokenizer = load_tokenizer(spec)
        self.session, self.device = ort_session(Path(spec.text_onnx), device, threads)

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.spec.dim), np.float32)
        out = []
        for start in range(0, len(texts), TEXT_BATCH):
            ids = self.tokenizer(texts[start:start + TEXT_BATCH])  # (B, context)
            vectors = run_batched(self.session, text_feed(self.session, ids, self.tokenizer.config.pad_id))  # (B, dim)
            out.append(vectors)
        return np.concatenate(out).astype(np.float32, copy=False)

