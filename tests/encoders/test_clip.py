"""CLIP encoders: the torch-free ONNX-folder path (Immich's layout) and the real open_clip export path.

The export tests run open_clip in the Python that has it (`.venv-clip`, made by `.ci/clip-venv`; or
$SIMSEARCH_CLIP_PYTHON) on a random-init tiny model: they check the mechanics (towers equal torch's, ids equal
open_clip's, preprocessing equal open_clip's), not retrieval quality, which random weights cannot show.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.encoders.clip import ClipCard, add_clip_folder
from simsearch.encoders.preprocess import decode_side, to_input
from simsearch.encoders.registry import get_encoder
from simsearch.encoders.runtime import OnnxEncoder
from simsearch.encoders.text import TextEncoder
from simsearch.errors import ModelError
from simsearch.indexer.images import load_rgb

from ..clip_models import CONTEXT, make_onnx_clip_folder

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16,
                                               "head_width": 32},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
# Beyond the export's own parity texts: what a user types, and what breaks naive tokenisers.
TRICKY = ["golden retriever", "Golden  Retriever\tat\nSUNSET", "a photo of a {name}.", "l'été à Paris",
          "x" * 500, "", "   ", "&lt;b&gt;bold&lt;/b&gt;", "ｆｕｌｌｗｉｄｔｈ", "2:golden retriever", "日本語のテキスト"]


def clip_python() -> str | None:
    found = os.environ.get("SIMSEARCH_CLIP_PYTHON") or str(REPO / ".venv-clip" / "bin" / "python")
    return found if Path(found).is_file() else None


def need_clip_python() -> str:
    exe = clip_python()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the open_clip export: no .venv-clip (see .ci/clip-venv)")
        pytest.skip("no Python with open_clip: run .ci/clip-venv or set SIMSEARCH_CLIP_PYTHON")
    return exe


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_onnx_clip_folder(tmp_path_factory.mktemp("immich") / "tiny")


@pytest.fixture(scope="module")
def clip_models(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("clip-models")


@pytest.fixture(scope="module")
def onnx_spec(folder, clip_models):
    return add_clip_folder("tiny-onnx", folder, clip_models)


def test_onnx_folder_towers_equal_their_reference(onnx_spec, folder):
    import onnx
    from onnx import numpy_helper

    def weights(path):
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}

    # text tower: the mean of per-token embeddings over the context, L2-normalised at import
    table = weights(folder / "textual" / "model.onnx")["table"]  # (vocab, dim)
    text = TextEncoder(onnx_spec)
    ids = text.tokenizer(["a red car", "a dog"])  # (2, context)
    assert ids.shape == (2, CONTEXT) and ids[0, 0] == table.shape[0] - 2  # <start> first
    np.testing.assert_allclose(text.embed(["a red car", "a dog"]), unit(table[ids].mean(axis=1)), atol=1e-6)
    # image tower: a linear map of the normalised pixels
    w = weights(folder / "visual" / "model.onnx")["w"]  # (3*S*S, dim)
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    got = OnnxEncoder(onnx_spec).embed(x)
    np.testing.assert_allclose(got, unit(x.reshape(3, -1) @ w), atol=1e-5)


def test_multilingual_tower_gets_its_attention_mask_and_the_folders_cleaning(tmp_path):
    import onnx
    from onnx import numpy_helper

    folder = make_onnx_clip_folder(tmp_path / "mclip", masked=True, clean="canonicalize", batch=1)  # as Immich's
    spec = add_clip_folder("mclip", folder, tmp_path / "models")
    text = TextEncoder(spec)
    assert text.tokenizer.config.clean == "canonicalize"
    np.testing.assert_array_equal(text.tokenizer(["A Dog!!"]), text.tokenizer(["a dog"]))  # no case, no punctuation
    table = numpy_helper.to_array(next(t for t in onnx.load(str(folder / "textual" / "model.onnx")).graph.initializer
                                       if t.name == "table"))
    texts = ["a red car", "a dog", "une voiture rouge"]
    ids = text.tokenizer(texts)  # (3, context)
    mask = (ids != text.tokenizer.config.pad_id)[..., None]  # (3, context, 1)
    np.testing.assert_allclose(text.embed(texts), unit((table[ids] * mask).mean(axis=1)), atol=1e-6)
    x = np.random.default_rng(3).standard_normal((5, 3, 32, 32)).astype(np.float32)  # a batch through a batch-1 tower
    w = numpy_helper.to_array(next(t for t in onnx.load(str(folder / "visual" / "model.onnx")).graph.initializer
                                   if t.name == "w"))
    np.testing.assert_allclose(OnnxEncoder(spec).embed(x), unit(x.reshape(5, -1) @ w), atol=1e-5)


def test_onnx_folder_registered_with_its_preprocessing_and_card(onnx_spec, clip_models):
    spec = get_encoder("tiny-onnx", clip_models)
    assert spec == onnx_spec and spec.clip and spec.has_text and spec.dim == 32 and spec.image_size == 32
    assert spec.preprocess.value == "crop" and spec.crop_fraction == 1.0  # open_clip's resize_mode "shortest"
    np.testing.assert_allclose(spec.mean, [0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255])
    card = ClipCard.load(Path(spec.card))
    assert card.parity == {} and card.tokenizer["pad_id"] == 0  # Immich's folders carry no parity record
    int8 = get_encoder("tiny-onnx-int8", clip_models)
    assert int8.has_text and int8.text_onnx == spec.text_onnx and int8.key != spec.key


def test_int8_image_tower_is_close_and_the_same_file_everywhere(onnx_spec, clip_models, tmp_path):
    from simsearch.encoders.export import ensure_onnx

    int8 = get_encoder("tiny-onnx-int8", clip_models)
    x = np.random.default_rng(2).standard_normal((16, 3, 32, 32)).astype(np.float32)
    cos = (OnnxEncoder(onnx_spec).embed(x) * OnnxEncoder(int8, models_dir=clip_models).embed(x)).sum(axis=1)
    assert cos.min() > 0.99
    other = tmp_path / "other-cache"  # a second machine's cache: the same bytes, from the weights alone
    a, b = ensure_onnx(int8, clip_models), ensure_onnx(int8, other)
    assert a != b and a.read_bytes() == b.read_bytes()


def test_add_refuses_a_taken_name_and_replaces_on_request(onnx_spec, folder, clip_models):
    with pytest.raises(ModelError, match="already registered"):
        add_clip_folder("tiny-onnx", folder, clip_models)
    with pytest.raises(ModelError, match="already registered"):
        add_clip_folder("efficientnet-lite0", folder, clip_models)
    again = add_clip_folder("tiny-onnx", folder, clip_models, replace=True)
    assert again.key == onnx_spec.key  # the same towers: the same vectors' key


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "config.json").unlink(), "config.json: missing"),
    (lambda f: (f / "visual" / "model.onnx").write_bytes(b"not onnx"), "not a readable ONNX model"),
    (lambda f: (f / "config.json").write_text(json.dumps({"embed_dim": 64, "text_cfg": {"context_length": 77}})),
     "config.json says embed_dim 64"),
    (lambda f: (f / "textual" / "tokenizer.json").unlink(), "neither tokenizer.json"),
])
def test_a_broken_folder_is_refused_and_nothing_registered(tmp_path, damage, message):
    folder = make_onnx_clip_folder(tmp_path / "src")
    damage(folder)
    with pytest.raises(ModelError, match=message):
        add_clip_folder("broken", folder, tmp_path / "models")
    assert not (tmp_path / "models" / "clip" / "broken").exists()
    assert not [p for p in (tmp_path / "models" / "clip").glob("*")]  # no staging folder left either


def test_cli_add_onnx_and_list(folder, tmp_path):
    runner = CliRunner()
    models = tmp_path / "models"
    done = runner.invoke(app, ["encoders", "add", "mine", "--onnx", str(folder), "--models-dir", str(models)])
    assert done.exit_code == 0, done.output
    assert "added mine: 32-d" in done.output
    listed = runner.invoke(app, ["encoders", "--models-dir", str(models)], env={"COLUMNS": "200"})
    row = next(line for line in listed.output.splitlines() if " mine " in line)
    assert "yes" in row and "ONNX folder" in row
    bad = runner.invoke(app, ["encoders", "add", "x", "--models-dir", str(models)])
    assert bad.exit_code == 1 and "give --open-clip MODEL or --onnx DIR" in bad.output


def test_cli_open_clip_without_open_clip_says_how_to_get_it(tmp_path):
    import sys

    done = CliRunner().invoke(app, ["encoders", "add", "b32", "--open-clip", "ViT-B-32", "--random-weights", "--python", sys.executable,
                                    "--models-dir", str(tmp_path)])
    assert done.exit_code == 1
    assert "No module named 'open_clip'" in done.output and "simsearch[clip]" in done.output
    assert "Traceback" not in done.output


# --- the real open_clip export (random-init tiny model, local checkpoint) ---

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny open_clip model with random weights saved as a local checkpoint, exported through `encoders add`."""
    exe = need_clip_python()
    root = tmp_path_factory.mktemp("open-clip")
    config = root / "tiny-vit.json"
    config.write_text(json.dumps(TINY_CONFIG))
    checkpoint = root / "tiny-vit.pt"
    subprocess.run([exe, "-c", f"""
import open_clip, torch
open_clip.add_model_config({str(config)!r})
torch.manual_seed(0)
model = open_clip.create_model("tiny-vit")
torch.save(model.state_dict(), {str(checkpoint)!r})
"""], check=True, capture_output=True)
    models = root / "models"
    done = CliRunner().invoke(app, ["encoders", "add", "oc-tiny", "--open-clip", str(config), "--checkpoint",
                                    str(checkpoint), "--python", exe, "--models-dir", str(models)])
    assert done.exit_code == 0, done.output
    return exe, config, checkpoint, models, get_encoder("oc-tiny", models)


def test_export_towers_tokens_and_preprocessing_equal_open_clip(exported):
    _, _, checkpoint, _, spec = exported
    card = ClipCard.load(Path(spec.card))
    assert card.source["checkpoint"] == str(checkpoint) and card.source["open_clip_version"]
    assert card.parity["image_tower_max_abs"] <= 1e-5 and card.parity["text_tower_max_abs"] <= 1e-5
    assert card.parity["tokens_equal"] is True
    assert card.parity["preprocess_mean_abs"] < 1e-3
    assert card.tokenizer == {"context_length": 77, "clean": "lower", "pad_id": 0, "strip_sep_token": False}


def test_tokenizer_and_text_tower_equal_open_clip_on_new_texts(exported, tmp_path):
    """Texts the export never saw: ids from open_clip itself, and torch's text features from the checkpoint."""
    exe, config, checkpoint, _, spec = exported
    (tmp_path / "texts.json").write_text(json.dumps(TRICKY))
    subprocess.run([exe, "-c", f"""
import json, numpy as np, open_clip, torch
open_clip.add_model_config({str(config)!r})
model = open_clip.create_model("tiny-vit", pretrained={str(checkpoint)!r}).eval()
texts = json.load(open({str(tmp_path / "texts.json")!r}))
ids = open_clip.get_tokenizer("tiny-vit")(texts)
with torch.no_grad():
    np.savez({str(tmp_path / "ref.npz")!r}, ids=ids.numpy(), text=model.encode_text(ids).numpy())
"""], check=True, capture_output=True)
    ref = np.load(tmp_path / "ref.npz")
    text = TextEncoder(spec)
    np.testing.assert_array_equal(text.tokenizer(TRICKY), ref["ids"])
    np.testing.assert_allclose(text.embed(TRICKY), unit(ref["text"]), atol=1e-5)


def test_export_refuses_both_weights_sources_and_a_missing_checkpoint(exported, tmp_path):
    exe, config, checkpoint, models, _ = exported
    runner = CliRunner()
    both = runner.invoke(app, ["encoders", "add", "x", "--open-clip", str(config), "--checkpoint", str(checkpoint),
                               "--pretrained", "laion2b_s34b_b79k", "--python", exe, "--models-dir", str(models)])
    assert both.exit_code == 1 and "not both" in both.output
    missing = runner.invoke(app, ["encoders", "add", "x", "--open-clip", str(config), "--checkpoint",
                                  str(tmp_path / "nope.pt"), "--python", exe, "--models-dir", str(models)])
    assert missing.exit_code == 1 and "no such checkpoint file" in missing.output
    neither = runner.invoke(app, ["encoders", "add", "x", "--open-clip", str(config), "--python", exe,
                                  "--models-dir", str(models)])
    assert neither.exit_code == 1 and "--random-weights exports an untrained model" in neither.output
    unknown = runner.invoke(app, ["encoders", "add", "x", "--open-clip", "No-Such-Model", "--random-weights",
                                  "--python", exe, "--models-dir", str(models)])
    assert unknown.exit_code == 1 and "is not an open_clip model" in unknown.output


def test_a_text_query_process_imports_no_torch(onnx_spec, clip_models, tmp_path):
    """`simsearch query --text` on a CLIP db: ONNX Runtime, tokenizers and FAISS only, as an image query."""
    import shutil
    import sys

    from ..conftest import sample_paths

    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sample_paths(6):
        shutil.copy2(p, photos / p.name)
    env = {"SIMSEARCH_MODELS_DIR": str(clip_models)}
    done = CliRunner().invoke(app, ["index", str(photos), "--encoder", "tiny-onnx", "--db", str(tmp_path / "db")],
                              env=env)
    assert done.exit_code == 0, done.output
    code = (
        "import sys\n"
        "from simsearch.cli import main\n"
        f"sys.argv = ['simsearch', 'query', '--text', 'a red car', '-k', '3', '--json', '--db', {str(tmp_path / 'db')!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'onnx', 'onnxscript', 'transformers'})\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    hits = json.loads(proc.stdout)["results"][0]["hits"]
    files = sorted(photos.iterdir())
    images = OnnxEncoder(onnx_spec).embed(np.stack([to_input(load_rgb(p, decode_side(onnx_spec)), onnx_spec) for p in files]))  # (6, 32)
    scores = images @ TextEncoder(onnx_spec).embed(["a red car"])[0]  # brute force over the whole db
    assert [Path(h["path"]).name for h in hits] == [files[i].name for i in np.argsort(-scores)[:3]]
    np.testing.assert_allclose([h["score"] for h in hits], np.sort(scores)[::-1][:3], atol=1e-5)
