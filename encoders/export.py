"""Export an encoder to ONNX once, and cache the file keyed by the weights' sha256.

Imports torch lazily: only the first use of an encoder on a machine pays for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

from simsearch import paths
from simsearch.encoders.spec import EncoderSpec
from simsearch.errors import ModelError

log = logging.getLogger(__name__)

OPSET = 18


def onnx_path(spec: EncoderSpec, models_dir: Path) -> Path:
    return Path(models_dir) / f"{spec.name}-{spec.weights_sha256[:16]}.onnx"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def ensure_onnx(spec: EncoderSpec, models_dir: Path | None = None) -> Path:
    """The cached ONNX file of `spec`, exporting it first if needed."""
    if spec.trained:  # its model was exported when it was trained
        if not Path(spec.onnx_file).is_file():
            raise ModelError(f"the ONNX model of {spec.name!r} is missing: {spec.onnx_file}")
        return Path(spec.onnx_file)
    models_dir = paths.models_dir(models_dir)
    if models_dir.exists() and not models_dir.is_dir():
        raise ModelError(f"{models_dir} is a file, not a models folder: pass another --models-dir")
    path = onnx_path(spec, models_dir)
    if path.is_file():
        return path
    weights = spec.weights_path()
    digest = sha256_file(weights)
    if digest != spec.weights_sha256:
        raise ModelError(f"weights of {spec.name!r} at {weights} have sha256 {digest}, expected {spec.weights_sha256}")
    log.info("exporting %s to ONNX (once per machine) -> %s", spec.name, path)
    model = build_embedding_model(spec)
    export_module(model, (1, 3, spec.image_size, spec.image_size), path)
    return path


@contextlib.contextmanager
def _quiet_torch_logs():
    """The exporter logs its progress and torchvision's absence at WARNING; none of it is ours."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_embedding_model(spec: EncoderSpec):
    """A fresh eval-mode torch module: (B, 3, S, S) normalised image -> (B, dim) L2-normalised embedding."""
    import torch
    import torch.nn.functional as F

    from simsearch.encoders.efficientnet_lite import load_efficientnet_lite

    if not spec.arch.startswith("efficientnet-lite"):
        raise ModelError(f"no torch builder for architecture {spec.arch!r}")
    trunk = load_efficientnet_lite(spec.arch, str(spec.weights_path()))

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = trunk

        def forward(self, x):
            return F.normalize(self.trunk.pooled(x), dim=1)  # (B, 3, S, S) -> (B, 1280)

    # A new nn.Module starts in training mode; exporting it so would bake batch statistics into
    # every BatchNorm (an export that matches torch on noise and retrieves at chance level).
    return Embed().eval()


def export_module(model, input_shape: tuple[int, ...], path: Path, n_inputs: int = 1) -> None:
    """Export an eval-mode module with a dynamic batch axis, written atomically to `path`.

    n_inputs > 1: the module takes that many tensors of the same shape (named a, b, ...), sharing the batch axis.
    """
    import torch

    if model.training:
        raise ModelError("refusing to export a module in training mode (BatchNorm would use batch statistics)")
    path.parent.mkdir(parents=True, exist_ok=True)
    examples = tuple(torch.zeros(input_shape) for _ in range(n_inputs))
    names = ["input"] if n_inputs == 1 else [chr(ord("a") + i) for i in range(n_inputs)]
    batch = torch.export.Dim("batch")
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings(), _quiet_torch_logs():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message="# The axis name")  # inputs sharing the batch axis: intended
            # torch.export-based exporter; only the batch axis is dynamic. H and W stay static on
            # purpose: SAME padding is computed from them, and an encoder's input size is fixed.
            torch.onnx.export(
                model,
                examples,
                tmp,
                input_names=names,
                output_names=["output"],
                dynamic_shapes=tuple({0: batch} for _ in examples),
                opset_version=OPSET,
                dynamo=True,
                external_data=False,  # one self-contained file, so the atomic rename moves all of it
                verbose=False,
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
