"""Reading a file as an RGB image, or failing with a one-line reason that names the file."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import pillow_heif
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from simsearch.errors import ImageLoadError

log = logging.getLogger(__name__)

# HEIC/HEIF (every iPhone photo since iOS 11) has no decoder in Pillow itself. Registering changes
# Pillow's process-wide format registry, so it is done once here, where every decode goes through.
# AVIF needs no plugin: Pillow decodes it itself (its wheels bundle libavif).
pillow_heif.register_heif_opener()
Image.init()  # import every Pillow plugin, so OPEN and registered_extensions() below are complete

# Formats Pillow identifies but cannot decode by itself, so a file of them would be skipped on every
# run: EPS/PS are rendered by the external Ghostscript program; MPEG is read for its frame size only;
# stub formats (BUFR, GRIB, HDF5, WMF) decode only through a handler the application registers.
_UNDECODABLE = frozenset({"EPS", "MPEG"}) | {
    fmt for fmt, (factory, _) in Image.OPEN.items()
    if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)
}
# Also passed to Image.open, so content sniffing never picks them either: an EPS file named .jpg is
# "not an image", and is never handed to Ghostscript (an external interpreter run on untrusted input
# wherever it happens to be installed).
DECODABLE_FORMATS = tuple(fmt for fmt in Image.OPEN if fmt not in _UNDECODABLE)
# MPO (multi-picture JPEG from stereo and some phone cameras) has no opener of its own: the JPEG one reads it.
_OPENED_AS = {"MPO": "JPEG"}

# Every extension of a format decodable above, e.g. .jpg .png .webp .tif .ppm .pgm .pbm .jfif .jp2 .avif .heic .
IMAGE_EXTENSIONS = frozenset(
    ext.lower() for ext, fmt in Image.registered_extensions().items()
    if _OPENED_AS.get(fmt, fmt) in DECODABLE_FORMATS
)

# PIL warns above MAX_IMAGE_PIXELS and only raises at twice that; we refuse at the limit itself,
# from the header, before any pixel is decoded.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def load_rgb(
    path: str | os.PathLike,
    min_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    data: bytes | None = None,
) -> Image.Image:
    """Decode `path` (or `data`, its bytes already read) as an upright RGB image.

    min_side: the caller only needs the shorter side to be at least this many pixels, which lets
    the JPEG decoder skip most of the work by decoding at 1/2, 1/4 or 1/8 scale (Image.draft).
    """
    path = Path(path)
    if data is not None and not data:
        raise ImageLoadError(f"{path}: empty file")
    try:
        with Image.open(io.BytesIO(data) if data is not None else path, formats=DECODABLE_FORMATS) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageLoadError(f"{path}: too many pixels ({w}x{h} > {max_pixels:,})")
            if min_side is not None and im.format == "JPEG":
                im.draft("RGB", (min_side, min_side))  # keeps both sides >= min_side
            im = ImageOps.exif_transpose(im)  # also forces the decode
            return _to_rgb(im, path)
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: no such file") from None
    except PermissionError:
        raise ImageLoadError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{path}: too many pixels ({_one_line(e)})") from None
    except MemoryError:
        raise ImageLoadError(f"{path}: out of memory while decoding") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # How PIL and pillow-heif report truncated and corrupt data.
        raise ImageLoadError(f"{path}: corrupt or truncated image ({_one_line(e)})") from None
    except Exception as e:
        # Corrupt bytes reach Pillow's many format parsers and its plugins, and they do not all report
        # it as OSError/ValueError: fuzzing (tests/indexer/test_fuzz.py) found RuntimeError from the
        # AVIF decoder and from libheif's limits, NotImplementedError from DDS, BLPFormatError from
        # BLP; a parser may equally fail with struct.error, IndexError, ZeroDivisionError, or a warning
        # turned into an error by -W error. The bytes are untrusted, so this is one bad file to skip,
        # never a reason to stop an index run. MemoryError is reported above; interrupts
        # (BaseException) pass. The traceback stays available at debug level.
        log.debug("decoding %s failed", path, exc_info=True)
        raise ImageLoadError(f"{path}: corrupt image ({type(e).__name__}: {_one_line(e)})") from None


def header_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the image header, decoding no pixel; (0, 0) when the file is gone or unreadable
    (untrusted bytes fail in many ways: the size is advisory, where load_rgb's failures are reasons)."""
    try:
        with Image.open(path, formats=DECODABLE_FORMATS) as im:
            return im.size
    except Exception:  # noqa: BLE001
        log.debug("cannot read the header of %s", path, exc_info=True)
        return 0, 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _to_rgb(im: Image.Image, path: Path) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        # 16-bit, 32-bit and float images: PIL's convert("RGB") clips to 255 (all white) and
        # truncates floats in [0, 1] to 0 (all black), so rescale to 8 bits ourselves.
        im = Image.fromarray(_to_uint8(np.asarray(im, dtype=np.float32), im.mode, path), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent regions become white, as most viewers show them, not the black of a plain drop.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _to_uint8(a: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """(H, W) 16-bit, 32-bit or float pixel values -> (H, W) uint8, by the value range they use."""
    if not np.isfinite(a).all():
        raise ImageLoadError(f"{path}: pixel values include NaN or infinity")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    # Half an 8-bit step past either end of a range is rounding noise (from resampling, say).
    if mode.startswith("I;16"):
        top = 65535.0
    elif mode == "F" and hi <= 1.0 + 1 / 510:
        top = 1.0  # the usual range of float images (numpy and scientific exports)
    elif hi <= 255.0:
        top = 255.0
    elif hi <= 65535.0:
        top = 65535.0
    else:
        raise ImageLoadError(f"{path}: pixel values up to {hi:g}, beyond 16 bits: no known range to scale from")
    # More than that below 0 means the values are not intensities in [0, top] (a signed or
    # normalised field), and any guess at their range would be silently wrong.
    if lo < -top / 510:
        raise ImageLoadError(f"{path}: negative pixel values (down to {lo:g}): no known range to scale from")
    return np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
