"""CLIP encoders: an image tower and a text tower in one embedding space, registered under <models_dir>/clip/<name>/.

One import path, `add_clip_folder`, for every source: a folder in Immich's layout (their published exports, or what
`export_open_clip` writes from any open_clip model). The folder's towers are stored with an L2 normalisation appended
(Immich's towers return raw features), the tokenizer as a tokenizer.json (encoders/tokenizer.py), and a card:

    <models_dir>/clip/<name>/
        visual.onnx      (B, 3, S, S) normalised image -> (B, dim) L2-normalised
        textual.onnx     (B, context_length) token ids -> (B, dim) L2-normalised
        tokenizer.json
        card.json        ClipCard: where it came from, its preprocessing and tokenizer settings, the files' sha256,
                         and the parity measured at import (ONNX towers vs torch, ids vs open_clip, preprocessing)

Reading these needs no torch; exporting from open_clip runs in the Python that has open_clip (see
encoders/openclip_export.py for why a separate process).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from simsearch import paths
from simsearch.atomic import staged_dir
from simsearch.encoders.export import sha256_file
from simsearch.encoders.spec import BUILTIN, CLIP_ARCH, EncoderSpec, Preprocess
from simsearch.encoders.tokenizer import Tokenizer, TokenizerConfig, tokenizer_config, write_tokenizer_json
from simsearch.encoders.trained import check_model_name, specs_in, trained_specs
from simsearch.errors import ModelError

log = logging.getLogger(__name__)

VISUAL, TEXTUAL, TOKENIZER, CARD = "visual.onnx", "textual.onnx", "tokenizer.json", "card.json"
CARD_VERSION = 1
# The largest difference allowed between an imported tower's outputs and torch's, on L2-normalised vectors.
PARITY_TOLERANCE = 1e-5
# The mean difference of simsearch's preprocessing of the export's test image from open_clip's (normalised units)
# above which it is logged: the same pixels give ~1e-7; bilinear instead of bicubic resizing gives ~1e-2.
PREPROCESS_TOLERANCE = 1e-3
# open_clip's resize_mode -> the policy that does the same (encoders/preprocess.py).
RESIZE_MODES = {"shortest": Preprocess.crop, "squash": Preprocess.resize, "longest": Preprocess.pad}


def clip_dir(models_dir: Path | None = None) -> Path:
    return paths.models_dir(models_dir) / "clip"


@dataclass(frozen=True)
class ClipCard:
    name: str
    source: dict  # {"onnx_folder": ...} or {"open_clip_model", "pretrained", "checkpoint", versions}
    dim: int
    image_size: int
    mean: tuple[float, float, float]  # pixel units (0..255), as EncoderSpec
    std: tuple[float, float, float]
    preprocess: str  # its own policy (Preprocess)
    tokenizer: dict  # TokenizerConfig's fields
    sha256: dict  # file -> sha256 of VISUAL, TEXTUAL, TOKENIZER
    parity: dict  # what the import measured against the export's torch outputs ({} when the folder had none)
    created: str
    simsearch_version: str
    card_version: int = CARD_VERSION
    notes: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> ClipCard:
        try:
            doc = json.loads(Path(path).read_text())
            if doc.get("card_version", 0) > CARD_VERSION:
                raise ModelError(f"{path}: written by a newer simsearch (card version {doc['card_version']}): upgrade")
            return cls(**{**doc, "mean": tuple(doc["mean"]), "std": tuple(doc["std"])})
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ModelError(f"{path}: not a readable CLIP card ({type(e).__name__}: {e})") from None

    def spec(self, folder: Path) -> EncoderSpec:
        src = self.source
        origin = (f"open_clip {src['open_clip_model']}"
                  + (f" ({src['pretrained']})" if src.get("pretrained") else "")
                  + (f" ({Path(src['checkpoint']).name})" if src.get("checkpoint") else "")
                  + (" (random weights: its vectors mean nothing)" if src.get("random_weights") else "")
                  if "open_clip_model" in src else f"ONNX folder {src.get('onnx_folder', '?')}")
        return EncoderSpec(
            name=self.name, arch=CLIP_ARCH, dim=self.dim, image_size=self.image_size, mean=self.mean, std=self.std,
            crop_fraction=1.0, weights_package="", weights_file="", weights_sha256=self.sha256[VISUAL],
            source=f"CLIP (image + text): {origin}", onnx_file=str(folder / VISUAL), card=str(folder / CARD),
            preprocess=Preprocess(self.preprocess), text_onnx=str(folder / TEXTUAL))

    def tokenizer_config(self) -> TokenizerConfig:
        return TokenizerConfig(**self.tokenizer)


def clip_specs(models_dir: Path | None) -> list[EncoderSpec]:
    """Every complete CLIP encoder in the models dir; a broken folder is logged and ignored."""
    return specs_in(clip_dir(models_dir), lambda folder: ClipCard.load(folder / CARD).spec(folder), "CLIP encoder")


def load_tokenizer(spec: EncoderSpec) -> Tokenizer:
    card = ClipCard.load(Path(spec.card))
    return Tokenizer(Path(spec.text_onnx).parent / TOKENIZER, card.tokenizer_config())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path}: missing (a CLIP folder has config.json, visual/, textual/: docs/clip.md)") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: unreadable ({e})") from None


def _normalised(src: Path, dst: Path) -> None:
    """Copy an ONNX tower with an L2 normalisation of its (B, dim) output appended: every stored vector, and every
    query, is unit length, so inner product is cosine."""
    import onnx

    try:
        model = onnx.load(str(src))
    except Exception as e:  # onnx raises DecodeError, OSError, ValueError... for a damaged file
        raise ModelError(f"{src}: not a readable ONNX model ({e})") from None
    graph = model.graph
    if len(graph.output) != 1:  # e.g. a tower that also returns its tokens: the first output is the embedding
        for extra in list(graph.output)[1:]:
            graph.output.remove(extra)
    out = graph.output[0]
    raw = out.name + "_raw"
    for node in graph.node:
        node.output[:] = [raw if o == out.name else o for o in node.output]
    graph.node.append(onnx.helper.make_node("LpNormalization", [raw], [out.name], axis=-1, p=2))
    big = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit: large towers keep their weights beside
    onnx.save(model, str(dst), save_as_external_data=big, location=dst.name + ".data" if big else None)


def _ort_run(path: Path, array: np.ndarray, pad_id: int | None = None) -> np.ndarray:
    """A tower's output on `array`: images (B, 3, S, S), or token ids (B, context) when pad_id is given."""
    from simsearch.encoders.runtime import ort_session, run_batched, text_feed

    session, _ = ort_session(path, threads=1)
    if pad_id is not None:
        return run_batched(session, text_feed(session, array, pad_id))
    return run_batched(session, {session.get_inputs()[0].name: array.astype(np.float32)})


def _check_parity(src: Path, work: Path, spec: EncoderSpec, tokenizer: Tokenizer) -> dict:
    """Measure the stored towers, the tokenizer and the preprocessing against what the export recorded from torch
    and open_clip; raise ModelError where they disagree. {} when the folder has no record (e.g. Immich's)."""
    if not (src / "parity.npz").is_file():
        return {}
    from simsearch.encoders.openclip_export import test_image
    from simsearch.encoders.preprocess import to_input

    ref = np.load(src / "parity.npz")
    texts = _read_json(src / "parity.json")["texts"]

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    image = float(np.abs(_ort_run(work / VISUAL, ref["images"]) - unit(ref["image_out"])).max())
    text = float(np.abs(_ort_run(work / TEXTUAL, ref["tokens"], tokenizer.config.pad_id) - unit(ref["text_out"])).max())
    ids = tokenizer(texts)
    tokens_equal = bool(np.array_equal(ids, ref["tokens"]))
    pre = float(np.abs(to_input(test_image(), spec) - ref["test_image"]).mean())  # (3, S, S), normalised units
    found = {"image_tower_max_abs": image, "text_tower_max_abs": text, "tokens_equal": tokens_equal,
             "preprocess_mean_abs": pre}
    if image > PARITY_TOLERANCE or text > PARITY_TOLERANCE:
        raise ModelError(f"the ONNX towers differ from torch by {max(image, text):.2e} (> {PARITY_TOLERANCE}): "
                         "the export is not faithful; please report it with the model name")
    if pre > PREPROCESS_TOLERANCE:  # e.g. an interpolation simsearch does not do: usable, but say so
        log.warning("simsearch's preprocessing differs from open_clip's by %.3f on average (normalised units)", pre)
    if not tokens_equal:
        bad = next(t for t, a, b in zip(texts, ids, ref["tokens"]) if not np.array_equal(a, b))
        raise ModelError(f"the tokenizer's ids differ from open_clip's on {bad!r}: please report it with the model name")
    return found


def add_clip_folder(name: str, src: Path, models_dir: Path | None = None, source: dict | None = None,
                    replace: bool = False) -> EncoderSpec:
    """Register the CLIP folder `src` (Immich's layout) as encoder `name`; its spec. Checked before anything is
    written: both towers run and give `embed_dim` vectors; with an export's parity record, they match torch and
    the tokenizer matches open_clip. The registry's folder appears whole or not at all."""
    check_model_name(name)
    src = Path(src)
    if not src.is_dir():
        raise ModelError(f"{src}: no such folder")
    final = clip_dir(models_dir) / name
    taken = [s.name for s in (*BUILTIN, *trained_specs(models_dir), *clip_specs(models_dir))]
    if name in taken and not (replace and final.is_dir()):
        raise ModelError(f"an encoder named {name!r} is already registered: choose another name (or --replace)")
    config = _read_json(src / "config.json")
    pre = _read_json(src / "visual" / "preprocess_cfg.json")
    try:
        dim = int(config["embed_dim"])
        size = pre["size"] if isinstance(pre["size"], int) else int(pre["size"][0])
        context = int(config.get("text_cfg", {}).get("context_length", 77))
        clean = (config.get("text_cfg", {}).get("tokenizer_kwargs") or {}).get("clean")
        policy = RESIZE_MODES[pre.get("resize_mode", "shortest")]
        mean = tuple(255.0 * float(m) for m in pre["mean"])
        std = tuple(255.0 * float(s) for s in pre["std"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{src}: config.json or visual/preprocess_cfg.json lacks or mistypes {e}") from None
    notes = []
    if pre.get("interpolation", "bicubic") != "bicubic":
        notes.append(f"trained with {pre['interpolation']} resizing; simsearch resizes bicubic")
    if policy is Preprocess.pad:
        notes.append("letterboxed with the mean colour (open_clip pads with fill_color)")
    for note in notes:
        log.warning("%s: %s", name, note)
    with staged_dir(final) as work:
        for tower, stored in (("visual", VISUAL), ("textual", TEXTUAL)):
            _normalised(src / tower / "model.onnx", work / stored)
        with tempfile.TemporaryDirectory(prefix="simsearch-tokenizer-") as scratch:
            shutil.copyfile(write_tokenizer_json(_writable_textual(src, Path(scratch))), work / TOKENIZER)
        tokenizer = Tokenizer(work / TOKENIZER, tokenizer_config(src / "textual", context, clean))
        sha = {f: sha256_file(work / f) for f in (VISUAL, TEXTUAL, TOKENIZER)}
        from simsearch import __version__

        card = ClipCard(name=name, source=source or {"onnx_folder": str(src.resolve())}, dim=dim, image_size=size,
                        mean=mean, std=std, preprocess=policy.value, tokenizer=asdict(tokenizer.config), sha256=sha,
                        parity={}, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        simsearch_version=__version__, notes=notes)
        spec = card.spec(work)
        for probe, batch, pad in ((VISUAL, np.zeros((2, 3, size, size), np.float32), None),
                                  (TEXTUAL, tokenizer(["a", "b"]), tokenizer.config.pad_id)):
            got = _ort_run(work / probe, batch, pad)
            if got.shape != (2, dim):
                raise ModelError(f"{src}: the {probe.removesuffix('.onnx')} tower gives {got.shape[1:]} vectors, "
                                 f"config.json says embed_dim {dim}")
        card = ClipCard(**{**asdict(card), "parity": _check_parity(src, work, spec, tokenizer)})
        (work / CARD).write_text(json.dumps(asdict(card), indent=1))
    log.info("registered CLIP encoder %s (%d-d, %d px %s) in %s", name, dim, size, policy.value, final)
    return card.spec(final)


def _writable_textual(src: Path, scratch: Path) -> Path:
    """The folder's textual/ tokenizer files, copied where a tokenizer.json may be written (the source may be
    read-only, e.g. a downloaded model in a shared cache)."""
    for f in ("tokenizer.json", "bpe_simple_vocab_16e6.txt.gz"):
        if (src / "textual" / f).is_file():
            shutil.copyfile(src / "textual" / f, scratch / f)
    return scratch


def clip_python(given: str | None = None) -> str:
    """The Python that runs open_clip: --python, else $SIMSEARCH_CLIP_PYTHON, else this one."""
    return given or os.environ.get("SIMSEARCH_CLIP_PYTHON") or sys.executable


def export_open_clip(name: str, model: str, pretrained: str = "", checkpoint: Path | None = None,
                     python: str | None = None, models_dir: Path | None = None, replace: bool = False,
                     random_weights: bool = False) -> EncoderSpec:
    """Export open_clip model `model` (a name in open_clip.list_models() or a model config .json) with its
    `pretrained` tag (open_clip downloads it) or a local `checkpoint`, and register it as `name`.

    random_weights: neither, on purpose (speed measurements, tests): its vectors mean nothing, and its card says so."""
    import simsearch

    check_model_name(name)
    if pretrained and checkpoint:
        raise ModelError("give --pretrained or --checkpoint, not both")
    if not (pretrained or checkpoint or random_weights):
        raise ModelError("give --pretrained TAG (open_clip.list_pretrained() lists them) or --checkpoint FILE; "
                         "--random-weights exports an untrained model, whose vectors mean nothing")
    if random_weights and (pretrained or checkpoint):
        raise ModelError("--random-weights goes without --pretrained and --checkpoint")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ModelError(f"{checkpoint}: no such checkpoint file")
    exe = clip_python(python)
    with tempfile.TemporaryDirectory(prefix="simsearch-clip-") as tmp:
        # The simsearch package alone on the path: not the rest of this environment (its torch would shadow theirs).
        os.symlink(Path(simsearch.__file__).resolve().parent, Path(tmp) / "simsearch")
        out = Path(tmp) / "export"
        cmd = [exe, "-m", "simsearch.encoders.openclip_export", "--model", str(model), "--out", str(out)]
        cmd += ["--pretrained", pretrained] if pretrained else []
        cmd += ["--checkpoint", str(Path(checkpoint).resolve())] if checkpoint else []
        env = {**os.environ, "PYTHONPATH": tmp}
        log.info("exporting open_clip %s to ONNX with %s (once)", model, exe)
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
        except OSError as e:
            raise ModelError(f"cannot run {exe}: {e.strerror}: pass --python with a Python that has open_clip") from None
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit code {done.returncode}"
            if "No module named" in last:
                raise ModelError(f"{exe} cannot export: {last.split(': ', 1)[-1]}. Install simsearch[clip] there, or pass "
                                 "--python (or set SIMSEARCH_CLIP_PYTHON) with a Python that has open_clip_torch")
            raise ModelError(f"the open_clip export failed: {last.removeprefix('error: ')}")
        source = {**_read_json(out / "config.json").get("source", {}), "python": exe,
                  **({"random_weights": True} if random_weights else {})}
        return add_clip_folder(name, out, models_dir, source=source, replace=replace)
