"""Model cards: one versioned format for every trained model, encoder or reranker. No torch here.

A card (card.json in the model's folder) says what the model is, what it was trained from and on
and how, how well it did on held-out data epoch by epoch, and the sha256 of its ONNX files. The
encoder registry (encoders/trained.py) and the reranker registry (retrieval/rerank.py) both read
cards through Card.load, which migrates the formats written before this one and refuses a newer one;
training writes them through one function (simsearch.training.loop.publish).

Card versions (0 and 1 are what simsearch 0.1.0 wrote until card version 2):
  0  a reranker's card, which had no card_version: a flat dict (name, arch, input, image_size,
     representation, tower or source, ...), its validation holding the best epoch's figures beside
     held_out/history/stopped, and onnx_sha256 as {file: sha256}
  1  an encoder's card: base_key/dim/image_size/mean/std/crop_fraction/head beside the common fields,
     onnx_sha256 the sha256 of model.onnx, and a `notes` list nothing ever filled
  2  the common fields, and the kind's own in `details`
  3  an encoder's details add `preprocess` (version 2 encoders all used "crop") and `calibration`
  4  this one: a reranker's details add `fusion_weight` and `depth` (version 3 rerankers: 0, not trained for
     reranking), an encoder's validation may hold `checks` (its figures against its base), and an encoder's
     head may be a blend ({"blend": w}) or a plain linear map (learned whitening)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from simsearch.errors import ModelError

CARD_VERSION = 4
CARD = "card.json"
# The other files of a model's folder, named here because a card names its ONNX files.
MODEL, HEAD = "model.onnx", "head.pt"  # an encoder: the whole encoder; its trained head's state dict
TOWER, METRIC, WEIGHTS = "tower.onnx", "metric.onnx", "weights.pt"  # a reranker: its two networks; their state dicts

KINDS = ("encoder", "reranker")
# What summary() reads off the best epoch, and the ONNX files in the folder, per kind.
BEST_FIELDS = {"encoder": ("epoch", "hit1", "hit10"), "reranker": ("epoch", "balanced_accuracy", "roc_auc")}
ONNX_FILES = {"encoder": (MODEL,), "reranker": (TOWER, METRIC)}


@dataclass(frozen=True)
class EncoderDetails:
    base_key: str  # name@sha of the base encoder's weights: the embedding space the head was trained on
    dim: int
    image_size: int
    mean: tuple[float, float, float]  # pixel units, as EncoderSpec
    std: tuple[float, float, float]
    crop_fraction: float
    head: dict  # the trained head's architecture, {"in": 1280, "hidden": [1024], "out": 256} (training/heads.py)
    preprocess: str = "crop"  # the policy it was trained with, and is used with (spec.Preprocess)
    calibration: tuple[str, ...] = ()  # a seeded sample of its training images: what its int8 variant is calibrated on


@dataclass(frozen=True)
class RerankerDetails:
    input: str  # "encoder": the base encoder's stored embedding | "pixels": the image at image_size
    image_size: int  # input "pixels": side of the square RGB input, in [0, 1]; 0 for input "encoder"
    representation: tuple[int, ...]  # one image's tower output, batch left out: (256,) or (C, h, w)
    tower: str = ""  # MatchNet: "pretrained" | "scratch"
    source: str = ""  # BEiT: what its tokens come from and what was trained
    trainable_parameters: int = 0
    # Trained for reranking (MatchNet --listwise): the depth it reorders, and the weight of the vector score in
    # the final order (retrieval/rerank.py: fuse), chosen on held-out data. 0, 0: a pair classifier, P(same) alone.
    depth: int = 0
    fusion_weight: float = 0.0


_DETAILS = {"encoder": EncoderDetails, "reranker": RerankerDetails}
_TUPLES = {"mean", "std", "representation", "calibration"}


@dataclass(frozen=True)
class Card:
    kind: str  # "encoder" | "reranker"
    name: str
    method: str  # encoders: "triplet" | "barlow"; rerankers: "matchnet" | "beit"
    base: str  # the registered encoder it was trained from, or whose embeddings or trunk it reads; "" for none
    data: str
    split: str
    hyper_parameters: dict  # the trainer's whole config, paths and enums as strings
    validation: dict  # {"held_out": what, "history": a row per epoch, "best": the kept epoch's row, "stopped": why}
    train_seconds: float
    created: str  # ISO 8601, UTC
    simsearch_version: str  # "" on a card migrated from a format that did not record it
    onnx_sha256: dict  # ONNX file name in the model's folder -> its sha256
    details: EncoderDetails | RerankerDetails
    card_version: int = CARD_VERSION

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ModelError(f"unknown kind of model {self.kind!r} (kinds: {', '.join(KINDS)})")
        if not isinstance(self.details, _DETAILS[self.kind]):
            raise ModelError(f"{self.kind} card with {type(self.details).__name__} instead of {_DETAILS[self.kind].__name__}")
        missing = [k for k in BEST_FIELDS[self.kind] if k not in self.validation.get("best", {})]
        if missing or "stopped" not in self.validation:
            raise ModelError(f"validation lacks {', '.join(missing or ['stopped'])}")
        unhashed = [f for f in ONNX_FILES[self.kind] if f not in self.onnx_sha256]
        if unhashed:
            raise ModelError(f"no sha256 of {', '.join(unhashed)}")

    @classmethod
    def load(cls, path: Path, kind: str | None = None) -> Card:
        """Read, migrate and validate a card; kind: the kind a registry expects. Any problem is a ModelError."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: cannot read the model card ({e})") from None
        try:
            card = cls.from_dict(data)
        except ModelError as e:
            raise ModelError(f"{path}: {e}") from None
        if kind is not None and card.kind != kind:
            raise ModelError(f"{path}: the card of {card.kind} {card.name!r} where a {kind} was expected")
        return card

    @classmethod
    def from_dict(cls, data: dict) -> Card:
        if not isinstance(data, dict):
            raise ModelError("not a model card")
        version = data.get("card_version", 0)
        if not isinstance(version, int):
            raise ModelError(f"card_version {version!r} is not a number")
        if version > CARD_VERSION:
            raise ModelError(f"model card version {version} was written by a newer simsearch (this one reads up to "
                             f"version {CARD_VERSION}); upgrade simsearch to use this model")
        data = _migrate(data, version) if version < CARD_VERSION else data
        try:
            details = _DETAILS[data["kind"]]
            # JSON gives lists where the details hold tuples (mean, std, representation).
            values = {k: tuple(v) if k in _TUPLES else v for k, v in data["details"].items()}
            return cls(**{**data, "details": details(**values)})
        except (KeyError, TypeError, AttributeError) as e:  # a missing, unexpected or mistyped field
            raise ModelError(f"not a valid version {CARD_VERSION} model card ({type(e).__name__}: {e})") from None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def summary(self) -> str:
        """One line: what it is, what it was trained on, and its best held-out figures."""
        best, d = self.validation["best"], self.details
        if self.kind == "encoder":
            what = f"{d.dim}-d {self.method} from {self.base}"
            scores = f"hit@1 {best['hit1']:.3f}, hit@10 {best['hit10']:.3f}"
            checks = self.validation.get("checks")
            if checks:
                scores += f"; against {self.base} on {checks['split']}: {checks_summary(checks)}"
        else:
            reads = f"{self.base} embeddings" if d.input == "encoder" else f"{d.image_size}px pixels"
            what = f"{self.method}{f' ({d.tower} tower)' if d.tower else ''} on {reads}"
            what += f" ({d.source})" if d.source else ""
            scores = f"balanced accuracy {best['balanced_accuracy']:.3f}, ROC AUC {best['roc_auc']:.3f}"
            if "hit1_before" in best:
                scores += (f"; reranking its top {d.depth}: hit@1 {100 * best['hit1_before']:.1f} -> "
                           f"{100 * best['hit1']:.1f}, hit@10 {100 * best['hit10_before']:.1f} -> "
                           f"{100 * best['hit10']:.1f} (vector score weight {d.fusion_weight:g})")
        return (f"{what}, trained on {Path(self.data).name} ({self.split}) in {self.train_seconds:.0f}s: held-out "
                f"{scores} (epoch {best['epoch']}; {self.validation['stopped']})")


CHECK_NAMES = {"in_domain": "in-domain", "unseen": "unseen classes", "near_dup": "near-duplicates"}


def checks_summary(checks: dict) -> str:
    """hit@1 of each of an encoder's checks (evaluation/generalisation.py), and its difference to the base, in points."""
    return ", ".join(f"{label} hit@1 {100 * checks[name]['model']['hit1']:.1f} "
                     f"({100 * (checks[name]['model']['hit1'] - checks[name]['base']['hit1']):+.1f})"
                     for name, label in CHECK_NAMES.items() if name in checks)


def _from_v0(old: dict) -> dict:
    """A reranker's card of version 0 (no card_version)."""
    if "input" not in old or "arch" not in old:
        raise ModelError("not a model card (no card_version, and not an unversioned reranker card)")
    v = old["validation"]
    return {
        "kind": "reranker", "name": old["name"], "method": old["arch"], "base": old.get("encoder", ""),
        "data": old["data"], "split": old["split"], "hyper_parameters": old["hyper_parameters"],
        "validation": {"held_out": v.get("held_out", ""), "history": v.get("history", []),
                       "best": {k: x for k, x in v.items() if k not in ("held_out", "history", "stopped")},
                       "stopped": v.get("stopped", "")},
        "train_seconds": old["train_seconds"], "created": old.get("created", ""), "simsearch_version": "",
        "onnx_sha256": old.get("onnx_sha256", {}),
        "details": {"input": old["input"], "image_size": old.get("image_size", 0),
                    "representation": old.get("representation", []), "tower": old.get("tower", ""),
                    "source": old.get("source", ""), "trainable_parameters": old.get("trainable_parameters", 0)},
    }


def _from_v1(old: dict) -> dict:
    """An encoder's card of version 1."""
    details = {k: old[k] for k in ("base_key", "dim", "image_size", "mean", "std", "crop_fraction", "head")}
    return {
        "kind": "encoder", "name": old["name"], "method": old["method"], "base": old["base"], "data": old["data"],
        "split": old["split"], "hyper_parameters": old["hyper_parameters"], "validation": old["validation"],
        "train_seconds": old["train_seconds"], "created": old.get("created", ""),
        "simsearch_version": old.get("simsearch_version", ""), "onnx_sha256": {MODEL: old["onnx_sha256"]},
        "details": details,
    }


def _migrate(old: dict, version: int) -> dict:
    """An older card in this version's layout."""
    if version in (2, 3):  # versions 3 and 4 only added fields whose defaults say what the older one meant
        return {**old, "card_version": CARD_VERSION}
    if version not in (0, 1):
        raise ModelError(f"unknown model card version {version}")
    try:
        return (_from_v0 if version == 0 else _from_v1)(old)
    except (KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"a version {version} model card without a field it needs ({type(e).__name__}: {e})") from None
