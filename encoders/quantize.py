"""fp32 ONNX encoder -> int8 ONNX encoder, by ONNX Runtime static quantisation (QDQ format).

The default QuantSettings are measured (EfficientNet-Lite0 / Lite2, 64 calibration photos, 200 other held-out
imagenet-samples photos; cosine of each int8 vector to its fp32 vector; top-10 neighbour overlap within those
200; img/s at batch 32, 2 threads, int8 and fp32 timed in the same run, AMD EPYC with AVX2 and no VNNI):

    settings (per-channel int8 weights, uint8 activations, MinMax)   lite0 cos mean/min top10  lite2 cos mean/min top10
    8-bit weights everywhere (plain ORT defaults)                    0.914 / 0.691  0.669       0.966 / 0.826  0.756
    7-bit weights everywhere (reduce_range)                          0.977 / 0.908  0.824       0.985 / 0.899  0.857
    7-bit base, 8-bit depthwise, pair-safe 1x1, fp32 stem            0.994 / 0.973  0.906       0.995 / 0.967  0.905
    (the exact arithmetic of 8-bit weights everywhere, as VNNI runs it 0.994 / 0.978  0.907       0.995 / 0.978  0.908)

at 1.62x the fp32 speed on lite0 (254 vs 157 img/s) and 1.57x on lite2 (123 vs 79); 8-bit or 7-bit weights
everywhere run at the same speed (1.66x / 1.65x on lite0). 99% of photos are above cosine 0.98; not all, but even
exact 8-bit weights everywhere leave a worst photo at 0.978: what is left is the per-tensor 8-bit activations.
Entropy / Percentile calibration, 128 or 256 photos, a moving-average MinMax, or the head conv in fp32 moved
nothing by more than 0.001 (Distribution calibration breaks the model: cosine 0.29); u8 weights (u8u8) are
exact but 8x slower than fp32 on x86 (no fast kernel).

**The stem in int8 too (the default since 2026-12-07).** On a CPU with AVX-512 VNNI (2-core AMD EPYC; ORT's
per-node profile of lite0, batch 32, 2 threads) the fp32 stem was 28% of the int8 model's time: the conv 6.6 ms,
ORT's NCHWc-to-NCHW reorder of its output 5.2 ms, the transpose to the int8 kernels' NHWC 2.0 ms and the output's
quantisation 1.2 ms, of 53 ms; the stem in int8 costs 4.9 ms (48.5 ms in all). The rest: 1x1 convs 73.8 ms in fp32
-> 18.4 ms in int8 (4.0x), depthwise 45.8 -> 18.9-21.3 ms (2.2x: MLAS's int8 depthwise kernel), so the kernels
reach 2.6x fp32 at best with ORT there, and a whole run 2.28x (median of 25 alternating runs; 2.17x before). An fp32 stem also broke "the same vectors on every CPU": its output depends on the
float kernel a CPU gets (NCHWc blocks of 8 floats on AVX2, 16 on AVX-512), and quantising it turns rounding noise
into whole steps (ORT's NCHWc layout turned off moved lite0's int8 vectors by up to 7e-3). With every conv in int8
the model is integer arithmetic from the input's quantisation on (the input's range is the pixel grid itself:
[-127/128, 1], steps of 1/128), so the vectors are the same with any float kernels (tested). Its cost, the same
200 photos, before (fp32 stem) -> after:

    lite0 crop 0.994 / 0.973 / 0.919 -> 0.993 / 0.944 / 0.912      lite0 pad 0.982 / 0.918 / 0.835 -> 0.981 / 0.916 / 0.832
    lite2 crop 0.994 / 0.962 / 0.895 -> 0.990 / 0.912 / 0.862      lite2 pad 0.994 / 0.971 / 0.905 -> 0.990 / 0.954 / 0.878

and on Tiny ImageNet val (`simsearch bench --split val`, lite0): hit@1 20.8 -> 20.7 [19.5-21.7], hit@10 54.5 -> 53.8
(fp32: 21.2, 54.8), balanced same/different accuracy 77.9 (fp32 78.1). The stem at 7-bit weights instead of
pair-safe ones: lite0 pad 0.979 / 0.922 / 0.820; at plain 8-bit (not safe without VNNI): 0.982 / 0.918 / 0.828.

Why not plain 8-bit weights: on x86 without VNNI (AVX2, AVX-512 without VNNI) ORT's u8*s8 kernels multiply with
vpmaddubsw, which adds each pair of adjacent products in int16 *with saturation*: 255 * 127 * 2 overflows, so
the vectors are wrong (cosine 0.69 on lite0) and differ from those a VNNI or ARM machine computes from the same
file. A db built on one machine is queried from another, so an int8 file must give the same vectors everywhere:
its weights must be such that no pair can overflow, whatever the activations. The rules, per conv:

* depthwise: 8-bit weights. Their kernel accumulates in int32 (checked: fused kernels == exact QDQ arithmetic).
* full convs, 1x1 (the bulk of the compute) and k x k (the stem): per output channel, the finest scale at which
  no two adjacent elements of the reduction axis, in each order ORT's kernels lay it out (reduction_layouts),
  hold same-signed int8 weights summing past 128 in magnitude (pair_safe_scales): 255 * 128 fits int16. Most
  channels keep ~7.8 bits instead of reduce_range's 7.
* anything else (Gemm/MatMul of trained encoders): 7-bit weights (ORT reduce_range).

The int8 kernels are fast (and saturation-free anyway) where int8_fast_here(): there the same file simply runs
faster still.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import platform
import random
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from simsearch.atomic import atomic_path
from simsearch.errors import ModelError

log = logging.getLogger(__name__)

# ORT's "distribution" calibration is left out: it wrecks these models (cosine 0.29 to fp32)
METHODS = ("minmax", "entropy", "percentile")

T = TypeVar("T")


@dataclass(frozen=True)
class QuantSettings:
    """Every choice that changes the int8 file. The defaults are the measured choice (module docstring)."""

    calibration_images: int = 64  # photos the activation ranges are calibrated on
    seed: int = 0  # which photos: pick_calibration(paths, settings)
    method: str = "minmax"  # activation range calibration: minmax | entropy | percentile
    percentile: float = 99.999  # method="percentile" only
    moving_average: bool = False  # method="minmax" only: moving average of per-batch ranges (ORT CalibMovingAverage)
    per_channel: bool = True  # one weight scale per output channel
    reduce_range: bool = True  # 7-bit weights: no int16 saturation in AVX2's u8*s8 kernels (see module docstring)
    depthwise_full_range: bool = True  # with reduce_range: 8-bit weights on depthwise convs (int32 kernels)
    pair_scales: bool = True  # with reduce_range + per_channel: full convs (1x1 and k x k) get pair-safe scales
    fp32_first_convs: int = 0  # leave the first N convs (graph order) in fp32
    fp32_last_convs: int = 0  # leave the last N convs (graph order) in fp32

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; one of {', '.join(METHODS)}")
        if self.calibration_images < 1:
            raise ValueError("calibration_images must be at least 1")
        if self.fp32_first_convs < 0 or self.fp32_last_convs < 0:
            raise ValueError("fp32_first_convs and fp32_last_convs cannot be negative")

    def tag(self) -> str:
        """A short stable hash of the settings, for cache file names and vector keys."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:8]


def pick_calibration(paths: Sequence[T], settings: QuantSettings = QuantSettings()) -> list[T]:
    """The calibration photos: settings.calibration_images of `paths` (sorted first), chosen by settings.seed."""
    ordered = sorted(paths)
    n = min(settings.calibration_images, len(ordered))
    return random.Random(settings.seed).sample(ordered, n)


PAIR_LIMIT = 128  # |q0| + |q1| for two same-signed adjacent int8 weights: 255 * 128 = 32640 fits int16


def reduction_layouts(w: np.ndarray) -> list[np.ndarray]:
    """The (O, K) orders a conv's (O, I, P) weights (P = kh * kw kernel positions) take along the reduction axis of
    ORT's int8 kernels: im2col of NCHW (I, P), of NHWC (P, I), and MLAS's symmetric NHWC kernels, which reduce
    each kernel position's I channels in blocks (I padded to even). For a 1x1 conv all three are the channels."""
    o, i, p = w.shape
    nhwc = w.transpose(0, 2, 1)  # (O, P, I)
    blocks = np.pad(nhwc, ((0, 0), (0, 0), (0, i % 2)))  # (O, P, I rounded up to even)
    return [w.reshape(o, -1), nhwc.reshape(o, -1), blocks.reshape(o, -1)]


def _pair_sums(w: np.ndarray) -> np.ndarray:
    """(O, K) -> (O, K // 2): |w[2j]| + |w[2j+1]| where the two have the same sign, else 0."""
    k = w.shape[1] // 2 * 2
    a, b = w[:, 0:k:2], w[:, 1:k:2]
    return np.where(np.sign(a) == np.sign(b), np.abs(a) + np.abs(b), 0)


def pair_safe_scales(w: np.ndarray) -> np.ndarray:
    """Per-output-channel scales for the (O, I[, kh, kw]) weights of a full (not depthwise) conv: the finest at
    which no two adjacent elements (2j, 2j+1) of the reduction axis, in any of the orders ORT's kernels lay it out
    (reduction_layouts), quantise to same-signed int8 values summing past PAIR_LIMIT in magnitude.

    AVX2's u8*s8 kernel (vpmaddubsw) adds such a pair of products in int16 with saturation; with these scales
    it cannot saturate for any uint8 activation (255 * 128 = 32640 <= 32767), so the result is exact. For a 1x1
    conv the pairs are adjacent input channels in any layout (MLAS packs them in groups of 4);
    tests/test_quantize.py checks both that and the bound on this machine's kernels.
    """
    w = np.asarray(w, dtype=np.float64)
    layouts = reduction_layouts(w.reshape(*w.shape[:2], -1))
    top = np.abs(layouts[0]).max(axis=1)
    for m in layouts:
        top = np.maximum(top, _pair_sums(m).max(axis=1, initial=0))
    scale = np.where(top > 0, top / (PAIR_LIMIT - 1), 1.0).astype(np.float32)
    # rounding adds at most 1 to a pair sum (<= 127 + 1); check it on the float32 scales ORT will use
    for m in layouts:
        q = np.clip(np.rint(m / scale[:, None]), -127, 127)
        if _pair_sums(q).max(initial=0) > PAIR_LIMIT:  # pragma: no cover - guaranteed by the bound above
            raise ModelError("internal error: pair-safe weight scales overflow")
    return scale


def _conv_rules(model, settings: QuantSettings) -> tuple[list[str], dict]:
    """(node names to leave in fp32, tensor overrides) that the settings' rules resolve to for this graph."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    exclude = [n.name for n in convs[: settings.fp32_first_convs]]
    if settings.fp32_last_convs:
        exclude += [n.name for n in convs[-settings.fp32_last_convs :]]
    overrides: dict = {}
    if not (settings.reduce_range and settings.per_channel):
        return exclude, overrides
    for n in convs:
        w = inits.get(n.input[1]) if len(n.input) > 1 else None
        if n.name in exclude or w is None or len(w.dims) != 4:
            continue
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if settings.depthwise_full_range and group > 1 and w.dims[1] == 1:
            # depthwise kernels accumulate u8*s8 products in int32: no saturation, 8-bit weights are exact
            overrides[n.input[1]] = [{"axis": 0, "reduce_range": False}]
        elif settings.pair_scales and group == 1:
            scales = pair_safe_scales(numpy_helper.to_array(w))
            overrides[n.input[1]] = [
                {"axis": 0, "scale": float(sc), "zero_point": 0} if i == 0 else {"scale": float(sc), "zero_point": 0}
                for i, sc in enumerate(scales)
            ]
    return exclude, overrides


def _first_images(batches: Iterable[np.ndarray], n: int) -> Iterator[np.ndarray]:
    """The batches, cut so that exactly the first n images (or all there are, if fewer) come out."""
    left = n
    for b in batches:
        if left <= 0:
            return
        b = np.ascontiguousarray(b[:left], dtype=np.float32)
        if b.ndim != 4:
            raise ModelError(f"calibration batches must be (B, 3, S, S) arrays, got shape {b.shape}")
        left -= len(b)
        if len(b):
            yield b


@contextlib.contextmanager
def _quiet():
    """ORT's quantiser prints progress and logs INFO/WARNING chatter on the root logger; drop it (keep errors)."""

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(keep)


def strip_debug_info(model) -> None:
    """Remove what the torch exporter records per node for debugging (the stack trace of the Python source that
    made it: this file's path and line numbers) from an ONNX model, in place: with it, the same model exported
    from a checkout and from an installed wheel, or before and after an edit, differs in its bytes."""
    for n in model.graph.node:
        del n.metadata_props[:]
        n.ClearField("doc_string")


def graph_digest(model) -> str:
    """A hash of an ONNX graph's wiring (op types, tensor names): the activation ranges of a Calibration are
    per tensor name, so they fit exactly the graphs with this digest."""
    wiring = [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    return hashlib.sha256(json.dumps(wiring, separators=(",", ":")).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Calibration:
    """All that int8 quantisation takes from the calibration photos: each activation tensor's (lowest, highest)
    value over them, as ORT's calibrator measured it, for the graph whose graph_digest is `graph`.

    Made once from the photos, it is all a machine needs to build the same int8 file again (the built-ins ship
    theirs: encoders/calibration.py)."""

    method: str  # QuantSettings.method it was measured with
    graph: str
    ranges: dict[str, tuple[list, list]]  # float32 arrays as ORT's calibrator shapes them, as nested lists

    def to_json(self) -> dict:
        # float32 values, written as the float64 that holds each exactly: they come back bit for bit
        return {"method": self.method, "graph": self.graph, "ranges": dict(sorted(self.ranges.items()))}

    @classmethod
    def from_json(cls, doc: dict) -> Calibration:
        return cls(doc["method"], doc["graph"], {k: (lo, hi) for k, (lo, hi) in doc["ranges"].items()})


class _GivenRanges:
    """Stands in for ORT's calibrator: measures nothing and hands back the ranges of a Calibration."""

    def __init__(self, calibration: Calibration, method):
        self.calibration, self.method = calibration, method

    def collect_data(self, reader) -> None:
        pass

    def compute_data(self):
        from onnxruntime.quantization.calibrate import TensorData, TensorsData

        return TensorsData(self.method, {
            k: TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
            for k, (lo, hi) in self.calibration.ranges.items()
        })


_CALIBRATOR_SEAM = threading.Lock()


@contextlib.contextmanager
def _calibrator(wrap):
    """Within the block, ORT's quantize_static gets its calibrator from wrap(make, *args) (make: ORT's own
    create_calibrator). quantize_static has no other way in for ranges measured earlier on ORT < 1.27 (the [gpu]
    extra's), and going through it keeps every later step of the quantisation exactly ORT's. A lock: the swap is
    process-wide."""
    import importlib

    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")  # the module, not its function
    with _CALIBRATOR_SEAM:
        make = ort_quantize.create_calibrator
        ort_quantize.create_calibrator = lambda *args, **kwargs: wrap(make, *args, **kwargs)
        try:
            yield
        finally:
            ort_quantize.create_calibrator = make


def quantize_onnx(
    fp32: Path,
    out: Path,
    calibration: Iterable[np.ndarray] | Calibration,
    settings: QuantSettings = QuantSettings(),
) -> Calibration:
    """Write the int8 model of fp32 to out atomically, and return the Calibration it was quantised with.

    calibration: (B,3,S,S) float32 calibration inputs already preprocessed (the first settings.calibration_images
    images are used), or the Calibration an earlier run returned for this graph: the same file again, no photos."""
    fp32, out = Path(fp32), Path(out)
    if not fp32.is_file():
        raise ModelError(f"cannot quantise {fp32}: no such file")
    try:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quant_pre_process,
            quantize_static,
        )
    except ImportError as e:  # pragma: no cover - onnxruntime is a dependency
        raise ModelError(f"int8 quantisation needs onnxruntime's quantization tools: {e}") from None

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[settings.method]
    log.debug("quantising %s to int8 (settings %s) -> %s", fp32.name, settings.tag(), out)
    try:
        with atomic_path(out) as tmp_out, tempfile.TemporaryDirectory(prefix="simsearch-quant-") as work, _quiet():
            pre = Path(work) / "pre.onnx"
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            model = onnx.load(str(pre))
            strip_debug_info(model)  # a cached fp32 file from an older simsearch still has it
            onnx.save(model, str(pre))
            input_name = model.graph.input[0].name
            graph = graph_digest(model)
            exclude, overrides = _conv_rules(model, settings)
            del model
            measured: dict[str, tuple[float, float]] = {}
            if isinstance(calibration, Calibration):
                if calibration.method != settings.method or calibration.graph != graph:
                    raise ModelError(
                        f"cannot quantise {fp32.name} with the calibration given: it was measured with "
                        f"{calibration.method} on graph {calibration.graph}, this is {settings.method} on graph {graph} "
                        f"(an ONNX export from another torch version names its tensors differently)")
                images = iter(())

                def calibrator(make, *args, **kwargs):
                    return _GivenRanges(calibration, method)
            else:
                images = _first_images(calibration, settings.calibration_images)
                first = next(images, None)
                if first is None:
                    raise ModelError(f"cannot quantise {fp32.name}: no calibration images")
                images = itertools.chain([first], images)

                def calibrator(make, *args, **kwargs):
                    made = make(*args, **kwargs)
                    compute = made.compute_data

                    def compute_and_keep():
                        data = compute()
                        measured.update((k, tuple(np.asarray(v, np.float32).tolist() for v in d.range_value))
                                        for k, d in data.data.items())
                        return data

                    made.compute_data = compute_and_keep
                    return made

            class Reader(CalibrationDataReader):
                def get_next(self):
                    b = next(images, None)
                    return None if b is None else {input_name: b}

            extra = {
                "CalibMovingAverage": settings.moving_average,
                "TensorQuantOverrides": overrides,
            }
            if settings.method == "percentile":
                extra["CalibPercentile"] = settings.percentile
            with _calibrator(calibrator):
                quantize_static(
                    str(pre),
                    str(tmp_out),
                    Reader(),
                    quant_format=QuantFormat.QDQ,
                    per_channel=settings.per_channel,
                    reduce_range=settings.reduce_range,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=exclude,
                    calibrate_method=method,
                    extra_options=extra,
                )
    except ModelError:
        raise
    except Exception as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ModelError(f"int8 quantisation of {fp32.name} failed: {reason}") from e
    return calibration if isinstance(calibration, Calibration) else Calibration(settings.method, graph, measured)


VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "avx512vnni", "avxvnni"})
# CLIP towers are MatMul-bound transformers: dynamic quantisation (int8 weights from the weights alone, activations
# quantised per batch at run time) needs no calibration photos, so every machine writes the same file from the weights.
# 7-bit weights (reduce_range) for the same reason as above: no int16 saturation in AVX2's u8*s8 kernels. The
# convolutional patch embedding stays fp32 (ORT's ConvInteger is slower than its fp32 conv).
DYNAMIC_SETTINGS = {"ops": ["MatMul", "Gemm"], "weights": "QInt8", "per_channel": True, "reduce_range": True}
DYNAMIC_TAG = "dyn" + hashlib.sha256(json.dumps(DYNAMIC_SETTINGS, sort_keys=True).encode()).hexdigest()[:5]


def quantize_dynamic_onnx(fp32: Path, out: Path) -> None:
    """Write the dynamically quantised int8 model of fp32 to out atomically (DYNAMIC_SETTINGS)."""
    import onnx
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    with atomic_path(Path(out)) as tmp_out, tempfile.TemporaryDirectory(prefix="simsearch-quant-") as work, _quiet():
        pre = Path(work) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_dynamic(str(pre), str(tmp_out), op_types_to_quantize=DYNAMIC_SETTINGS["ops"],
                         weight_type=QuantType.QInt8, per_channel=DYNAMIC_SETTINGS["per_channel"],
                         reduce_range=DYNAMIC_SETTINGS["reduce_range"])
        model = onnx.load(str(tmp_out))
        strip_debug_info(model)
        onnx.save(model, str(tmp_out))


X86 = ("x86_64", "amd64", "i686", "i386", "x86")


def int8_fast_flags(machine: str, flags: Iterable[str]) -> bool:
    """True where the CPU's feature flags include an int8 dot-product instruction ORT's kernels use."""
    machine = machine.lower()
    flags = {f.lower() for f in flags}
    if machine in X86:
        return bool(flags & VNNI_FLAGS)
    if machine in ("aarch64", "arm64"):
        return "asimddp" in flags
    return False


def int8_faster_flags(machine: str, flags: Iterable[str]) -> bool:
    """True where int8 runs faster than fp32: a dot-product instruction, or x86 with AVX2, whose u8*s8 kernels ran
    EfficientNet-Lite 1.6x faster than fp32 on a 2-core AMD EPYC with AVX2 and no VNNI (the speed benchmark).
    Older x86 and unknown CPUs: False, so that no user is made slower by default."""
    flags = {f.lower() for f in flags}
    return int8_fast_flags(machine, flags) or (machine.lower() in X86 and "avx2" in flags)


def parse_cpuinfo_flags(text: str) -> set[str]:
    """The CPU feature flags in a /proc/cpuinfo text: x86 'flags' lines, ARM 'Features' lines."""
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def _flags_here() -> set[str]:
    """This CPU's feature flags (Linux; empty elsewhere: unknown)."""
    try:
        return parse_cpuinfo_flags(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        return set()


def int8_fast_here() -> bool:
    """True where int8 kernels are known to be fast: x86 with AVX-512 VNNI or AVX-VNNI (read /proc/cpuinfo flags on
    Linux), or aarch64 with dotprod ('asimddp'); False when unknown."""
    return int8_fast_flags(platform.machine(), _flags_here())


def int8_faster_here() -> bool:
    """int8_faster_flags for this CPU."""
    return int8_faster_flags(platform.machine(), _flags_here())
