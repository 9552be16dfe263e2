"""Export an open_clip model to an ONNX folder in Immich's layout: run by `simsearch encoders add --open-clip` in the
Python that has open_clip (`python -m simsearch.encoders.openclip_export ...`), usually a separate venv.

Why a separate process: open_clip imports torchvision, and a torchvision build must match its torch exactly; the
Python serving simsearch need not have either. This script needs torch, open_clip, onnx and onnxscript; it imports
from simsearch only the ONNX export helper (no onnxruntime), so `encoders/clip.py` can put the simsearch package on its
path without the rest of simsearch's environment.

It writes (the layout Immich publishes, so one import path serves both):
    config.json                    embed_dim, vision_cfg.image_size, text_cfg.context_length, and where it came from
    visual/model.onnx              (B, 3, S, S) normalised image -> (B, embed_dim), not L2-normalised (as Immich's)
    visual/preprocess_cfg.json     open_clip's preprocess_cfg: size, mean, std (0..1 units), interpolation, resize_mode
    textual/model.onnx             (B, context_length) int64 token ids -> (B, embed_dim)
    textual/tokenizer_config.json  how text becomes ids: the cleaning, the special tokens, the padding id
    textual/bpe_simple_vocab_16e6.txt.gz   open_clip's CLIP BPE vocabulary (encoders/tokenizer.py makes tokenizer.json)
      or textual/tokenizer.json    a Hugging Face tokenizer's own file (SigLIP and the other HF-tokenised models)
    parity.npz, parity.json        torch's outputs on fixed inputs, open_clip's token ids and preprocessing of a test
                                   image: what the import checks the ONNX towers, the tokenizer and the preprocessing
                                   against
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

# Texts whose open_clip token ids the import must reproduce: cases, punctuation, accents, digits, HTML entities,
# curly quotes (ftfy), runs of spaces, and one longer than the context (truncation).
PARITY_TEXTS = [
    "a photo of a dog",
    "A RED car at night!",
    "don’t   stop &amp; café 42nd street",
    "golden retriever, Canis familiaris; 2 puppies...",
    "naïve façade — emoji 🙂 and ünïcödé",
    " ".join(["word"] * 100),
]


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="an open_clip model name, or a model config .json file")
    p.add_argument("--pretrained", default="", help="an open_clip pretrained tag (downloads)")
    p.add_argument("--checkpoint", default="", help="a local weights file")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0, help="seed of the random parity inputs")
    return p.parse_args(argv)


def _model_name(model: str) -> str:
    import open_clip

    path = Path(model)
    if path.suffix == ".json":  # a custom config: registered under its file's stem, as open_clip does
        if not path.is_file():
            raise SystemExit(f"error: {path}: no such model config")
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        raise SystemExit(f"error: {model!r} is not an open_clip model (open_clip.list_models() lists them)")
    return model


def _tokenizer_files(tokenizer, textual: Path) -> dict:
    """Write the tokenizer's files into textual/; what tokenizer_config.json says of it."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    if isinstance(tokenizer, SimpleTokenizer):
        shutil.copyfile(open_clip.tokenizer.default_bpe(), textual / "bpe_simple_vocab_16e6.txt.gz")
        clean = tokenizer.clean_fn.__name__.removeprefix("_clean_")  # lower | whitespace | canonicalize
        return {"kind": "open_clip_bpe", "clean": clean, "pad_id": 0,
                "bos_token": tokenizer.decoder[tokenizer.sot_token_id], "eos_token": tokenizer.decoder[tokenizer.eot_token_id]}
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.tokenizer.save_pretrained(str(textual))  # tokenizer.json, tokenizer_config.json, special tokens
        hf = tokenizer.tokenizer
        clean = tokenizer.clean_fn.__name__.removeprefix("_clean_")
        return {"kind": "hf", "clean": clean, "pad_id": int(hf.pad_token_id or 0), "pad_token": hf.pad_token,
                "strip_sep_token": bool(tokenizer.strip_sep_token)}
    raise SystemExit(f"error: open_clip tokenizer {type(tokenizer).__name__} is not supported yet")


def test_image():
    """A 320 x 200 image with structure at every scale: what the preprocessing parity is checked on."""
    from PIL import Image

    y, x = np.mgrid[0:200, 0:320]
    rgb = np.stack([x * 255 // 319, y * 255 // 199, ((x // 16 + y // 16) % 2) * 255], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    import open_clip
    import torch

    from simsearch.encoders.export import export_module

    name = _model_name(args.model)
    pretrained = args.checkpoint or args.pretrained or None
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    out: Path = args.out
    (out / "visual").mkdir(parents=True, exist_ok=True)
    (out / "textual").mkdir(parents=True, exist_ok=True)

    cfg = dict(model.visual.preprocess_cfg)
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    context = int(tokenizer.context_length or model.context_length)

    class Visual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, image):  # (B, 3, S, S) -> (B, D)
            return self.m.encode_image(image)

    class Textual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, text):  # (B, context) int64 -> (B, D)
            return self.m.encode_text(text)

    export_module(Visual().eval(), (2, 3, size, size), out / "visual" / "model.onnx")  # batch 2: 1 would be specialised
    tokens = tokenizer(PARITY_TEXTS, context_length=context)  # (T, context) int64
    export_module(Textual().eval(), tuple(tokens.shape), out / "textual" / "model.onnx", dtype=torch.long)

    tokenizer_config = {**_tokenizer_files(tokenizer, out / "textual"), "context_length": context}
    existing = out / "textual" / "tokenizer_config.json"  # a HF tokenizer's own settings: ours go beside them
    merged = {**(json.loads(existing.read_text()) if existing.is_file() else {}), "simsearch": tokenizer_config}
    existing.write_text(json.dumps(merged, indent=1, default=str))
    (out / "visual" / "preprocess_cfg.json").write_text(json.dumps({**cfg, "size": [size, size]}, indent=1))
    embed_dim = int(model.text_projection.shape[1]) if getattr(model, "text_projection", None) is not None else None
    with torch.no_grad():
        images = torch.from_numpy(np.random.default_rng(args.seed).standard_normal((2, 3, size, size), np.float32))
        image_out = model.encode_image(images).numpy()  # (2, D)
        text_out = model.encode_text(tokens).numpy()  # (T, D)
        preprocessed = preprocess(test_image()).numpy()  # (3, S, S)
    (out / "config.json").write_text(json.dumps({
        "embed_dim": embed_dim or int(image_out.shape[1]),
        "vision_cfg": {"image_size": size},
        "text_cfg": {"context_length": context},
        "source": {"open_clip_model": args.model, "pretrained": args.pretrained, "checkpoint": args.checkpoint,
                   "open_clip_version": open_clip.__version__, "torch_version": torch.__version__},
    }, indent=1))
    np.savez(out / "parity.npz", images=images.numpy(), image_out=image_out, tokens=tokens.numpy(),
             text_out=text_out, test_image=preprocessed)
    (out / "parity.json").write_text(json.dumps({"texts": PARITY_TEXTS}, ensure_ascii=False))


if __name__ == "__main__":
    main()
