"""Every image format we claim: real photos written by Pillow / pillow-heif, decoded by load_rgb, indexed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from simsearch.encoders.preprocess import to_input
from simsearch.indexer.images import IMAGE_EXTENSIONS, load_rgb
from simsearch.indexer.pipeline import Indexer, IndexerConfig
from simsearch.indexer.store import Store

from ..conftest import sample_paths

# Pillow 13 deprecates the IM format (removal in Pillow 15, when it leaves IMAGE_EXTENSIONS by itself).
pytestmark = pytest.mark.filterwarnings("ignore:IM image format is deprecated:DeprecationWarning")

# The extensions users reported as silently ignored, and the ones indexed before.
ISSUE = [".ppm", ".pgm", ".pbm", ".pnm", ".jfif", ".jp2", ".avif", ".heic", ".heif"]
OLD = [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"]

# Mean absolute difference (0..255) allowed between the decoded file and the photo that was written.
# Lossless formats must give the pixels back exactly.
LOSSY = {".jpg": 4, ".jpeg": 4, ".jfif": 4, ".jpe": 4, ".mpo": 4, ".webp": 4, ".avif": 4, ".avifs": 4,
         ".heic": 4, ".heif": 4, ".heics": 4, ".heifs": 4, ".hif": 4,
         ".gif": 3}  # GIF: a 256-colour palette
# The mode a format is written in, where it is not RGB.
MODE = {".pgm": "L", ".pbm": "1", ".xbm": "1", ".msp": "1", ".blp": "P"}
# Formats that store fixed icon sizes: compared after scaling back to the photo's size.
RESIZED = {".ico": 12, ".icns": 12}


def writable_extensions() -> list[str]:
    """The extensions in IMAGE_EXTENSIONS whose format Pillow (with pillow-heif) can also write."""
    formats = Image.registered_extensions()
    return sorted(e for e in IMAGE_EXTENSIONS if formats[e] in Image.SAVE)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    with Image.open(sample_paths(1, start=200)[0]) as im:
        im = im.convert("RGB")
        im.thumbnail((192, 192))
        return im


def write_photo(photo: Image.Image, path) -> Image.Image:
    """Write `photo` as `path` (format from its extension); return the image as written."""
    im = photo.convert(MODE.get(path.suffix, "RGB"))
    if path.suffix == ".mpo":  # a real multi-picture file: two frames, the first is the picture
        im.save(path, save_all=True, append_images=[im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    elif path.suffix == ".ico":
        im.save(path, sizes=[im.size])
    else:
        im.save(path)
    return im


def test_issue_and_old_extensions_are_indexed():
    assert set(ISSUE + OLD) <= IMAGE_EXTENSIONS
    assert set(ISSUE + OLD) <= set(writable_extensions())  # so each is written and decoded below
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)
    assert isinstance(IMAGE_EXTENSIONS, frozenset)


def test_formats_that_cannot_be_decoded_here_are_not_claimed():
    # Ghostscript (EPS/PS), header-only (MPEG), stubs needing an app handler (HDF5, GRIB, BUFR, WMF),
    # save-only (PDF): scanning them would only add skipped files.
    assert not IMAGE_EXTENSIONS & {".eps", ".ps", ".mpg", ".mpeg", ".h5", ".hdf", ".grib", ".bufr", ".wmf", ".emf", ".pdf"}


@pytest.mark.parametrize("ext", writable_extensions())
def test_written_photo_decodes_close_to_the_source(tmp_path, photo, ext):
    path = tmp_path / f"photo{ext}"
    written = write_photo(photo, path)
    got = load_rgb(path)
    if ext in RESIZED:
        got = got.resize(photo.size, Image.BICUBIC)
    out = np.asarray(got, dtype=np.int16)
    assert out.shape == (photo.height, photo.width, 3)
    if written.mode == "1":  # 1-bit: only black and white, in the photo's layout
        assert set(np.unique(out)) == {0, 255}
        np.testing.assert_array_equal(out[..., 0], np.asarray(written.convert("L")))
        return
    ref = np.asarray(written.convert("RGB"), dtype=np.int16)
    diff = np.abs(out - ref).mean()
    assert diff <= LOSSY.get(ext, RESIZED.get(ext, 0)), f"{ext}: mean abs diff {diff:.2f}"


def test_a_folder_of_every_format_is_indexed(tmp_path, photo, encoder):
    folder = tmp_path / "imgs"
    folder.mkdir()
    files, written = [], []
    for ext in writable_extensions():
        # Each format its own photo, so no two files share content and each is embedded.
        with Image.open(sample_paths(1, start=300 + len(files))[0]) as im:
            src = im.convert("RGB")
            src.thumbnail((192, 192))
        files.append(folder / f"photo{ext}")
        written.append(write_photo(src, files[-1]).convert("RGB"))
    spec = encoder.spec
    with Store(tmp_path / "db", create=True) as store:
        report = Indexer(encoder, store, IndexerConfig(batch_size=8)).run(folder)
        assert report.skipped == []
        assert report.scanned == report.embedded == len(files)
        got = store.vectors_of(spec.key, [str(p) for p in files], spec.dim)  # (N, dim)
    # Each stored vector is the embedding of the picture that was written, not of a blank or garbled
    # decode: the same vector for lossless formats, a near one for lossy and resized ones (two
    # unrelated photos of imagenet-samples: 0.2 on average, 0.62 at most).
    ref = encoder.embed(np.stack([to_input(im, spec) for im in written]))  # (N, 3, S, S) -> (N, dim)
    cos = {p.suffix: float(c) for p, c in zip(files, (got * ref).sum(axis=1))}
    assert {e: round(c, 3) for e, c in cos.items() if c < (0.7 if e in LOSSY or e in RESIZED else 0.999)} == {}
