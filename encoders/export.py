"""Export an encoder to ONNX once, and cache the file keyed by the weights' sha256; quantise an int8
variant once, cached by the fp32 weights, the quantisation settings and the policy.

A built-in's int8 variant is quantised with the calibration shipped in the package (calibrations/, made once
from photos by encoders/calibrate.py): every machine builds the same file, with no photos. A trained encoder's
is calibrated on its own training photos, which its card lists.

Imports torch lazily: only the first use of an encoder on a machine pays for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import warnings
from pathlib import Path

import numpy as np

from simsearch import paths
from simsearch.atomic import atomic_path
from simsearch.encoders.quantize import (DYNAMIC_TAG, Calibration, QuantSettings, quantize_dynamic_onnx, quantize_onnx,
                                         strip_debug_info)
from simsearch.encoders.spec import EncoderSpec, Precision
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
    """The cached ONNX file of `spec`, exporting (or quantising) it first if needed."""
    if spec.precision is Precision.int8:
        return ensure_int8(spec, models_dir)
    if spec.onnx_file:  # a trained or CLIP encoder: its model was written when it was trained or added
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


def photos_in(folder: Path) -> list[Path]:
    """The image files under folder (any depth), by the extensions Pillow opens."""
    from PIL import Image

    extensions = {e for e, f in Image.registered_extensions().items() if f in Image.OPEN}
    return [p for p in Path(folder).rglob("*") if p.suffix.lower() in extensions] if Path(folder).is_dir() else []


def training_photos(spec: EncoderSpec) -> list[Path]:
    """The photos a trained encoder's int8 variant is calibrated on: the seeded sample of its training images
    that its card lists (there is nothing else it could fairly be calibrated on)."""
    from simsearch.encoders.cards import Card

    listed = [Path(p) for p in Card.load(Path(spec.card), "encoder").details.calibration]
    missing = [p for p in listed if not p.is_file()]
    if not listed or missing:
        raise ModelError(f"the int8 variant of {spec.fp32().name} is calibrated on the {len(listed)} training photos its "
                         f"card lists, and {len(missing)} are missing (first: {missing[0] if missing else '-'}): "
                         f"put them back, or use {spec.fp32().name} (fp32)")
    return listed


def calibration_batches(spec: EncoderSpec, images: list[Path], batch: int = 16):
    """(B, 3, S, S) inputs of the calibration photos, made exactly as the encoder's inputs are."""
    from PIL import Image, ImageOps

    from simsearch.encoders.preprocess import decode_side, to_input

    for b0 in range(0, len(images), batch):
        arrays = []
        for p in images[b0:b0 + batch]:
            try:
                with Image.open(p) as im:
                    im.draft("RGB", (decode_side(spec),) * 2)
                    arrays.append(to_input(ImageOps.exif_transpose(im).convert("RGB"), spec))
            except (OSError, ValueError) as e:
                raise ModelError(f"{p}: cannot read this calibration photo ({e})") from None
        yield np.stack(arrays)


def _int8_stem(spec: EncoderSpec) -> str:
    """An int8 variant's name for its files: what its vectors' key names (the fp32 weights, the quantisation
    settings, the policy)."""
    return f"{spec.name}-{spec.weights_sha256[:16]}.{spec.quant_tag}.{spec.preprocess.value}"


def int8_path(spec: EncoderSpec, models_dir: Path | None = None) -> Path:
    """Where the int8 model of `spec` is cached."""
    return paths.models_dir(models_dir) / "int8" / f"{_int8_stem(spec)}.onnx"


CALIBRATIONS = Path(__file__).resolve().parent / "calibrations"  # package data: the built-ins' int8 calibrations


def calibration_file(spec: EncoderSpec) -> Path:
    """Where the package ships the Calibration of a built-in int8 variant."""
    return CALIBRATIONS / f"{_int8_stem(spec)}.json"


def shipped_calibration(spec: EncoderSpec) -> Calibration:
    """The Calibration the package ships for a built-in int8 variant (ModelError if it ships none)."""
    file = calibration_file(spec)
    try:
        return Calibration.from_json(json.loads(file.read_text()))
    except FileNotFoundError:
        raise ModelError(f"no int8 calibration of {spec.name} under the {spec.preprocess.value!r} policy ships with this "
                         f"simsearch ({file.name}): use {spec.fp32().name} (fp32)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{file}: unreadable int8 calibration ({e}): reinstall simsearch") from None


def is_cached(spec: EncoderSpec, models_dir: Path | None = None) -> bool:
    """Whether the ONNX model of spec is already here (else it is exported or quantised on first use)."""
    if spec.precision is Precision.int8:
        return int8_path(spec, models_dir).is_file()
    return bool(spec.onnx_file) or onnx_path(spec, paths.models_dir(models_dir)).is_file()


def ensure_int8(spec: EncoderSpec, models_dir: Path | None = None) -> Path:
    """The cached int8 model of `spec` (an int8 variant), quantised from its fp32 model on first use."""
    path = int8_path(spec, models_dir)
    if spec.clip:  # its image tower, dynamically quantised: no photos, no calibration
        if spec.quant_tag != DYNAMIC_TAG:
            raise ModelError(f"{spec.name}: quantisation settings {spec.quant_tag!r} are not this simsearch's ({DYNAMIC_TAG!r})")
        if not path.is_file():
            log.info("quantising %s's image tower to int8 (once per machine) -> %s", spec.fp32().name, path)
            quantize_dynamic_onnx(ensure_onnx(spec.fp32(), models_dir), path)
        return path
    settings = QuantSettings()
    if spec.quant_tag != settings.tag():
        raise ModelError(f"{spec.name}: quantisation settings {spec.quant_tag!r} are not this simsearch's "
                         f"({settings.tag()!r})")
    if path.is_file():
        return path
    if spec.trained:
        images = training_photos(spec)  # read only now: a query never needs them
        calibration = calibration_batches(spec, images)
        log.info("quantising %s to int8 (once per machine) on %d of its training photos -> %s",
                 spec.name, len(images), path)
    else:
        calibration = shipped_calibration(spec)
        log.info("quantising %s to int8 (once per machine) -> %s", spec.name, path)
    quantize_onnx(ensure_onnx(spec.fp32(), models_dir), path, calibration, settings)
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


def export_module(model, input_shape: tuple[int, ...], path: Path, n_inputs: int = 1, dtype=None) -> None:
    """Export an eval-mode module with a dynamic batch axis, written atomically to `path`.

    n_inputs > 1: the module takes that many tensors of the same shape (named a, b, ...), sharing the batch axis.
    dtype: the inputs' torch dtype (default float32; a text tower takes int64 token ids).
    """
    import onnx
    import torch

    if model.training:
        raise ModelError("refusing to export a module in training mode (BatchNorm would use batch statistics)")
    examples = tuple(torch.zeros(input_shape, dtype=dtype) for _ in range(n_inputs))
    names = ["input"] if n_inputs == 1 else [chr(ord("a") + i) for i in range(n_inputs)]
    batch = torch.export.Dim("batch")
    with atomic_path(path, mode=0o644) as tmp:
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
        exported = onnx.load(str(tmp))
        strip_debug_info(exported)  # the same file wherever simsearch is installed
        onnx.save(exported, str(tmp))


def append_graph(first: Path, second: Path, out: Path) -> None:
    """One ONNX model that runs `first` then feeds its output to `second` (e.g. a CLIP image tower, then a trained
    head: (B, 3, S, S) -> (B, in) -> (B, out)), written atomically to `out`. `second` is converted to `first`'s
    opset and IR version where they differ, as merging requires."""
    import onnx
    from onnx import compose, version_converter

    a, b = onnx.load(str(first)), onnx.load(str(second))
    opset = next(o.version for o in a.opset_import if o.domain in ("", "ai.onnx"))
    if next(o.version for o in b.opset_import if o.domain in ("", "ai.onnx")) != opset:
        b = version_converter.convert_version(b, opset)
    b.ir_version = a.ir_version
    b = compose.add_prefix(b, "head/")  # no name of the second graph may collide with the first's
    merged = compose.merge_models(a, b, io_map=[(a.graph.output[0].name, b.graph.input[0].name)])
    with atomic_path(out, mode=0o644) as tmp:
        onnx.save(merged, str(tmp))
