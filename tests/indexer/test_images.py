"""Every kind of bad or unusual file: skipped with a one-line reason naming it, or converted to RGB."""

from __future__ import annotations

import io
import os
import struct

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


def _gray_photo() -> np.ndarray:
    """(H, W) uint8: a real photo in gray, the reference the deep and float files are made from."""
    with Image.open(sample_paths(1, start=10)[0]) as im:
        return np.asarray(im.convert("L"))


@pytest.mark.parametrize(
    "name, scale",
    [
        ("unit.tif", 1 / 255),
        ("unit.pfm", 1 / 255),
        ("overshoot.tif", 1.0019 / 255),  # [0, 1] but for resampling noise past 1.0
        ("bytes.tif", 1.0),  # floats in [0, 255]
    ],
)
def test_float_images_match_the_8bit_photo(tmp_path, name, scale):
    gray = _gray_photo()
    Image.fromarray(gray.astype(np.float32) * np.float32(scale)).save(tmp_path / name)  # mode "F"
    with Image.open(tmp_path / name) as im:
        assert im.mode == "F"
    out = np.asarray(load_rgb(tmp_path / name)).astype(int)
    assert out.shape == (*gray.shape, 3)
    assert np.abs(out - gray[..., None]).max() <= 1  # [0, 1] is scaled up, not truncated to black


def test_16bit_png_of_a_photo_matches_the_8bit_photo(tmp_path):
    gray = _gray_photo()
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "deep.png"))[..., 1], gray)


@pytest.mark.parametrize(
    "name, value, reason",
    [
        ("nan.tif", np.nan, "NaN or infinity"),
        ("inf.tif", np.inf, "NaN or infinity"),
        ("signed.tif", -0.5, "negative pixel values"),  # a signed field, not intensities
        ("huge.tif", 1e6, "beyond 16 bits"),
    ],
)
def test_unusable_float_images_are_skipped_with_a_reason(tmp_path, name, value, reason):
    a = _gray_photo().astype(np.float32) / 255
    a[:10, :10] = value
    Image.fromarray(a).save(tmp_path / name)
    with pytest.raises(ImageLoadError, match=reason) as info:
        load_rgb(tmp_path / name)
    assert str(info.value).startswith(f"{tmp_path / name}: ") and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\x00\x01\xb3\x14\x00\xf0\x13" + b"\xff" * 64,  # an MPEG-1 sequence header: PIL reads a size only
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\n",  # needs Ghostscript
    ],
)
def test_undecodable_formats_under_an_image_name_are_not_images(tmp_path, content):
    path = tmp_path / "renamed.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match="not an image"):
        load_rgb(path)


def _edited(fmt: str, mode: str, edit) -> bytes:
    with Image.open(sample_paths(1, start=20)[0]) as im:
        im = im.convert(mode)
        im.thumbnail((96, 96))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    data = bytearray(buf.getvalue())
    edit(data)
    return bytes(data)


def _zero_after(tag: bytes):
    def edit(data: bytearray) -> None:
        start = data.index(tag) + len(tag)
        data[start:] = bytes(len(data) - start)
    return edit


def _set(at: bytes | int, skip: int, value: bytes):
    def edit(data: bytearray) -> None:
        start = (data.index(at) if isinstance(at, bytes) else at) + skip
        data[start:start + len(value)] = value
    return edit


# Found by tests/indexer/test_fuzz.py: decoders that fail on a corrupt header or payload with
# exception types other than OSError/ValueError, which used to escape load_rgb and stop the index run.
@pytest.mark.parametrize(
    "name, fmt, mode, edit, reason",
    [
        ("bad-compression.blp", "BLP", "P", _set(4, 0, struct.pack("<i", 7)), "corrupt image .BLPFormatError"),
        ("bad-pixel-format.dds", "DDS", "RGB", _set(80, 0, struct.pack("<I", 0x7F00)), "corrupt image .NotImplementedError"),
        # An 'ispe' box claiming 40000 x 40000: refused by our pixel limit, or first by libheif's own
        # (a RuntimeError), depending on which of the file's images the box describes.
        ("huge.heic", "HEIF", "RGB", _set(b"ispe", 8, struct.pack(">II", 40000, 40000)),
         "too many pixels|corrupt image .RuntimeError: .*Security limit exceeded"),
        ("blank-payload.avif", "AVIF", "RGB", _zero_after(b"mdat"), "corrupt image .RuntimeError"),
    ],
)
def test_decoder_specific_errors_are_one_line_reasons(tmp_path, name, fmt, mode, edit, reason):
    path = tmp_path / name
    path.write_bytes(_edited(fmt, mode, edit))
    with pytest.raises(ImageLoadError, match=reason) as info:
        load_rgb(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
