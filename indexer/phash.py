"""Perceptual hashes of an image, computed at index time and stored in the db (`Store.put_hashes`).

Two 64-bit DCT hashes per image, both of a 32 x 32 grey thumbnail:
- `full`: of the whole frame. Thumbnails and recompressions keep it within a few bits, where a CNN embedding of
  a 50-pixel thumbnail is far from its original's (cosine 0.29 at worst on imagenet-samples).
- `content`: of the frame's content box, the image with flat borders, frames and caption bars cut away
  (`content_box`), so a photo pasted into a screenshot-like frame hashes near its original. Equal to `full`
  when nothing is cut.

A bit is the sign of one of the 8 x 8 lowest DCT coefficients (the DC term's is always 1), not its side of the
median as in the classic pHash: a horizontal mirror then only flips the signs of the odd horizontal frequencies,
so the hash of the mirrored image is `mirrored(h) = h ^ MIRROR_MASK`, and mirrored copies are found from the stored
hash alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

SIDE = 32  # the grey thumbnail's side
BITS = 8  # the BITS x BITS lowest frequencies make the hash
DIGEST_SIDE = 64  # the pixel digest's side
# Images are decoded for hashing with at least this many pixels on their shorter side: the default encoder's own
# decode side (224 px, letterboxed), so indexing with it decodes each image once for both.
DECODE_SIDE = 224
WORK_SIDE = 256  # the content box is found on a copy this large (longer side)
FLAT = 12  # a pixel within this many grey levels of the border's colour belongs to a flat border or bar
FLAT_SHARE = 0.7  # a row or column with at least this share of its pixels near its median is flat
MIN_CONTENT = 0.25  # a content box smaller than this share of either side is not trusted (a flat image)


def _dct_matrix(n: int) -> np.ndarray:
    """(n, n) orthonormal DCT-II: X = D @ x @ D.T."""
    k = np.arange(n)[:, None]
    d = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2 / n)
    d[0] /= np.sqrt(2)
    return d.astype(np.float64)


_D = _dct_matrix(SIDE)[:BITS]  # (BITS, SIDE): only the low frequencies are needed
# bit (u, v) = row frequency u, column frequency v, at position u * BITS + v; a mirror flips the odd v.
MIRROR_MASK = int(sum(1 << (u * BITS + v) for u in range(BITS) for v in range(1, BITS, 2)))


@dataclass(frozen=True)
class Hashes:
    full: int  # of the whole frame
    content: int  # of the content box (== full when nothing is cut)
    box: tuple[float, float, float, float]  # the content box as shares of the width and height (left, top, right, bottom)
    pixels: int  # 64 bits of a digest of the decoded pixels: equal for two files of the same pixels

    def to_bytes(self) -> bytes:
        return (np.array([self.full, self.content, self.pixels], dtype="<u8").tobytes()
                + np.array(self.box, "<f4").tobytes())

    @classmethod
    def from_bytes(cls, raw: bytes) -> Hashes:
        full, content, pixels = (int(x) for x in np.frombuffer(raw[:24], dtype="<u8"))
        return cls(full, content, tuple(float(x) for x in np.frombuffer(raw[24:40], dtype="<f4")), pixels)

    @property
    def content_share(self) -> float:
        """The content box's share of the frame's area."""
        left, top, right, bottom = self.box
        return (right - left) * (bottom - top)


def dct_hash(grey: np.ndarray) -> int:
    """The 64-bit hash of a (SIDE, SIDE) grey thumbnail: signs of its BITS x BITS lowest DCT coefficients."""
    coef = _D @ (grey.astype(np.float64) - 128.0) @ _D.T  # (BITS, BITS); centring only changes the DC term
    coef[0, 0] = 1.0  # its sign carries no information: fixed
    bits = (coef > 0).ravel()
    return int((bits.astype(np.uint64) << np.arange(BITS * BITS, dtype=np.uint64)).sum())


def mirrored(h: int | np.ndarray) -> int | np.ndarray:
    """The hash of the horizontally mirrored image."""
    return h ^ (MIRROR_MASK if isinstance(h, int) else np.uint64(MIRROR_MASK))


def _thumb(grey: Image.Image) -> np.ndarray:
    return np.asarray(grey.resize((SIDE, SIDE), Image.BOX), dtype=np.float32)


def _flat(line: np.ndarray) -> bool:
    """Whether a row or column is part of a flat border or bar: most of it within FLAT of its median (a
    caption's text strokes cover a fraction of its rows; a row of a photo is textured)."""
    return np.mean(np.abs(line - np.median(line)) <= FLAT) >= FLAT_SHARE


def content_box(grey: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the content of a grey image (h, w): what is left once flat borders, frames
    and caption bars are cut from its edges (each edge moves inward while its outermost row or column is flat,
    until none moves). The whole frame when that would leave less than MIN_CONTENT of a side (a flat image)."""
    h, w = grey.shape
    left, top, right, bottom = 0, 0, w, h
    moved = True
    while moved and right - left > 2 and bottom - top > 2:
        moved = False
        while bottom - top > 2 and _flat(grey[top, left:right]):
            top, moved = top + 1, True
        while bottom - top > 2 and _flat(grey[bottom - 1, left:right]):
            bottom, moved = bottom - 1, True
        while right - left > 2 and _flat(grey[top:bottom, left]):
            left, moved = left + 1, True
        while right - left > 2 and _flat(grey[top:bottom, right - 1]):
            right, moved = right - 1, True
    if right - left < MIN_CONTENT * w or bottom - top < MIN_CONTENT * h:
        return 0, 0, w, h
    return left, top, right, bottom


def hashes_of(img: Image.Image) -> Hashes:
    """Both hashes of an image (any mode), from a grey copy of at most WORK_SIDE pixels a side, and the digest of
    its pixels: of the RGB image at DIGEST_SIDE x DIGEST_SIDE, so a large JPEG decoded at a reduced scale (as
    `load_rgb(min_side=...)` does) and its same pixels in another file digest alike."""
    small = img.convert("RGB").resize((DIGEST_SIDE, DIGEST_SIDE), Image.BOX)
    digest = hashlib.blake2b(small.tobytes(), digest_size=8)
    pixels = int.from_bytes(digest.digest(), "little")
    grey = img.convert("L")
    if max(grey.size) > WORK_SIDE:
        grey = grey.copy()
        grey.thumbnail((WORK_SIDE, WORK_SIDE), Image.BOX)
    full = dct_hash(_thumb(grey))
    arr = np.asarray(grey, dtype=np.float32)  # (h, w)
    left, top, right, bottom = content_box(arr)
    h, w = arr.shape
    if (left, top, right, bottom) == (0, 0, w, h):
        return Hashes(full, full, (0.0, 0.0, 1.0, 1.0), pixels)
    content = dct_hash(_thumb(grey.crop((left, top, right, bottom))))
    return Hashes(full, content, (left / w, top / h, right / w, bottom / h), pixels)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between uint64 arrays a and b (broadcast)."""
    x = np.bitwise_xor(a, b)
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x)
    return np.unpackbits(np.ascontiguousarray(x).view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)
