"""Is image B an edited copy of image A? Local features matched between them, checked by geometry and by pixels.

    feats = features_of(path, config)     # Features, or None when the file cannot be read
    verdict = verify(fa, fb, config)      # Verdict: inliers, mirrored, the map, the two pixel correlations
    config.accepts(verdict)               # is it a copy

Each image is read as grey, scaled so its longer side is `config.side` pixels (thumbnails are scaled up, so a
50-pixel copy and its original are described at one scale), and described by its keypoints (OpenCV
SIFT: on imagenet-samples copies it had no false match among 3,840 hard pairs where ORB had 1-25 at the same
recall, for 6x ORB's time; docs/explain-dupes.md). A pair is matched with Lowe's ratio test, and the matches that one
affine map explains (RANSAC, `config.reproj` pixels) are counted: an edited copy (crop, frame, border, resize,
aspect change, a few degrees of rotation, recompression, grey, colour filter, overlays on part of it) is one affine
map of its original. A mirrored copy is matched against A's mirror (`Features.mirrored`: SIFT's descriptors permuted, not
described again). The map must be plausible
(each axis scaled within 1/20..20, the two within 2x of each other, no flip).

Matches alone are fooled by what edits add: two screenshots of one app, or two memes with one caption, match on
their shared text. So the pixels decide: A's grey thumbnail is warped by the map onto B's, and `agreement` counts
the textured 8 x 8 blocks whose pixels correlate, where both show content (flat borders, frames and caption bars
cut away on each side: phash.content_box). Block by block, because a whole-overlap correlation also rewards two
different photos for sharing a layout of light and dark (0.77 for two photos under one caption bar). A copy's
blocks agree almost everywhere (at least 0.7 of them for every edit of the bench), a shared caption's or logo's
only on the caption or logo (0.23 at most among 2,880 hard pairs, 0.67 at most among 150 pairs of different
photos given the same caption, frame, logo, text or border). A copy too small for keypoints (a 50-pixel
thumbnail) is caught by the second check: the same block agreement between the two whole frames at SAME x SAME.

Features are small (keypoints as float16, descriptors and the thumbnail as uint8; `Features.to_bytes`) and are
cached in the db by content (Store.put_features), for the images that are in some candidate pair only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from simsearch.errors import ImageLoadError
from simsearch.indexer.images import load_rgb
from simsearch.indexer.phash import content_box

log = logging.getLogger(__name__)

THUMB = 128  # the grey thumbnail kept for the pixel checks, pixels on its longer side
SAME = 64  # the whole-frame check compares both images at SAME x SAME
BLOCK = 8  # the pixel checks compare blocks of BLOCK x BLOCK thumbnail pixels
BLOCK_NCC = 0.5  # a block agrees when its pixels correlate at least this much
FLAT_BLOCK = 3.0  # a block whose grey levels vary less than this (std) in both images says nothing
BAR_LEVELS, BAR_SHARE = 3, 0.5  # a frame or a bar: at least BAR_SHARE of it within BAR_LEVELS of its commonest grey
MIN_BLOCKS = 6  # fewer textured blocks than this in the overlap: no agreement
# SIFT's descriptor is 4 x 4 cells (rows, columns) x 8 orientation bins; a mirror maps cell row r to 3 - r and bin
# o to -o (mod 8). Measured: the permuted descriptors of a photo match its mirror's own (268 of 400 inliers).
_MIRROR_SIFT = np.arange(128).reshape(4, 4, 8)[::-1][:, :, (8 - np.arange(8)) % 8].ravel()


@dataclass(frozen=True)
class VerifyConfig:
    side: int = 384  # longer side the image is described at (pixels)
    features: int = 400  # keypoints kept per image (the strongest)
    ratio: float = 0.8  # Lowe's ratio test
    reproj: float = 4.0  # RANSAC reprojection threshold, pixels at `side`
    # A pair is a copy when one affine map explains at least min_inliers matches and the pixels agree under it
    # (min_warp), or when the two whole frames correlate at least min_frame. Chosen on the tune half of
    # `python -m simsearch.benchmarks dupes` (docs/explain-dupes.md).
    min_inliers: int = 15
    min_warp: float = 0.7
    min_frame: float = 0.9

    @property
    def key(self) -> str:
        """What cached features depend on: another side or count is another cache entry."""
        return f"sift-{self.side}-{self.features}-t{THUMB}"

    def accepts(self, v: Verdict) -> bool:
        return (v.inliers >= self.min_inliers and v.warp >= self.min_warp) or v.frame >= self.min_frame


@dataclass(frozen=True)
class Features:
    xy: np.ndarray  # (n, 2) float32 keypoint positions, pixels at the described size
    desc: np.ndarray  # (n, 128) uint8 SIFT descriptors
    size: tuple[int, int]  # the described size (width, height)
    thumb: np.ndarray  # (th, tw) uint8: the grey image at THUMB pixels on its longer side, for the pixel checks
    box: tuple[int, int, int, int]  # the thumbnail's content box (phash.content_box): left, top, right, bottom

    def to_bytes(self) -> bytes:
        n, d = self.desc.shape if len(self.desc) else (0, 0)
        head = np.array([n, d, *self.size, *self.thumb.shape, *self.box], dtype="<u4").tobytes()
        return head + self.xy.astype("<f2").tobytes() + self.desc.astype(np.uint8).tobytes() + self.thumb.tobytes()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Features:
        n, d, w, h, th, tw, *box = (int(x) for x in np.frombuffer(raw[:40], dtype="<u4"))
        at = 40 + 4 * n
        xy = np.frombuffer(raw[40:at], dtype="<f2").reshape(n, 2).astype(np.float32)
        desc = np.frombuffer(raw[at:at + n * d], dtype=np.uint8).reshape(n, d)
        thumb = np.frombuffer(raw[at + n * d:at + n * d + th * tw], dtype=np.uint8).reshape(th, tw)
        return cls(xy, desc, (w, h), thumb, tuple(box))

    def mirrored(self) -> Features:
        """The features of the horizontally mirrored image, without describing it again: keypoints at mirrored x,
        and each SIFT descriptor's 4 x 4 cells flipped top to bottom, its 8 orientation bins negated (in the
        keypoint's own frame a mirror flips one axis and every angle). Matches as the mirror's own features do."""
        tw = self.thumb.shape[1]
        left, top, right, bottom = self.box
        xy = np.column_stack([self.size[0] - 1 - self.xy[:, 0], self.xy[:, 1]]).astype(np.float32)
        desc = self.desc[:, _MIRROR_SIFT] if len(self.desc) else self.desc
        return Features(xy, desc, self.size, np.ascontiguousarray(self.thumb[:, ::-1]), (tw - right, top, tw - left, bottom))

    def content_mask(self) -> np.ndarray:
        """(th, tw) float32: 1 inside the content box, 0 on the flat borders and bars cut away."""
        left, top, right, bottom = self.box
        mask = np.zeros(self.thumb.shape, np.float32)
        mask[top:bottom, left:right] = 1.0
        return mask


@dataclass(frozen=True)
class Verdict:
    inliers: int  # matches explained by the best affine map (0: none found)
    mirrored: bool  # the map is between B and A's mirror
    matrix: np.ndarray | None = None  # (2, 3) affine map from A's described pixels to B's
    warp: float = 0.0  # correlation of B with A warped by the map, over both images' content
    frame: float = 0.0  # block agreement of the two whole frames (direct or mirrored), at SAME x SAME
    derived: int = 0  # which side the map says was made from the other: 1 B (a crop of A, or A with a frame, border or
    # caption added), -1 A, 0 neither (resized, recompressed, recoloured, mirrored: the pixels and bytes tell)


def _cv2():
    import cv2  # OpenCV is imported on the first verification only: `query` never needs it

    cv2.setNumThreads(1)  # callers parallelise over images and pairs
    return cv2


def described(grey: np.ndarray, config: VerifyConfig) -> Features:
    """Features of a grey image (h, w) uint8, scaled so its longer side is config.side."""
    cv2 = _cv2()
    h, w = grey.shape
    f = config.side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    img = cv2.resize(grey, size, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC)
    t = THUMB / max(h, w)
    thumb = cv2.resize(grey, (max(1, round(w * t)), max(1, round(h * t))), interpolation=cv2.INTER_AREA)
    box = content_box(thumb.astype(np.float32))
    kps, desc = cv2.SIFT_create(nfeatures=config.features).detectAndCompute(img, None)
    if desc is None or not kps:
        return Features(np.empty((0, 2), np.float32), np.empty((0, 0), np.uint8), size, thumb, box)
    desc = np.clip(np.rint(desc), 0, 255)  # SIFT's descriptors are floats in 0..255: a byte each loses nothing
    return Features(np.array([k.pt for k in kps], np.float32), desc.astype(np.uint8), size, thumb, box)


def grey_of(path: str, config: VerifyConfig) -> np.ndarray:
    """The image at `path` as grey uint8 (h, w), decoded at reduced scale when large."""
    im = load_rgb(path, min_side=config.side // 2)
    return np.asarray(im.convert("L"))


def features_of(path: str, config: VerifyConfig) -> Features | None:
    """The features of the image at `path`, or None when the file cannot be read."""
    try:
        grey = grey_of(path, config)
    except ImageLoadError as e:
        log.debug("cannot verify %s", e)
        return None
    return described(grey, config)


def _match(a: Features, b: Features, config: VerifyConfig) -> tuple[np.ndarray, np.ndarray]:
    """Indices (m,), (m,) of A's and B's keypoints that pass the ratio test."""
    if len(a.desc) < 2 or len(b.desc) < 2:
        return np.empty(0, int), np.empty(0, int)
    pairs = _cv2().BFMatcher(_cv2().NORM_L2).knnMatch(a.desc.astype(np.float32), b.desc.astype(np.float32), k=2)
    good = [(m.queryIdx, m.trainIdx) for m, *rest in pairs if not rest or m.distance < config.ratio * rest[0].distance]
    if not good:
        return np.empty(0, int), np.empty(0, int)
    ia, ib = np.array(good).T
    return ia, ib


def _plausible(m: np.ndarray) -> bool:
    """An affine map an edit makes: each axis scaled within 1/20..20, the two axes within 2x of each other."""
    sx, sy = np.linalg.norm(m[:, 0]), np.linalg.norm(m[:, 1])
    if not (0.05 < sx < 20 and 0.05 < sy < 20):
        return False
    return 0.5 < sx / sy < 2.0 and np.linalg.det(m[:, :2]) > 0


def agreement(x: np.ndarray, y: np.ndarray, inside: np.ndarray | None = None) -> float:
    """The share of the textured BLOCK x BLOCK blocks of two aligned grey images (h, w) whose pixels correlate
    (>= BLOCK_NCC): 1 for the same picture, even where an overlay or a recompression spoils some blocks; the share
    of their shared captions or logos for two different photos that carry them, since their photos disagree.
    Blocks less than 3/4 inside `inside` and blocks flat in both images do not count; 0 when under MIN_BLOCKS count."""
    h, w = (d - d % BLOCK for d in x.shape)
    def blocks(z):  # (h, w) -> (h/B * w/B, B*B)
        return z[:h, :w].reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK).swapaxes(1, 2).reshape(-1, BLOCK * BLOCK)
    bx, by = blocks(x.astype(np.float32)), blocks(y.astype(np.float32))
    keep = np.ones(len(bx), bool) if inside is None else blocks(inside.astype(np.float32)).mean(1) >= 0.75
    bx, by = bx[keep] - bx[keep].mean(1, keepdims=True), by[keep] - by[keep].mean(1, keepdims=True)
    sx, sy = np.sqrt((bx * bx).mean(1)), np.sqrt((by * by).mean(1))
    textured = (sx > FLAT_BLOCK) | (sy > FLAT_BLOCK)
    if textured.sum() < MIN_BLOCKS:
        return 0.0
    r = (bx * by).mean(1)[textured] / np.maximum(sx[textured] * sy[textured], 1e-6)
    return float(np.mean(r >= BLOCK_NCC))


def same_frame(a: Features, b: Features) -> float:
    """Correlation of the two whole frames at SAME x SAME, direct or mirrored (the better): a copy that was only
    resized, recompressed, re-coloured, greyed, stretched or mirrored correlates near 1 with its original."""
    cv2 = _cv2()
    ta = cv2.resize(a.thumb, (SAME, SAME), interpolation=cv2.INTER_AREA)
    tb = cv2.resize(b.thumb, (SAME, SAME), interpolation=cv2.INTER_AREA)
    return max(agreement(ta, tb), agreement(ta[:, ::-1], tb))


def warped(a: Features, b: Features, m: np.ndarray) -> float:
    """Correlation of B's thumbnail with A's warped onto it by m (A's described pixels -> B's), over the overlap:
    a copy's overlap is the same picture; two photos that share only a caption or a logo differ beside it."""
    cv2 = _cv2()
    ta, mask_a = a.thumb, a.content_mask()
    sa, sb = ta.shape[1] / a.size[0], b.thumb.shape[1] / b.size[0]
    # thumbnail pixels: x_tb = sb * (M @ (x_ta / sa))
    mt = np.column_stack([m[:, :2] * (sb / sa), m[:, 2] * sb]).astype(np.float64)
    h, w = b.thumb.shape
    wa = cv2.warpAffine(np.ascontiguousarray(ta).astype(np.float32), mt, (w, h), flags=cv2.INTER_LINEAR)
    # Only where both show their content: frames, borders and caption bars cut away on either side.
    inside = cv2.warpAffine(np.ascontiguousarray(mask_a), mt, (w, h), flags=cv2.INTER_NEAREST) > 0.5
    inside &= b.content_mask() > 0.5
    return agreement(wa, b.thumb, inside)


def _inliers(xa: np.ndarray, xb: np.ndarray, config: VerifyConfig) -> Verdict:
    """The affine map most matches agree on (A's keypoints xa (m, 2) -> B's xb (m, 2)), and its inliers."""
    if len(xa) < 3:
        return Verdict(0, False)
    cv2 = _cv2()
    m, mask = cv2.estimateAffine2D(xa, xb, method=cv2.RANSAC, ransacReprojThreshold=config.reproj,
                                   maxIters=2000, confidence=0.995, refineIters=10)
    if m is None or not _plausible(m):
        return Verdict(0, False)
    return Verdict(int(mask.sum()), False, m)


def _added_around(small: Features, big: Features, m: np.ndarray) -> bool:
    """Whether the part of `big` that the frame of `small` (mapped by m: small's described pixels -> big's) does not
    cover was added around it (a frame, a border, a caption bar: one colour but for its text), rather than being
    more of the photo (small is a crop of big): most of that part within BAR_LEVELS grey levels of its commonest
    level. Photos vary more, even where flat to the eye (water, sky)."""
    cv2 = _cv2()
    ss, sb = small.thumb.shape[1] / small.size[0], big.thumb.shape[1] / big.size[0]
    mt = np.column_stack([m[:, :2] * (sb / ss), m[:, 2] * sb]).astype(np.float64)
    h, w = big.thumb.shape
    covered = cv2.warpAffine(np.ones(small.thumb.shape, np.float32), mt, (w, h), flags=cv2.INTER_NEAREST)
    covered = cv2.dilate(covered, np.ones((3, 3), np.uint8))  # the seam belongs to neither
    rest = big.thumb[covered < 0.5].astype(np.int32)
    if rest.size < 16:
        return False
    mode = np.bincount(rest, minlength=256).argmax()
    return float(np.mean(np.abs(rest - mode) <= BAR_LEVELS)) >= BAR_SHARE


def _inside(m: np.ndarray, size_from: tuple[int, int], size_to: tuple[int, int]) -> tuple[bool, float]:
    """(whether the frame of size_from lies inside size_to's under the map m (within 3%), the share of size_to's
    area it covers)."""
    w, h = size_from
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], np.float64) @ m.T
    tw, th = size_to
    inside = bool(np.all((corners[:, 0] >= -0.03 * tw) & (corners[:, 0] <= 1.03 * tw)
                         & (corners[:, 1] >= -0.03 * th) & (corners[:, 1] <= 1.03 * th)))
    return inside, abs(np.linalg.det(m[:, :2])) * w * h / (tw * th)


def derived_side(m: np.ndarray | None, fa: Features, fb: Features) -> int:
    """Which image the map says was made from the other: when one frame lies inside the other and covers under 90%
    of it, the smaller is a crop of the larger (derived) if the rest of the larger is photo, and the larger is the
    smaller with a frame, border or caption added (derived) if the rest is flat. 1: B, -1: A, 0: neither."""
    if m is None:
        return 0
    a_in_b, a_cover = _inside(m, fa.size, fb.size)
    if a_in_b and a_cover < 0.9:
        return 1 if _added_around(fa, fb, m) else -1
    inv = _cv2().invertAffineTransform(m)
    b_in_a, b_cover = _inside(inv, fb.size, fa.size)
    if b_in_a and b_cover < 0.9:
        return -1 if _added_around(fb, fa, inv) else 1
    return 0


def verify(fa: Features, fb: Features, config: VerifyConfig) -> Verdict:
    """The best affine map between A and B, direct or mirrored (when the direct one is not a copy's), with the
    pixel correlations of both checks."""
    frame = same_frame(fa, fb)
    ia, ib = _match(fa, fb, config)
    v = _inliers(fa.xy[ia], fb.xy[ib], config)
    if v.matrix is not None:
        v = replace(v, warp=warped(fa, fb, v.matrix))
    if not (v.inliers >= config.min_inliers and v.warp >= config.min_warp):
        fa_m = fa.mirrored()
        ja, jb = _match(fa_m, fb, config)
        f = _inliers(fa_m.xy[ja], fb.xy[jb], config)
        if f.matrix is not None:
            f = replace(f, mirrored=True, warp=warped(fa_m, fb, f.matrix))
        if f.warp > v.warp:
            v = f
    return replace(v, frame=frame, derived=derived_side(v.matrix, fa.mirrored() if v.mirrored else fa, fb))
