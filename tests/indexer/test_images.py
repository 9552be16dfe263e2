"""Every kind of bad or unusual file: skipped with a one-line reason naming it, or converted to RGB."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from simsearch.errors import ImageLoadError
from simsearch.indexer.images import load_rgb

from ..conftest import sample_paths


def _jpeg_bytes(tmp_path):
    return sample_paths(1)[0].read_bytes()


@pytest.mark.parametrize(
    "name, make, reason",
    [
        ("empty.jpg", lambda p, b: p.write_bytes(b""), "not an image"),
        ("truncated.jpg", lambda p, b: p.write_bytes(b[: len(b) // 3]), "corrupt or truncated"),
        ("notes.jpg", lambda p, b: p.write_text("this is not a picture\n" * 20), "not an image"),
        ("header-only.png", lambda p, b: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30), "corrupt or truncated|not an image"),
    ],
)
def test_bad_files_raise_one_line_reason_naming_the_file(tmp_path, name, make, reason):
    path = tmp_path / name
    make(path, _jpeg_bytes(tmp_path))
    with pytest.raises(ImageLoadError, match=reason) as info:
        load_rgb(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "\n" not in msg


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (4000, 3000)).save(path)
    with pytest.raises(ImageLoadError, match="too many pixels"):
        load_rgb(path, max_pixels=10_000_000)
    assert load_rgb(path, max_pixels=20_000_000).size == (4000, 3000)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read files without permission")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.jpg"
    path.write_bytes(_jpeg_bytes(tmp_path))
    path.chmod(0)
    with pytest.raises(ImageLoadError, match="permission denied"):
        load_rgb(path)


def test_modes_become_rgb(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200
    cases = {
        "gray.png": Image.fromarray(rgb[..., 0]),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "alpha.png": Image.fromarray(np.dstack([rgb, np.zeros((8, 8), np.uint8)]), "RGBA"),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "deep.png": Image.fromarray((np.full((8, 8), 40000)).astype(np.uint16)),
    }
    for name, im in cases.items():
        im.save(tmp_path / name)
    out = {name: np.asarray(load_rgb(tmp_path / name)) for name in cases}
    assert all(a.shape == (8, 8, 3) and a.dtype == np.uint8 for a in out.values())
    assert out["gray.png"][0, 0].tolist() == [200, 200, 200]
    assert out["palette.png"][0, 0, 0] > 150
    assert out["alpha.png"][0, 0].tolist() == [255, 255, 255]  # fully transparent -> white, not black
    assert abs(int(out["cmyk.jpg"][0, 0, 0]) - 200) < 10
    assert abs(int(out["deep.png"][0, 0, 0]) - 40000 * 255 // 65535) <= 1  # rescaled, not clipped to 255


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    im.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg").size == (20, 40)


def test_draft_decoding_keeps_the_requested_side(tmp_path):
    full = load_rgb(sample_paths(1)[0])
    drafted = load_rgb(sample_paths(1)[0], min_side=64)
    assert min(drafted.size) >= 64 and drafted.size[0] <= full.size[0]


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 10), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert np.asarray(load_rgb(tmp_path / "anim.gif"))[0, 0, 0] > 200
