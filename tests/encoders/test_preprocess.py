"""Each preprocessing policy's geometry on synthetic images: where a known shape lands, and what is kept."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from simsearch.encoders.preprocess import decode_side, fit, to_input
from simsearch.encoders.spec import Preprocess

S = 224


def marked(w: int, h: int) -> Image.Image:
    """A w x h grey image with a 10%-wide red bar at its left edge and a blue bar at its right edge."""
    im = Image.new("RGB", (w, h), (127, 127, 127))
    d = ImageDraw.Draw(im)
    bar = max(1, w // 10)
    d.rectangle((0, 0, bar - 1, h - 1), fill=(255, 0, 0))
    d.rectangle((w - bar, 0, w - 1, h - 1), fill=(0, 0, 255))
    return im


def red(a: np.ndarray) -> np.ndarray:
    return (a[..., 0] > 200) & (a[..., 2] < 60)


def blue(a: np.ndarray) -> np.ndarray:
    return (a[..., 2] > 200) & (a[..., 0] < 60)


@pytest.mark.parametrize("policy", list(Preprocess))
def test_every_policy_gives_the_encoders_input_shape(lite0, policy):
    spec = lite0.with_preprocess(policy)
    for size in ((S, S), (640, 480), (100, 900), (7, 3)):
        x = to_input(marked(*size), spec)
        assert x.shape == (3, S, S) and x.dtype == np.float32


def test_resize_keeps_the_whole_image_stretched(lite0):
    a = np.asarray(fit(marked(600, 200), lite0.with_preprocess("resize")))
    cols_red, cols_blue = np.flatnonzero(red(a).all(axis=0)), np.flatnonzero(blue(a).all(axis=0))
    # Both edge bars survive, full height, each ~10% of the width (bicubic blurs a column at the edge).
    assert cols_red.min() == 0 and abs(len(cols_red) - S // 10) <= 2
    assert cols_blue.max() == S - 1 and abs(len(cols_blue) - S // 10) <= 2


def test_pad_keeps_the_whole_image_and_its_aspect_ratio_on_zero_padding(lite0):
    spec = lite0.with_preprocess("pad")
    x = to_input(marked(600, 200), spec)  # 3:1 -> a 224 x 75 band in the middle
    band = round(200 * S / 600)
    top = (S - band) // 2
    assert np.all(x[:, :top - 1] == 0) and np.all(x[:, top + band + 1:] == 0)  # padding is the mean: exactly 0
    a = np.asarray(fit(marked(600, 200), spec))
    assert red(a[top + 2:top + band - 2, :20]).all() and blue(a[top + 2:top + band - 2, -20:]).all()
    tall = np.asarray(fit(marked(200, 600), spec))  # 1:3 -> a 75-wide column, both bars inside it
    assert red(tall).any() and blue(tall).any() and (tall[:, :top - 1] == 127).all()


def test_crop_cuts_the_edges_of_a_wide_image(lite0):
    spec = lite0.with_preprocess("crop")
    a = np.asarray(fit(marked(600, 200), spec))
    assert not red(a).any() and not blue(a).any()  # the centre crop loses both edge bars
    square = np.asarray(fit(marked(256, 256), spec))  # even a square loses its outer 1/16 per side
    assert red(square).sum() < red(np.asarray(marked(S, S))).sum() / 2


def test_decode_side_lets_jpeg_draft_keep_enough_pixels(lite0):
    assert decode_side(lite0.with_preprocess("crop")) == 256
    assert decode_side(lite0.with_preprocess("resize")) == decode_side(lite0.with_preprocess("pad")) == S


def test_policy_is_part_of_the_key_and_crop_keeps_the_key_of_older_dbs(lite0):
    keys = {p: lite0.with_preprocess(p).key for p in Preprocess}
    assert len(set(keys.values())) == 3
    assert keys[Preprocess.crop] == f"efficientnet-lite0@{lite0.weights_sha256[:16]}"
    assert keys[Preprocess.resize].endswith("/resize") and keys[Preprocess.pad].endswith("/pad")
    with pytest.raises(ValueError):
        lite0.with_preprocess("squash")
