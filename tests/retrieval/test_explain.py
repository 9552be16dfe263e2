"""`simsearch explain`: the decomposition is exact, both methods point at the object two images share, the CLI
renders it. Real photos, the real ONNX models; the decomposition is checked against the encoder's own cosine and
the exposed feature map against the torch trunk it was exported from."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.encoders.preprocess import decode_side, to_input
from simsearch.encoders.registry import default_encoder, get_encoder
from simsearch.encoders.runtime import OnnxEncoder
from simsearch.encoders.spec import Preprocess
from simsearch.errors import ImageLoadError, SimsearchError
from simsearch.indexer.images import load_rgb
from simsearch.retrieval.explain import _averaged_map, explain_pair, features_model, render_png

from ..conftest import SAMPLES, sample_paths

runner = CliRunner()
GOLDFISH, TENCH = SAMPLES / "n01443537_goldfish.JPEG", SAMPLES / "n01440764_tench.JPEG"
TILE = 224  # pixels of a composite's quadrant; composites are 2 x 2 tiles, square, so `pad` sees all of them


@pytest.fixture(scope="module")
def int8(models_dir):
    return OnnxEncoder(get_encoder("efficientnet-lite0-int8"), models_dir=models_dir)


def _cosine(encoder: OnnxEncoder, a: Path, b: Path) -> float:
    """The cosine the db would hold: each image embedded as a query is."""
    spec = encoder.spec
    v = encoder.embed(np.stack([to_input(load_rgb(p, decode_side(spec)), spec) for p in (a, b)]))  # (2, dim)
    return float(v[0].astype(np.float64) @ v[1])


def _pairs() -> list[tuple[Path, Path]]:
    photos = sample_paths(1000)
    rng = random.Random(7)
    return [(GOLDFISH, TENCH)] + [tuple(rng.sample(photos, 2)) for _ in range(3)]


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_decomposition_sums_to_the_encoders_cosine(which, encoder, int8):
    enc = encoder if which == "fp32" else int8
    for a, b in _pairs():
        expl = explain_pair(enc, a, b)
        cos = _cosine(enc, a, b)
        assert expl.method == "decomposition"
        assert expl.grid_a.shape == expl.grid_b.shape == (224, 224) and expl.grid_a.dtype == np.float32
        assert expl.score == pytest.approx(cos, abs=1e-4)
        assert expl.grid_a.sum(dtype=np.float64) == pytest.approx(cos, abs=1e-4), (a.name, b.name)
        assert expl.grid_b.sum(dtype=np.float64) == pytest.approx(cos, abs=1e-4), (a.name, b.name)
    # Symmetric: swapping the images swaps the maps.
    swapped = explain_pair(enc, TENCH, GOLDFISH)
    first = explain_pair(enc, GOLDFISH, TENCH)
    np.testing.assert_allclose(swapped.grid_a, first.grid_b, rtol=1e-4, atol=1e-9)


def test_exposed_map_is_the_torch_trunks_feature_map(lite0, encoder, models_dir):
    """The second output is what efficientnet_lite.features computes (the map build_embedding_model averages)."""
    import onnxruntime as ort
    import torch

    from simsearch.encoders.efficientnet_lite import load_efficientnet_lite

    x = np.stack([to_input(load_rgb(p, decode_side(lite0)), lite0) for p in (GOLDFISH, TENCH)])  # (2, 3, 224, 224)
    session = ort.InferenceSession(str(features_model(lite0, models_dir)), providers=["CPUExecutionProvider"])
    embedded, maps = session.run(None, {"input": x})
    with torch.no_grad():
        reference = load_efficientnet_lite(lite0.arch, str(lite0.weights_path())).features(torch.from_numpy(x)).numpy()
    assert maps.shape == reference.shape == (2, 1280, 7, 7)
    np.testing.assert_allclose(maps, reference, atol=2e-3)
    np.testing.assert_allclose(embedded, encoder.embed(x), atol=1e-6)  # the encoder's own vectors


def test_a_head_after_the_pooling_is_not_decomposable(lite0, models_dir):
    import onnx

    from simsearch.encoders.export import ensure_onnx

    model = onnx.load(str(ensure_onnx(lite0, models_dir)))
    assert _averaged_map(model.graph) is not None
    # What a trained encoder's graph looks like to the check: something between the average and the division.
    div = next(n for n in model.graph.node if n.output[0] == model.graph.output[0].name)
    model.graph.node.append(onnx.helper.make_node("Relu", [div.input[0]], ["headed"]))
    div.input[0] = "headed"
    assert _averaged_map(model.graph) is None


def test_unknown_method_and_unreadable_image(encoder, tmp_path):
    with pytest.raises(SimsearchError, match="unknown explanation method"):
        explain_pair(encoder, GOLDFISH, TENCH, method="gradcam")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        explain_pair(encoder, GOLDFISH, bad)


# -- pointing ------------------------------------------------------------------------------------------------------

def _square(path: Path, side: int) -> Image.Image:
    return ImageOps.fit(Image.open(path).convert("RGB"), (side, side), Image.BICUBIC)


def _composite(seed: int, folder: Path) -> tuple[Path, Path, int]:
    """A: a cluttered scene (one photo over the whole 2 x 2 frame) with another photo, the object, pasted into a
    seeded quadrant. B: another image of the same object: another crop of its photo (60-85% of the shorter side,
    anywhere), mirrored half the time, at about the pasted scale (0.8-1.25x) on neutral grey. Returns (A, B,
    quadrant: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right)."""
    rng = random.Random(seed)
    obj, scene = rng.sample(sample_paths(1000), 2)
    quadrant = rng.randrange(4)
    a = _square(scene, 2 * TILE)
    a.paste(_square(obj, TILE), ((quadrant % 2) * TILE, (quadrant // 2) * TILE))
    photo = Image.open(obj).convert("RGB")
    side = int(min(photo.size) * rng.uniform(0.6, 0.85))
    x0, y0 = rng.randrange(photo.width - side + 1), rng.randrange(photo.height - side + 1)
    crop = photo.crop((x0, y0, x0 + side, y0 + side))
    crop = ImageOps.mirror(crop) if rng.random() < 0.5 else crop
    size = int(TILE * rng.uniform(0.8, 1.25))
    b = Image.new("RGB", (2 * TILE, 2 * TILE), (127, 127, 127))
    b.paste(crop.resize((size, size), Image.BICUBIC), ((2 * TILE - size) // 2,) * 2)
    a.save(folder / f"{seed}-a.png")
    b.save(folder / f"{seed}-b.png")
    return folder / f"{seed}-a.png", folder / f"{seed}-b.png", quadrant


def _pointing_rate(encoder: OnnxEncoder, method: str, cases: int, folder: Path) -> float:
    assert encoder.spec.preprocess is Preprocess.pad  # the square composite is the whole input frame
    hits = 0
    for seed in range(cases):
        a, b, quadrant = _composite(seed, folder)
        grid = explain_pair(encoder, a, b, method=method).grid_a
        y, x = np.unravel_index(np.argmax(grid), grid.shape)
        hits += quadrant == 2 * (y >= grid.shape[0] // 2) + (x >= grid.shape[1] // 2)
    return hits / cases


def test_decomposition_points_at_the_pasted_object(encoder, tmp_path):
    assert _pointing_rate(encoder, "decomposition", 50, tmp_path) >= 0.9  # 47/50 measured


def test_occlusion_points_at_the_pasted_object(int8, tmp_path):
    # The first 12 of the 50 cases here (98 masked copies embedded per case); all 50 in the slow test below.
    assert _pointing_rate(int8, "occlusion", 12, tmp_path) >= 11 / 12  # 12/12 measured


@pytest.mark.slow
def test_occlusion_points_at_the_pasted_object_in_50_cases(int8, tmp_path):
    assert _pointing_rate(int8, "occlusion", 50, tmp_path) >= 0.9  # 50/50 measured


# -- rendering and the CLI ----------------------------------------------------------------------------------------

def test_render_png_shows_both_images(encoder):
    png = render_png(explain_pair(encoder, GOLDFISH, TENCH, method="occlusion"), GOLDFISH, TENCH)
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.size == (900, 500)
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert pixels[60:460, 20:440].std() > 20 and pixels[60:460, 460:880].std() > 20  # two pictures, not blank


def test_cli_writes_the_overlay_and_prints_score_and_method(encoder, tmp_path):
    out = tmp_path / "why.png"
    result = runner.invoke(app, ["explain", str(GOLDFISH), str(TENCH), "-o", str(out), "--db", str(tmp_path / "no-db"),
                                 "--encoder", "efficientnet-lite0"])
    assert result.exit_code == 0, result.output
    assert f"score {_cosine(encoder, GOLDFISH, TENCH):.4f}" in result.stdout
    assert "method decomposition" in result.stdout and str(out) in result.stdout.replace("\n", "")
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.size == (900, 500)


def test_cli_json_has_the_grids(encoder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["explain", str(GOLDFISH), str(TENCH), "--json", "--method", "occlusion",
                                 "--db", str(tmp_path / "no-db"), "--encoder", "efficientnet-lite0"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["method"] == "occlusion" and doc["exact"] is False and doc["encoder"] == "efficientnet-lite0"
    assert doc["png"] is None and not (tmp_path / "explain.png").exists()  # --json alone writes no file
    grid = np.array(doc["grid_a"])
    assert grid.shape == (224, 224) == tuple(doc["grid_shape"]) and np.array(doc["grid_b"]).shape == (224, 224)
    assert doc["score"] == pytest.approx(_cosine(encoder, GOLDFISH, TENCH), abs=1e-5)
    assert grid.max() > 0  # hiding the goldfish lowers its similarity to the tench


def test_cli_default_encoder_is_the_dbs_else_the_machines(encoder, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in (GOLDFISH, TENCH):
        (folder / p.name).write_bytes(p.read_bytes())
    assert runner.invoke(app, ["index", str(folder), "--db", str(tmp_path / "db"), "--encoder",
                               "efficientnet-lite0"]).exit_code == 0
    pair = [str(folder / GOLDFISH.name), str(folder / TENCH.name), "--json"]
    in_db = json.loads(runner.invoke(app, ["explain", *pair, "--db", str(tmp_path / "db")]).stdout)
    assert in_db["encoder"] == "efficientnet-lite0" and in_db["method"] == "decomposition"
    no_db = json.loads(runner.invoke(app, ["explain", *pair, "--db", str(tmp_path / "none")]).stdout)
    assert no_db["encoder"] == default_encoder()
    assert sum(map(sum, in_db["grid_a"])) == pytest.approx(in_db["score"], abs=1e-4)  # 6 digits in JSON: still exact


def test_cli_unreadable_image_is_one_error_line(encoder, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    result = runner.invoke(app, ["explain", str(GOLDFISH), str(bad), "--db", str(tmp_path / "no-db"),
                                 "--encoder", "efficientnet-lite0", "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "broken.jpg" in lines[0], result.output
    assert not (tmp_path / "x.png").exists()


def test_explain_process_does_not_import_torch(encoder, lite0, models_dir, tmp_path):
    features_model(lite0, models_dir)  # derived (with onnx) once per machine; here it is cached
    code = (
        "import sys\n"
        "from simsearch.cli import main\n"
        f"sys.argv = ['simsearch', 'explain', {str(GOLDFISH)!r}, {str(TENCH)!r}, '--encoder', 'efficientnet-lite0', "
        f"'--db', {str(tmp_path / 'no-db')!r}, '-o', {str(tmp_path / 'why.png')!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'onnx', 'onnxscript'})\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "method decomposition" in proc.stdout and (tmp_path / "why.png").is_file()
