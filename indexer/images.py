"""Reading a file as an RGB image, or failing with a one-line reason that names the file."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from simsearch.errors import ImageLoadError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

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
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageLoadError(f"{path}: too many pixels ({w}x{h} > {max_pixels:,})")
            if min_side is not None and im.format == "JPEG":
                im.draft("RGB", (min_side, min_side))  # keeps both sides >= min_side
            im = ImageOps.exif_transpose(im)  # also forces the decode
            return _to_rgb(im)
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: no such file") from None
    except PermissionError:
        raise ImageLoadError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{path}: too many pixels ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        # PIL reports truncated and corrupt data as OSError/SyntaxError/ValueError.
        raise ImageLoadError(f"{path}: corrupt or truncated image ({e})") from None
    except MemoryError:
        raise ImageLoadError(f"{path}: out of memory while decoding") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: PIL's convert("RGB") clips to 255 (all white), so rescale.
        a = np.asarray(im, dtype=np.float32)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent regions become white, as most viewers show them, not the black of a plain drop.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
