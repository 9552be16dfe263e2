"""Trained encoders: a folder per encoder under <models_dir>/trained/<name>/ with

    model.onnx   the whole encoder (base trunk + trained head), (B, 3, S, S) -> (B, dim) L2-normalised
    head.pt      the trained head's torch state dict, so a later training can start from this encoder
    card.json    the model card: base encoder, data, hyper-parameters, training time, validation metrics

Reading cards needs no torch: trained encoders are served by ONNX Runtime like the built-ins.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from simsearch.encoders.spec import TRAINED_ARCH, EncoderSpec
from simsearch.errors import ModelError
from simsearch.paths import trained_dir

log = logging.getLogger(__name__)

CARD = "card.json"
MODEL = "model.onnx"
HEAD = "head.pt"
CARD_VERSION = 1


@dataclass
class ModelCard:
    name: str
    method: str  # "triplet" | "barlow"
    base: str  # the encoder it was trained from
    base_key: str  # name@sha of the base weights
    dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_fraction: float
    head: dict  # architecture of the trained head (see training/heads.py)
    data: str
    split: str
    hyper_parameters: dict
    train_seconds: float
    validation: dict  # per-epoch history and the best epoch's figures
    onnx_sha256: str = ""
    created: str = ""
    simsearch_version: str = ""
    card_version: int = CARD_VERSION
    notes: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        data = json.loads(Path(path).read_text())
        if data.get("card_version", 0) > CARD_VERSION:
            raise ModelError(f"{path}: model card written by a newer simsearch (version {data['card_version']})")
        data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def check_model_name(name: str) -> None:
    """A trained model's name is a folder name in the registry: letters, digits, '.', '_', '-'."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise ModelError(f"invalid name {name!r}: use letters, digits, '.', '_' and '-' (starting with a letter or digit)")


def spec_from_card(card: ModelCard, folder: Path) -> EncoderSpec:
    return EncoderSpec(
        name=card.name, arch=TRAINED_ARCH, dim=card.dim, image_size=card.image_size, mean=card.mean, std=card.std,
        crop_fraction=card.crop_fraction, weights_package="", weights_file="", weights_sha256=card.onnx_sha256,
        source=f"trained: {card.method} from {card.base} on {Path(card.data).name} ({card.split})",
        onnx_file=str(folder / MODEL), card=str(folder / CARD),
    )


def trained_specs(models_dir: Path | None) -> list[EncoderSpec]:
    """Every complete trained encoder in models_dir; a broken folder is logged and ignored."""
    root = trained_dir(models_dir)
    if not root.is_dir():
        return []
    specs = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            if (folder / MODEL).is_file():
                specs.append(spec_from_card(ModelCard.load(folder / CARD), folder))
        except (OSError, ValueError, TypeError, KeyError, ModelError) as e:
            log.warning("ignoring trained encoder %s: %s", folder, e)
    return specs


def install(models_dir: Path | None, card: ModelCard, onnx_file: Path, head_file: Path) -> Path:
    """Move a finished model into the registry atomically: a reader sees the old folder or the new, never half."""
    from simsearch.encoders.export import sha256_file

    root = trained_dir(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    card.onnx_sha256 = sha256_file(onnx_file)
    staging = Path(tempfile.mkdtemp(prefix=f".{card.name}-", dir=root))
    shutil.move(str(onnx_file), staging / MODEL)
    shutil.move(str(head_file), staging / HEAD)
    (staging / CARD).write_text(card.to_json())
    return replace_dir(staging, root / card.name)


def replace_dir(staging: Path, final: Path) -> Path:
    """Put a finished folder in place of `final`: a reader sees the old folder or the new one, never half."""
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(staging, final)
        shutil.rmtree(old)
    else:
        os.replace(staging, final)
    return final
