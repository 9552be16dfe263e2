"""Image -> model input array, driven only by the EncoderSpec (no torch).

The policy (spec.preprocess) decides what part of the image the encoder sees:
    resize  the whole image stretched to S x S
    pad     the whole image scaled to fit S x S, aspect ratio kept, centred on grey (letterbox)
    crop    shorter side scaled to S / crop_fraction, then the centre S x S (the ImageNet evaluation crop)
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from simsearch.encoders.spec import EncoderSpec, Preprocess


def decode_side(spec: EncoderSpec) -> int:
    """The shorter side the decoder must deliver (lets JPEG decode at 1/2, 1/4 or 1/8 scale)."""
    if spec.preprocess is Preprocess.crop:
        return int(round(spec.image_size / spec.crop_fraction))
    return spec.image_size


def _crop(im: Image.Image, spec: EncoderSpec) -> Image.Image:
    side = decode_side(spec)
    w, h = im.size
    scale = side / min(w, h)
    nw, nh = max(side, round(w * scale)), max(side, round(h * scale))
    s = spec.image_size
    if spec.clip:  # torchvision's CenterCrop, which CLIP towers were trained behind: offsets rounded half to even
        left, top = int(round((nw - s) / 2)), int(round((nh - s) / 2))
    else:
        left, top = (nw - s) // 2, (nh - s) // 2
    # Resample only the centre crop's source box: the same pixels as resize-then-crop (bicubic
    # support is taken from the whole image), at ~2/3 of the cost for a typical 4:3 photo.
    sx, sy = w / nw, h / nh
    return im.resize((s, s), Image.BICUBIC, box=(left * sx, top * sy, (left + s) * sx, (top + s) * sy))


def _pad(im: Image.Image, spec: EncoderSpec) -> Image.Image:
    s = spec.image_size
    w, h = im.size
    scale = s / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    # The grey is the normalisation mean: padding becomes exactly 0 in the model's input.
    canvas = Image.new("RGB", (s, s), tuple(int(round(m)) for m in spec.mean))
    canvas.paste(im.resize((nw, nh), Image.BICUBIC), ((s - nw) // 2, (s - nh) // 2))
    return canvas


def fit(im: Image.Image, spec: EncoderSpec) -> Image.Image:
    """RGB image of any size -> the S x S RGB image the encoder sees, by spec.preprocess."""
    if spec.preprocess is Preprocess.crop:
        return _crop(im, spec)
    if spec.preprocess is Preprocess.pad:
        return _pad(im, spec)
    return im.resize((spec.image_size, spec.image_size), Image.BICUBIC)


def to_input(im: Image.Image, spec: EncoderSpec) -> np.ndarray:
    """RGB image -> (3, S, S) float32 normalised as the encoder expects (S = spec.image_size)."""
    x = np.asarray(fit(im, spec), dtype=np.float32)  # (S, S, 3)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, S, S)
