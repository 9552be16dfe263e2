"""Verification of candidate pairs (retrieval/verify.py) on real photos: the affine map it finds against the map
each known edit applied, copies accepted, different photos refused, mirrored features, the cached form."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from simsearch.benchmarks.edits import make_copy
from simsearch.indexer.images import load_rgb
from simsearch.retrieval.verify import Features, VerifyConfig, described, features_of, verify

from ..conftest import sample_paths

CONFIG = VerifyConfig()


@pytest.fixture(scope="module")
def photos():
    return [load_rgb(p) for p in sample_paths(12)]


def feats(img: Image.Image, tmp_path, name: str, quality: int = 92) -> Features:
    path = tmp_path / f"{name}.jpg"
    img.save(path, quality=quality)
    return features_of(str(path), CONFIG)


def described_scale(img: Image.Image) -> float:
    """How features_of scales an image: its longer side becomes CONFIG.side."""
    return CONFIG.side / max(img.size)


def map_error(m: np.ndarray, truth: np.ndarray, box: tuple[float, float, float, float]) -> float:
    """The largest distance between where the two maps send a grid of points of A's described frame in `box`
    (what B shows of A: a map fitted there is extrapolated, not checked, outside it)."""
    xs, ys = np.meshgrid(np.linspace(box[0], box[2], 9), np.linspace(box[1], box[3], 9))
    p = np.column_stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    return float(np.abs(p @ m.T - p @ truth.T).max())


@pytest.mark.parametrize("k", range(4))
def test_the_map_of_a_crop_and_resize_is_the_known_one(photos, tmp_path, k):
    """B = A cropped at a known box and resized by a known factor (aspect changed too): the verified map from A's
    described pixels to B's equals the one the edit applied, to within 2 pixels at 384 (the reference)."""
    a = photos[k]
    rng = np.random.default_rng(k)
    w, h = a.size
    x0, y0 = int(w * rng.uniform(0.05, 0.2)), int(h * rng.uniform(0.05, 0.2))
    x1, y1 = int(w * rng.uniform(0.75, 0.95)), int(h * rng.uniform(0.75, 0.95))
    fx, fy = rng.uniform(0.5, 0.9), rng.uniform(0.5, 0.9)
    b = a.crop((x0, y0, x1, y1))
    b = b.resize((round(b.width * fx), round(b.height * fy)), Image.LANCZOS)
    fa, fb = feats(a, tmp_path, "a"), feats(b, tmp_path, "b")
    sa, sb = described_scale(a), described_scale(b)
    gx, gy = b.width / (x1 - x0), b.height / (y1 - y0)  # the resize, exactly as rounded
    # described A -> original A (/ sa) -> crop (- x0) -> resize (* g) -> described B (* sb); pixel centres kept
    truth = np.array([[sb * gx / sa, 0, sb * (gx * (0.5 - x0) - 0.5) + 0.5 * (1 - sb * gx / sa)],
                      [0, sb * gy / sa, sb * (gy * (0.5 - y0) - 0.5) + 0.5 * (1 - sb * gy / sa)]])
    v = verify(fa, fb, CONFIG)
    assert CONFIG.accepts(v) and not v.mirrored and v.inliers >= 30 and v.warp > 0.8
    # in A's described pixels (B may be described at a larger scale): within 3 of 384
    assert map_error(v.matrix, truth, (x0 * sa, y0 * sa, x1 * sa, y1 * sa)) / truth[1, 1] < 3.0


def test_a_mirrored_copy_is_found_through_the_mirrored_features(photos, tmp_path):
    a = photos[4]
    fa, fb = feats(a, tmp_path, "a"), feats(ImageOps.mirror(a), tmp_path, "m")
    v = verify(fa, fb, CONFIG)
    assert v.mirrored and CONFIG.accepts(v)
    # The map between the mirrored A and B is the identity (both described at one size).
    assert map_error(v.matrix, np.array([[1.0, 0, 0], [0, 1.0, 0]]), (0, 0, *fa.size)) < 2.0
    # The permuted descriptors match the mirror's own description as well as A's own match A.
    own = described(np.asarray(ImageOps.mirror(a).convert("L")), CONFIG)
    assert verify(fa.mirrored(), own, CONFIG).inliers >= 0.5 * verify(fa, fa, CONFIG).inliers


@pytest.mark.parametrize("edit", ["thumbnail", "recompress", "frame", "caption", "border", "rotate", "mirror_grey",
                                  "overlay", "logo", "aspect", "filter", "crop"])
def test_edited_copies_are_accepted(photos, tmp_path, edit):
    for k in range(3):
        copy, q = make_copy(photos[k], edit, np.random.default_rng([k, 5]))
        v = verify(feats(photos[k], tmp_path, "a"), feats(copy, tmp_path, "b", q), CONFIG)
        assert CONFIG.accepts(v), (edit, k, v.inliers, v.warp, v.frame)


def test_different_photos_are_refused_even_with_the_same_caption(photos, tmp_path):
    """Every pair of 12 different photos, and the same caption bar put on two different photos (its text matches)."""
    f = [feats(p, tmp_path, f"p{i}") for i, p in enumerate(photos)]
    for i in range(len(f)):
        for j in range(i + 1, len(f)):
            assert not CONFIG.accepts(verify(f[i], f[j], CONFIG)), (i, j)
    rng = [np.random.default_rng([9, 1]) for _ in range(2)]  # one seed: the same bar and words on both
    a, _ = make_copy(photos[0], "caption", rng[0])
    b, _ = make_copy(photos[1].resize(photos[0].size), "caption", rng[1])
    assert not CONFIG.accepts(verify(feats(a, tmp_path, "ca"), feats(b, tmp_path, "cb"), CONFIG))


def test_features_round_trip_their_bytes(photos, tmp_path):
    f = feats(photos[0], tmp_path, "a")
    g = Features.from_bytes(f.to_bytes())
    assert g.size == f.size and g.box == f.box and np.array_equal(g.desc, f.desc) and np.array_equal(g.thumb, f.thumb)
    np.testing.assert_allclose(g.xy, f.xy, atol=0.25)  # float16 positions: a quarter pixel at 384
    assert len(f.to_bytes()) < 70_000
    assert features_of(str(tmp_path / "nope.jpg"), CONFIG) is None
