"""Tiny CLIP encoders for tests, made without torch: a folder in Immich's layout with real ONNX towers and a real
tokenizer.json, registered through the same `add_clip_folder` a user's export goes through.

Their weights are random: rankings are arbitrary but deterministic, so tests compare against brute force, never
against meaning. The image tower is a linear map of the pixels; the text tower averages per-token embeddings of a
byte-level tokenizer with no merges (every byte a token), so every distinct text gets its own vector.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from simsearch.encoders.clip import add_clip_folder
from simsearch.encoders.spec import EncoderSpec
from simsearch.encoders.tokenizer import _bytes_to_unicode

CONTEXT = 77
# open_clip's ViT-B-32 normalisation, 0..1 units (Immich's preprocess_cfg.json)
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _save(graph, path: Path) -> None:
    import onnx
    from onnx import helper

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))


def _byte_tokenizer() -> tuple[str, int]:
    """tokenizer.json of a byte-level BPE with no merges, with <pad> <start> <end>; and its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    symbols = ["<pad>"] + list(_bytes_to_unicode().values()) + ["<start>", "<end>"]
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<start>", "<end>"])
    n = len(symbols)
    tok.post_processor = processors.TemplateProcessing(single="<start> $A <end>",
                                                       special_tokens=[("<start>", n - 2), ("<end>", n - 1)])
    return tok.to_str(), n


def make_onnx_clip_folder(dst: Path, dim: int = 32, image_size: int = 32, seed: int = 0, masked: bool = False,
                          clean: str | None = None, batch: int | str = "batch") -> Path:
    """A CLIP folder as Immich publishes them: config.json, visual/{model.onnx, preprocess_cfg.json},
    textual/{model.onnx (int32 ids, as Immich's), tokenizer.json, tokenizer_config.json}. Towers return raw features.

    masked: the text tower also takes an `attention_mask` (as Immich's multilingual M-CLIP towers) and multiplies
    each token's embedding by it. clean: config.json's text_cfg.tokenizer_kwargs.clean. batch: the inputs' first
    axis, 1 for a fixed batch of one (as Immich exports its towers)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    dst = Path(dst)
    pixels = 3 * image_size * image_size
    w = numpy_helper.from_array((rng.standard_normal((pixels, dim)) / np.sqrt(pixels)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([0, pixels], np.int64), "shape")  # 0: keep the batch axis
    _save(helper.make_graph(
        [helper.make_node("Reshape", ["image", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["embedding"])],
        "visual", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, image_size, image_size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, dim])], [w, shape]),
        dst / "visual" / "model.onnx")
    tokenizer_json, vocab = _byte_tokenizer()
    embeddings = rng.standard_normal((vocab, dim)).astype(np.float32)
    embeddings[0] = 0  # <pad>: texts differ by their own tokens, not by how much padding they have
    table = numpy_helper.from_array(embeddings, "table")
    nodes = [helper.make_node("Gather", ["table", "text"], ["tokens"])]  # (B, context, dim)
    inputs = [helper.make_tensor_value_info("text", TensorProto.INT32, [batch, CONTEXT])]
    if masked:
        nodes += [helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
                  helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),  # (B, context, 1)
                  helper.make_node("Mul", ["tokens", "mask3"], ["kept"])]
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT32, [batch, CONTEXT]))
    nodes.append(helper.make_node("ReduceMean", ["kept" if masked else "tokens", "axes"], ["embedding"], keepdims=0))
    _save(helper.make_graph(nodes, "textual", inputs,
                            [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, dim])],
                            [table, numpy_helper.from_array(np.array([1], np.int64), "axes"),
                             numpy_helper.from_array(np.array([2], np.int64), "last")]), dst / "textual" / "model.onnx")
    (dst / "textual" / "tokenizer.json").write_text(tokenizer_json)
    (dst / "textual" / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    (dst / "visual" / "preprocess_cfg.json").write_text(json.dumps({
        "size": [image_size, image_size], "mode": "RGB", "mean": MEAN, "std": STD, "interpolation": "bicubic",
        "resize_mode": "shortest", "fill_color": 0}))
    text_cfg = {"context_length": CONTEXT, **({"tokenizer_kwargs": {"clean": clean}} if clean else {})}
    (dst / "config.json").write_text(json.dumps({"embed_dim": dim, "vision_cfg": {"image_size": image_size},
                                                 "text_cfg": text_cfg}))
    return dst


def add_tiny_clip(models_dir: Path, name: str = "tiny-clip", seed: int = 0) -> EncoderSpec:
    """A tiny CLIP encoder registered in models_dir (its source folder beside it); the one already there if a test
    before registered it (tests share the session's models dir)."""
    from simsearch.encoders.registry import get_encoder
    from simsearch.errors import UnknownNameError

    try:
        return get_encoder(name, models_dir)
    except UnknownNameError:
        pass
    folder = make_onnx_clip_folder(Path(models_dir).parent / f"{name}-onnx-folder", seed=seed)
    return add_clip_folder(name, folder, models_dir)
