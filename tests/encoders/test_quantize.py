"""encoders/quantize.py on the real lite0 model and real photos: accuracy against fp32, exactness of the int8
kernels (no int16 saturation), atomic writes, the settings tag, and the CPU-flag check."""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from simsearch.encoders.quantize import (
    QuantSettings,
    int8_fast_flags,
    int8_fast_here,
    int8_faster_flags,
    pair_safe_scales,
    parse_cpuinfo_flags,
    pick_calibration,
    quantize_onnx,
)
from simsearch.errors import ModelError

from ..conftest import SAMPLES

ort = pytest.importorskip("onnxruntime")

N_EVAL = 40


def _session(path: Path, optimise: bool = True):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    if not optimise:  # DQ -> float op -> Q: the exact arithmetic the QDQ file describes, no int8 kernels
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _embed(path: Path, x: np.ndarray, optimise: bool = True) -> np.ndarray:
    s = _session(path, optimise)
    name = s.get_inputs()[0].name
    y = np.concatenate([s.run(None, {name: x[i : i + 20]})[0] for i in range(0, len(x), 20)])
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def _inputs(spec, paths) -> np.ndarray:
    from simsearch.encoders import preprocess
    from simsearch.indexer.images import load_rgb

    side = preprocess.decode_side(spec) if hasattr(preprocess, "decode_side") else None
    return np.stack([preprocess.to_input(load_rgb(p, side), spec) for p in paths])


@pytest.fixture(scope="module")
def lite0_int8(lite0, models_dir, tmp_path_factory):
    """(fp32 path, int8 path, eval inputs): lite0 quantised once with the default settings, calibrated on a
    seeded sample of one half of imagenet-samples and evaluated on photos from the other half."""
    from simsearch.encoders.export import ensure_onnx

    photos = sorted(SAMPLES.glob("*.JPEG"))
    if len(photos) < 200:
        pytest.skip(f"shared data missing: {SAMPLES}")
    settings = QuantSettings()
    calib = pick_calibration(photos[: len(photos) // 2], settings)
    evaluation = photos[len(photos) // 2 :][::12][:N_EVAL]
    assert not set(calib) & set(evaluation)
    fp32 = ensure_onnx(lite0, models_dir)
    out = tmp_path_factory.mktemp("int8") / "lite0-int8.onnx"
    x = _inputs(lite0, calib)
    quantize_onnx(fp32, out, (x[i : i + 16] for i in range(0, len(x), 16)), settings)
    return fp32, out, _inputs(lite0, evaluation)


def test_int8_vectors_match_fp32(lite0_int8):
    fp32, int8, x = lite0_int8
    a, b = _embed(fp32, x), _embed(int8, x)
    cos = (a * b).sum(1)
    # these 40 photos: min 0.965 (200 held-out photos: mean 0.993, min 0.944, top-10 overlap 0.912; the stem in
    # int8 cost 0.03 of the worst photo's cosine and nothing measurable in hit@k, see encoders/quantize.py)
    assert cos.mean() >= 0.99, cos.mean()
    assert cos.min() >= 0.955, np.sort(cos)[:5]
    top_a = np.argsort(-(a @ a.T), 1)[:, 1:11]
    top_b = np.argsort(-(b @ b.T), 1)[:, 1:11]
    overlap = np.mean([len(set(p) & set(q)) / 10 for p, q in zip(top_a, top_b)])
    assert overlap >= 0.8, overlap


def test_int8_kernels_compute_what_the_file_says(lite0_int8):
    """The fused int8 kernels of this machine give the vectors of the file's exact QDQ arithmetic: no int16
    saturation (AVX2 without VNNI saturates 8-bit u8*s8 pairs), so every machine gets the same vectors."""
    _, int8, x = lite0_int8
    fast, exact = _embed(int8, x[:20]), _embed(int8, x[:20], optimise=False)
    assert (fast * exact).sum(1).min() >= 0.995


def test_output_is_written_atomically(lite0_int8):
    _, int8, _ = lite0_int8
    assert int8.is_file() and int8.stat().st_size > 0
    assert [p.name for p in int8.parent.iterdir()] == [int8.name]  # no temp file left beside it


def _one_conv_model(path: Path, weights: np.ndarray) -> Path:
    """fp32 ONNX: x (1, C, 4, 4) -> Conv(weights (O, C, k, k), no padding) -> y (1, O, 5 - k, 5 - k)."""
    o, c, k = weights.shape[:3]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        "one_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, o, 5 - k, 5 - k])],
        [numpy_helper.from_array(weights.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def _fast_and_exact(fp32: Path, out: Path, settings: QuantSettings, worst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = worst.shape[1]
    calib = [np.linspace(0, 1, c * 16, dtype=np.float32).reshape(1, c, 4, 4), worst]
    quantize_onnx(fp32, out, calib, settings)
    return _session(out).run(None, {"x": worst})[0], _session(out, optimise=False).run(None, {"x": worst})[0]


ALL_ONES = np.ones((1, 64, 4, 4), np.float32)
EVEN_ONES = np.zeros((1, 64, 4, 4), np.float32)
EVEN_ONES[:, 0::2] = 1


@pytest.mark.parametrize(
    ("weights", "worst", "expected"),
    [
        # every pair of same-signed weights, every activation at uint8 255: pair scales halve the weights
        (np.ones((8, 64, 1, 1)), ALL_ONES, 64.0),
        # adjacent weights of opposite signs keep full 8-bit weights (+-127): would saturate if the kernel
        # paired channels 2 apart (two +127 * 255 products), exact if it pairs adjacent ones as assumed
        (np.tile([1.0, -1.0], 32).reshape(1, 64, 1, 1).repeat(8, 0), EVEN_ONES, 32.0),
        # a stem: 3x3 over 3 channels (27 products, paired in whichever order the kernel lays them out)
        (np.ones((8, 3, 3, 3)), np.ones((1, 3, 4, 4), np.float32), 27.0),
    ],
)
def test_worst_case_activations_do_not_saturate(tmp_path, monkeypatch, capfd, weights, worst, expected):
    """The worst cases for AVX2's int16 pair sums give what the file's exact arithmetic gives."""
    monkeypatch.chdir(tmp_path)
    fp32 = _one_conv_model(tmp_path / "conv.onnx", weights)
    out = tmp_path / "out" / "conv-int8.onnx"
    fast, exact = _fast_and_exact(fp32, out, QuantSettings(fp32_first_convs=0), worst)
    np.testing.assert_allclose(fast, exact, rtol=1e-3)
    np.testing.assert_allclose(fast, expected, rtol=0.01)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.onnx", "out"]  # nothing left in the cwd
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # the quantiser's chatter is silenced


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or int8_fast_here(), reason="needs x86 without VNNI"
)
def test_plain_8bit_weights_do_saturate_here(tmp_path):
    """The same case with plain 8-bit weights: this machine's kernels saturate (why the rules exist)."""
    fp32 = _one_conv_model(tmp_path / "conv.onnx", np.ones((8, 64, 1, 1)))
    plain = QuantSettings(fp32_first_convs=0, reduce_range=False)
    fast, exact = _fast_and_exact(fp32, tmp_path / "q.onnx", plain, ALL_ONES)
    np.testing.assert_allclose(exact, 64.0, rtol=0.01)
    assert np.abs(fast - exact).max() > 1.0


def test_pair_safe_scales_bound_adjacent_pairs():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 96)) * rng.uniform(0.01, 3, (32, 1))
    w[0, :2] = [5.0, 5.0]  # a pair of equal maxima: needs twice the 8-bit scale
    w[1, :2] = [5.0, -5.0]  # opposite signs never add up: the 8-bit scale is safe
    s = pair_safe_scales(w)
    q = np.rint(w / s[:, None])
    assert np.abs(q).max() <= 127
    assert np.abs(q[:, 0::2] + q[:, 1::2]).max() <= 128
    np.testing.assert_allclose(s[0], 10 / 127, rtol=1e-6)
    assert s[1] <= 5.0 / 127 * 1.000001 or np.abs(w[1, 2:]).max() * 2 > 5.0


@pytest.mark.parametrize("shape", [(16, 3, 3, 3), (8, 5, 5, 5), (4, 32, 3, 3)])
def test_pair_safe_scales_of_a_kxk_conv_bound_the_pairs_of_every_layout(shape):
    """A k x k conv's reduction axis is (I, kh, kw) in NCHW im2col, (kh, kw, I) in NHWC, and blocks of each kernel
    position's channels in MLAS's symmetric kernels: no adjacent pair of any of them may pass PAIR_LIMIT, and the
    scales are still at least as fine as 7-bit weights."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape)
    w[0] = np.abs(w[0])  # one channel of all-positive weights: every pair of it adds up
    s = pair_safe_scales(w)
    o, i = shape[:2]
    q = np.rint(w / s[:, None, None, None])
    assert np.abs(q).max() <= 127
    nhwc = q.transpose(0, 2, 3, 1)
    layouts = [q.reshape(o, -1), nhwc.reshape(o, -1),
               np.pad(nhwc, ((0, 0), (0, 0), (0, 0), (0, i % 2))).reshape(o, -1)]
    for m in layouts:
        k = m.shape[1] // 2 * 2
        a, b = m[:, 0:k:2], m[:, 1:k:2]
        assert np.where(np.sign(a) == np.sign(b), np.abs(a + b), 0).max() <= 128
    assert (s <= np.abs(w).reshape(o, -1).max(1) / 63 * 1.000001).all()


def test_int8_vectors_do_not_depend_on_the_cpus_float_kernels(lite0_int8):
    """Every conv is int8 (the stem too): from the input's quantisation on the model is integer arithmetic, so the
    vectors do not change with the float kernels a CPU gets. ORT's NCHWc layout (blocks of 8 floats on AVX2, 16 on
    AVX-512) stands in for another CPU here: with an fp32 stem, turning it off moved lite0's vectors by 7e-3."""
    _, int8, x = lite0_int8

    def raw(threads: int, disabled: list[str]) -> np.ndarray:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        s = ort.InferenceSession(str(int8), opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        return s.run(None, {s.get_inputs()[0].name: x[:8]})[0]

    ours = raw(2, [])
    np.testing.assert_array_equal(raw(2, ["NchwcTransformer"]), ours)
    np.testing.assert_array_equal(raw(1, []), ours)


def test_failure_raises_model_error_and_keeps_the_old_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")
    with pytest.raises(ModelError, match="bad.onnx"):
        quantize_onnx(bad, out, [np.zeros((1, 3, 8, 8), np.float32)])
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "out.onnx"]
    with pytest.raises(ModelError, match="no such file"):
        quantize_onnx(tmp_path / "missing.onnx", out, [])


def test_no_calibration_images_is_a_model_error(tmp_path):
    fp32 = _one_conv_model(tmp_path / "conv.onnx", np.ones((4, 8, 1, 1)))
    with pytest.raises(ModelError, match="calibration"):
        quantize_onnx(fp32, tmp_path / "q.onnx", iter([]))
    assert not (tmp_path / "q.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.onnx"]


def test_tag_is_stable_and_changes_with_every_setting():
    base = QuantSettings()
    # The defaults' tag is in every int8 vector key and cache file name: change it only on purpose.
    assert base.tag() == "a4246242"  # 2026-12-07: the stem in int8 (pair-safe k x k scales)
    assert base.tag() == QuantSettings().tag()
    assert len(base.tag()) == 8 and int(base.tag(), 16) >= 0
    changed = {
        bool: lambda v: not v,
        int: lambda v: v + 1,
        float: lambda v: v / 2,
        str: lambda v: "percentile" if v != "percentile" else "minmax",
    }
    tags = {base.tag()}
    for f in dataclasses.fields(QuantSettings):
        value = getattr(base, f.name)
        other = dataclasses.replace(base, **{f.name: changed[type(value)](value)})
        tags.add(other.tag())
    assert len(tags) == 1 + len(dataclasses.fields(QuantSettings))


def test_settings_reject_unknown_method():
    with pytest.raises(ValueError, match="method"):
        QuantSettings(method="magic")


def test_pick_calibration_is_seeded_and_order_independent():
    paths = [f"p{i:03d}" for i in range(100)]
    a = pick_calibration(paths, QuantSettings(calibration_images=10))
    assert a == pick_calibration(list(reversed(paths)), QuantSettings(calibration_images=10))
    assert a != pick_calibration(paths, QuantSettings(calibration_images=10, seed=1))
    assert len(a) == 10 and len(set(a)) == 10
    assert len(pick_calibration(paths[:3], QuantSettings(calibration_images=10))) == 3


X86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 avx avx2 fma {extra}\nbugs\t\t: spectre_v1\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 atomics {extra}\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize(
    ("machine", "text", "fast", "faster"),
    [
        ("x86_64", X86.format(extra=""), False, True),  # AVX2 only: this project's reference machine
        ("x86_64", X86.format(extra="avx512f avx512_vnni"), True, True),
        ("x86_64", X86.format(extra="avx_vnni"), True, True),
        ("AMD64", X86.format(extra="avx512_vnni"), True, True),
        ("x86_64", X86.format(extra="avx512f avx512bw"), False, True),  # AVX-512 without VNNI
        ("x86_64", "flags\t: fpu sse sse2 sse4_1 sse4_2 avx\n", False, False),  # no AVX2: fp32 stays the default
        ("aarch64", ARM.format(extra="asimddp sve"), True, True),
        ("aarch64", ARM.format(extra="asimdhp"), False, False),
        ("riscv64", "isa\t: rv64imafdc\n", False, False),
        ("x86_64", "", False, False),
    ],
)
def test_int8_fast_flags(machine, text, fast, faster):
    flags = parse_cpuinfo_flags(text)
    assert int8_fast_flags(machine, flags) is fast and int8_faster_flags(machine, flags) is faster


def test_parse_cpuinfo_flags():
    flags = parse_cpuinfo_flags(X86.format(extra="avx512_vnni") * 2)
    assert {"avx2", "avx512_vnni", "fma"} <= flags
    assert "spectre_v1" not in flags and "AuthenticAMD" not in flags
    assert "asimddp" in parse_cpuinfo_flags(ARM.format(extra="asimddp"))


def test_a_calibration_replayed_without_photos_builds_the_same_file(tmp_path):
    """What quantize_onnx measured on photos, written to JSON and read back, quantises to the very same bytes: the
    built-ins ship theirs (encoders/calibrations/) so no machine needs the photos."""
    import json

    from simsearch.encoders.quantize import Calibration

    rng = np.random.default_rng(0)
    fp32 = _one_conv_model(tmp_path / "conv.onnx", rng.normal(size=(8, 16, 1, 1)))
    photos = [rng.uniform(-1, 2, size=(1, 16, 4, 4)).astype(np.float32) for _ in range(3)]
    measured = quantize_onnx(fp32, tmp_path / "a.onnx", photos, QuantSettings(calibration_images=3, fp32_first_convs=0))
    # the range of the input over the photos, as ORT's MinMax measures it (0 included)
    lo, hi = measured.ranges["x"]
    assert lo[0] == pytest.approx(min(0.0, min(p.min() for p in photos))) and hi[0] == pytest.approx(max(p.max() for p in photos))
    replayed = Calibration.from_json(json.loads(json.dumps(measured.to_json())))
    assert replayed == measured
    again = quantize_onnx(fp32, tmp_path / "b.onnx", replayed, QuantSettings(calibration_images=3, fp32_first_convs=0))
    assert again == measured and (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    # other ranges, another file: the replayed ranges are what the quantiser uses
    shifted = Calibration(measured.method, measured.graph, {**measured.ranges, "x": ([lo[0]], [2 * hi[0]])})
    quantize_onnx(fp32, tmp_path / "c.onnx", shifted, QuantSettings(calibration_images=3, fp32_first_convs=0))
    assert (tmp_path / "c.onnx").read_bytes() != (tmp_path / "a.onnx").read_bytes()
