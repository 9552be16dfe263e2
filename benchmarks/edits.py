"""A seeded copy maker: the edits that photo folders really hold, one function per edit.

    copy, quality = make_copy(img, "frame", rng)     # an RGB PIL image and the JPEG quality to save it at

Each edit draws its parameters from `rng` only, so a copy depends on (seed, photo, edit) and nothing else. The
ranges are the issue's: thumbnails of 10-30%, recompression at quality 20-70, crops keeping 50-95% of each side,
borders, frames and caption bars, mirror, grey, rotations of a few degrees, text and logo overlays, aspect changes
and colour filters, and the two combinations users reported (a light recompress and crop; a mirrored grey copy).
`LIGHT` names the edits whose target recall is 0.99 (the rest: 0.95).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

EDITS = ("recompress", "thumbnail", "crop_recompress", "crop", "border", "frame", "caption", "mirror", "grey",
         "mirror_grey", "rotate", "overlay", "logo", "aspect", "filter")
LIGHT = ("recompress", "thumbnail")  # recall target 0.99; every other edit 0.95
WORDS = ("holiday 2019", "IMG_4032.JPG", "sent from my phone", "© studio", "best day ever", "copy of copy",
         "screenshot", "family album", "look at this!", "for sale")


def make_copy(img: Image.Image, edit: str, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """One seeded copy of an RGB image under `edit`: (the copy, the JPEG quality to save it at)."""
    if edit not in _EDIT:
        raise ValueError(f"unknown edit {edit!r} (known: {', '.join(EDITS)})")
    return _EDIT[edit](img, rng)


def _q(rng: np.random.Generator) -> int:
    """The quality a copy that is not about recompression is saved at (a phone's or a web app's)."""
    return int(rng.integers(75, 96))


def _recompress(img, rng):
    return img, int(rng.integers(20, 71))


def _thumbnail(img, rng):
    f = rng.uniform(0.10, 0.30)
    return img.resize((max(8, round(img.width * f)), max(8, round(img.height * f))), Image.LANCZOS), _q(rng)


def _crop_box(img, rng, low, high):
    """A box keeping low-high of each side, anywhere in the frame."""
    w, h = img.size
    kw, kh = rng.uniform(low, high, 2)
    cw, ch = max(8, round(w * kw)), max(8, round(h * kh))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return x, y, x + cw, y + ch


def _crop(img, rng):
    return img.crop(_crop_box(img, rng, 0.50, 0.95)), _q(rng)


def _crop_recompress(img, rng):
    return img.crop(_crop_box(img, rng, 0.85, 0.97)), int(rng.integers(50, 71))


def _colour(rng):
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _border(img, rng):
    w, h = img.size
    side = rng.uniform(0.03, 0.15, 4)
    out = Image.new("RGB", (w + round(w * (side[0] + side[2])), h + round(h * (side[1] + side[3]))),
                    _colour(rng) if rng.random() < 0.5 else (255, 255, 255))
    out.paste(img, (round(w * side[0]), round(h * side[1])))
    return out, _q(rng)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(max(8, size))


def _frame(img, rng):
    """Screenshot-like: the photo scaled into a larger dark or light canvas with a title bar and a status line."""
    scale = rng.uniform(0.6, 1.0)
    pw, ph = max(8, round(img.width * scale)), max(8, round(img.height * scale))
    pad_x, top, bottom = round(pw * rng.uniform(0.05, 0.4)), round(ph * rng.uniform(0.08, 0.25)), \
        round(ph * rng.uniform(0.05, 0.2))
    bg = (20, 20, 22) if rng.random() < 0.5 else (245, 245, 245)
    fg = (230, 230, 230) if bg[0] < 128 else (30, 30, 30)
    out = Image.new("RGB", (pw + 2 * pad_x, ph + top + bottom), bg)
    out.paste(img.resize((pw, ph), Image.BILINEAR), (pad_x, top))
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, 0, out.width, max(4, top // 2)), fill=_colour(rng))
    draw.text((pad_x, top // 2 + 2), str(rng.choice(WORDS)), fill=fg, font=_font(max(8, top // 3)))
    draw.text((pad_x, top + ph + 2), str(rng.choice(WORDS)), fill=fg, font=_font(max(8, bottom // 2)))
    return out, _q(rng)


def _caption(img, rng):
    """A meme-style caption bar above or below the photo."""
    w, h = img.size
    bar = round(h * rng.uniform(0.10, 0.25))
    out = Image.new("RGB", (w, h + bar), (255, 255, 255) if rng.random() < 0.6 else (0, 0, 0))
    below = rng.random() < 0.5
    out.paste(img, (0, 0 if below else bar))
    fg = (0, 0, 0) if out.getpixel((0, h if below else 0))[0] > 128 else (255, 255, 255)
    ImageDraw.Draw(out).text((w // 20, (h if below else 0) + bar // 4), str(rng.choice(WORDS)), fill=fg,
                             font=_font(bar // 2))
    return out, _q(rng)


def _mirror(img, rng):
    return ImageOps.mirror(img), _q(rng)


def _grey(img, rng):
    return ImageOps.grayscale(img).convert("RGB"), _q(rng)


def _mirror_grey(img, rng):
    return ImageOps.grayscale(ImageOps.mirror(img)).convert("RGB"), _q(rng)


def _rotate(img, rng):
    """A few degrees either way, cropped to the largest upright box inside (no corners of fill)."""
    deg = rng.uniform(2, 8) * rng.choice([-1, 1])
    w, h = img.size
    out = img.rotate(deg, Image.BICUBIC, expand=False)
    a = np.radians(abs(deg))
    # the inner box of a w x h frame rotated by a (for small angles and w, h alike): shrink by the corners
    cw = (w * np.cos(a) - h * np.sin(a)) / np.cos(2 * a)
    ch = (h * np.cos(a) - w * np.sin(a)) / np.cos(2 * a)
    cw, ch = max(8, int(min(w, cw))), max(8, int(min(h, ch)))
    x, y = (w - cw) // 2, (h - ch) // 2
    return out.crop((x, y, x + cw, y + ch)), _q(rng)


def _overlay(img, rng):
    """Text over the photo: a watermark or a caption in the picture, 1-3 lines."""
    out = img.copy()
    draw = ImageDraw.Draw(out, "RGBA")
    size = max(8, round(min(img.size) * rng.uniform(0.06, 0.14)))
    for _ in range(int(rng.integers(1, 4))):
        x, y = int(rng.integers(0, max(1, img.width // 2))), int(rng.integers(0, max(1, img.height - size)))
        draw.text((x, y), str(rng.choice(WORDS)), font=_font(size),
                  fill=(*_colour(rng), int(rng.integers(150, 256))))
    return out, _q(rng)


def _logo(img, rng):
    """A semi-opaque logo (a disc and a bar with initials) in a corner, 10-25% of the short side."""
    out = img.copy()
    side = max(8, round(min(img.size) * rng.uniform(0.10, 0.25)))
    logo = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    d = ImageDraw.Draw(logo)
    d.ellipse((0, 0, side - 1, side - 1), fill=(*_colour(rng), 200))
    d.rectangle((side // 5, side * 2 // 5, side * 4 // 5, side * 3 // 5), fill=(*_colour(rng), 230))
    d.text((side // 4, side // 8), "SX", font=_font(side // 4), fill=(255, 255, 255, 255))
    m = max(1, side // 6)
    corner = [(m, m), (img.width - side - m, m), (m, img.height - side - m), (img.width - side - m, img.height - side - m)]
    out.paste(logo, corner[int(rng.integers(0, 4))], logo)
    return out, _q(rng)


def _aspect(img, rng):
    """One axis stretched or squeezed by 15-40% (a wrong-aspect export)."""
    f = rng.uniform(0.6, 0.85) if rng.random() < 0.5 else rng.uniform(1.15, 1.4)
    w, h = img.size
    size = (max(8, round(w * f)), h) if rng.random() < 0.5 else (w, max(8, round(h * f)))
    return img.resize(size, Image.BICUBIC), _q(rng)


def _filter(img, rng):
    """A phone app's colour filter: warm, cold, sepia, faded, vivid or a blurred-soft look."""
    kind = int(rng.integers(0, 6))
    x = np.asarray(img, dtype=np.float32) / 255
    if kind == 0:  # warm
        x = x * np.array([1.12, 1.0, 0.82], np.float32)
    elif kind == 1:  # cold
        x = x * np.array([0.85, 0.98, 1.15], np.float32)
    elif kind == 2:  # sepia
        m = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], np.float32)
        x = x @ m.T
    elif kind == 3:  # faded: lifted blacks, lower contrast
        x = 0.18 + 0.72 * x
    elif kind == 4:  # vivid: gamma and saturation
        x = x ** 0.8
    out = Image.fromarray(np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8))
    if kind == 4:
        out = ImageEnhance.Color(out).enhance(1.6)
    if kind == 5:  # soft
        out = ImageEnhance.Contrast(out.filter(ImageFilter.GaussianBlur(1.2))).enhance(1.15)
    return out, _q(rng)


_EDIT = {"recompress": _recompress, "thumbnail": _thumbnail, "crop_recompress": _crop_recompress, "crop": _crop,
         "border": _border, "frame": _frame, "caption": _caption, "mirror": _mirror, "grey": _grey,
         "mirror_grey": _mirror_grey, "rotate": _rotate, "overlay": _overlay, "logo": _logo, "aspect": _aspect,
         "filter": _filter}
