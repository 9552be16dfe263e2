"""Embedding through ONNX Runtime: the only way vectors are made, for built-in and trained encoders alike."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from simsearch.devices import CUDA_EP, Device, ort_device_used, ort_providers
from simsearch.encoders.export import ensure_onnx
from simsearch.encoders.spec import EncoderSpec
from simsearch.errors import ModelError

log = logging.getLogger(__name__)


def cpu_count() -> int:
    """Cores this process may use (respects affinity masks and container CPU sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ort_session(path: Path, device: Device = Device.auto, threads: int | None = None):
    """An ONNX Runtime session for a model file on `device`, and the device it really runs on ("cuda" | "cpu")."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or cpu_count()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # ORT's own warnings are not the user's business
    # Idle ORT threads otherwise busy-wait between runs and starve the indexer's decode threads;
    # no measurable cost to encoder throughput on a 2-core AMD EPYC with AVX2, no VNNI (the speed benchmark).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ort_providers(device, ort.get_available_providers())
    if providers[0] == CUDA_EP and hasattr(ort, "preload_dlls"):
        # CUDA and cuDNN installed from PyPI ([gpu] extra) are not on the loader's path: without this the CUDA
        # provider fails to load libcudnn and the session silently runs on the CPU (onnxruntime >= 1.21).
        ort.preload_dlls()
    session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    return session, ort_device_used(device, session.get_providers())


class OnnxEncoder:
    """(B, 3, S, S) float32 -> (B, dim) float32 L2-normalised, on the device chosen by `device`."""

    def __init__(self, spec: EncoderSpec, device: Device = Device.auto, models_dir: Path | None = None,
                 threads: int | None = None):
        self.spec = spec
        path = ensure_onnx(spec, models_dir)
        self.session, self.device = ort_session(path, device, threads)
        self._input = self.session.get_inputs()[0].name
        log.debug("encoder %s on %s (%s)", spec.name, self.device, path.name)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim != 4 or batch.shape[1:] != (3, self.spec.image_size, self.spec.image_size):
            raise ValueError(f"expected (B, 3, {self.spec.image_size}, {self.spec.image_size}), got {batch.shape}")
        return run_batched(self.session, {self._input: np.ascontiguousarray(batch, dtype=np.float32)})


def run_batched(session, feed: dict[str, np.ndarray]) -> np.ndarray:
    """The session's first output for a batch of inputs (B, ...). A model exported with a fixed batch of 1 (Immich's
    CLIP towers are) is run one row at a time; any other runs the batch at once."""
    batch = session.get_inputs()[0].shape[0]
    if batch != 1 or len(next(iter(feed.values()))) == 1:
        return session.run(None, feed)[0]
    rows = len(next(iter(feed.values())))
    return np.concatenate([session.run(None, {k: v[i:i + 1] for k, v in feed.items()})[0] for i in range(rows)])


def text_feed(session, ids: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """A text tower's inputs for token ids (B, context): the ids in the integer type it takes (Immich's towers take
    int32), and, for a tower that asks for one (Immich's multilingual M-CLIP), which positions hold tokens."""
    first, *rest = session.get_inputs()
    dtype = np.int32 if first.type == "tensor(int32)" else np.int64
    feed = {first.name: ids.astype(dtype)}
    for extra in rest:
        if extra.name != "attention_mask":
            raise ModelError(f"the text tower takes an input {extra.name!r} simsearch does not know how to give")
        feed[extra.name] = (ids != pad_id).astype(dtype)
    return feed
