"""Trained encoders: a folder per encoder under <models_dir>/trained/<name>/ with

    model.onnx   the whole encoder (base trunk + trained head), (B, 3, S, S) -> (B, dim) L2-normalised
    head.pt      the trained head's torch state dict (simsearch.training.heads builds the head from the
                 card), so a later training can start from this encoder
    card.json    its model card (encoders/cards.py): base encoder, data, hyper-parameters, training time,
                 per-epoch validation, the ONNX file's sha256

Training writes these folders (simsearch.training.loop.publish); reading them needs no torch: trained
encoders are served by ONNX Runtime like the built-ins.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from simsearch.encoders.cards import CARD, MODEL, Card
from simsearch.encoders.spec import INT8_SUFFIX, TRAINED_ARCH, EncoderSpec
from simsearch.errors import ModelError
from simsearch.paths import trained_dir

log = logging.getLogger(__name__)


def check_model_name(name: str) -> None:
    """A trained model's name is a folder name in the registry: letters, digits, '.', '_', '-'."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise ModelError(f"invalid name {name!r}: use letters, digits, '.', '_' and '-' (starting with a letter or digit)")
    if name.endswith(INT8_SUFFIX):
        raise ModelError(f"invalid name {name!r}: names ending in {INT8_SUFFIX!r} are the int8 variants of other encoders")


def spec_from_card(card: Card, folder: Path) -> EncoderSpec:
    d = card.details
    return EncoderSpec(
        name=card.name, arch=TRAINED_ARCH, dim=d.dim, image_size=d.image_size, mean=d.mean, std=d.std,
        crop_fraction=d.crop_fraction, weights_package="", weights_file="", weights_sha256=card.onnx_sha256[MODEL],
        source=f"trained: {card.method} from {card.base} on {Path(card.data).name} ({card.split})",
        onnx_file=str(folder / MODEL), card=str(folder / CARD), preprocess=d.preprocess,
    )


def trained_specs(models_dir: Path | None) -> list[EncoderSpec]:
    """Every complete trained encoder in models_dir; a broken folder (or a card from a newer simsearch) is
    logged and ignored."""
    def load(folder: Path) -> EncoderSpec | None:
        return spec_from_card(Card.load(folder / CARD, "encoder"), folder) if (folder / MODEL).is_file() else None

    return specs_in(trained_dir(models_dir), load, "trained encoder")


def specs_in(root: Path, load: Callable[[Path], EncoderSpec | None], kind: str) -> list[EncoderSpec]:
    """The spec of each model folder in a registry folder (name order; hidden folders are staging), by `load`
    (None: not complete yet). A folder `load` refuses (ModelError) is logged and skipped: one broken model must
    not hide the others."""
    if not root.is_dir():
        return []
    specs = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            if (spec := load(folder)) is not None:
                specs.append(spec)
        except ModelError as e:
            log.warning("ignoring %s %s: %s", kind, folder, e)
    return specs
