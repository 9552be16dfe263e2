"""Seeded mutations of real photos through the real index run: every file ends up stored or skipped
with a one-line reason naming it, and the run never raises, crashes or hangs.

The run happens in a child process, so a decoder that crashes the interpreter (SIGSEGV in a C
library) or loops forever fails this test with a stack trace instead of taking pytest down with it.
The big run: `pytest -m slow tests/indexer/test_fuzz.py`, sized by SIMSEARCH_FUZZ_FILES (default
3000) and seeded by SIMSEARCH_FUZZ_SEED (default 1).
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simsearch.indexer.images import IMAGE_EXTENSIONS
from simsearch.indexer.store import Store

from ..conftest import sample_paths
from .test_formats import writable_extensions, write_photo

pytestmark = pytest.mark.filterwarnings("ignore:IM image format is deprecated:DeprecationWarning")

# The child: one real index run with the session's exported encoder; the report comes back as JSON.
# On a hang, faulthandler prints every thread's stack and exits before the parent's timeout.
_INDEX = textwrap.dedent("""
    import faulthandler, json, sys
    from pathlib import Path
    from simsearch.encoders.runtime import OnnxEncoder
    from simsearch.encoders.registry import get_encoder
    from simsearch.indexer.pipeline import Indexer, IndexerConfig
    from simsearch.indexer.store import Store

    folder, db, models, out, hang_after = sys.argv[1:]
    faulthandler.dump_traceback_later(float(hang_after), exit=True)
    encoder = OnnxEncoder(get_encoder("efficientnet-lite0"), models_dir=Path(models))
    with Store(db, create=True) as store:
        report = Indexer(encoder, store, IndexerConfig(batch_size=16)).run(folder)
    Path(out).write_text(json.dumps({"scanned": report.scanned, "embedded": report.embedded,
                                     "skipped": report.skipped, "wall": report.wall}))
""")

# After a failed run: decode the files one by one, writing each one's name before it is tried, so
# the name left is the file that crashed or hung the decoder.
_PINPOINT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from simsearch.errors import ImageLoadError
    from simsearch.indexer.images import load_rgb

    for p in sorted(Path(sys.argv[1]).iterdir()):
        Path(sys.argv[2]).write_text(str(p))
        try:
            load_rgb(p, 256)
        except ImageLoadError:
            pass
""")


def _bases(scratch: Path) -> list[tuple[str, bytes]]:
    """(extension, bytes) of small real photos: every format we claim that Pillow can write, and
    more encodings of the commonest ones, each taking another path through its decoder."""
    photos = []
    for photo in sample_paths(3, start=100):
        with Image.open(photo) as im:
            photos.append(im.convert("RGB"))
            photos[-1].thumbnail((160, 160))
    scratch.mkdir()
    out = []
    for ext in writable_extensions():
        write_photo(photos[0], scratch / f"photo{ext}")
        out.append((ext, (scratch / f"photo{ext}").read_bytes()))
    gray = np.asarray(photos[0].convert("L"))
    variants = [
        (".png", Image.fromarray(gray.astype(np.uint16) * 257), {}),  # I;16
        (".tif", Image.fromarray(gray.astype(np.float32) / 255), {}),  # F, in [0, 1]
    ]
    for im in photos:
        variants += [
            (".jpg", im, {"quality": 90}),
            (".jpg", im, {"progressive": True, "quality": 80}),
            (".png", im.convert("RGBA"), {"interlace": 1}),  # Adam7
            (".gif", im.convert("P"), {"save_all": True, "append_images": [im.rotate(90).convert("P")]}),
            (".tif", im, {"compression": "tiff_lzw"}),
            (".tif", im.convert("L"), {"compression": "tiff_deflate"}),
            (".webp", im, {"quality": 80}),
            (".webp", im, {"lossless": True}),
            (".heic", im, {"quality": 60}),
            (".avif", im, {"quality": 60}),
            (".jp2", im, {"irreversible": True}),
        ]
    for ext, image, kw in variants:
        buf = io.BytesIO()
        image.save(buf, format=Image.registered_extensions()[ext], **kw)
        out.append((ext, buf.getvalue()))
    return out


def _mutate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """One seeded corruption of `data`: (what was done, the new bytes)."""
    kind = rng.choices(["flip", "trunc", "header", "magic", "empty", "garbage"], [30, 20, 30, 10, 2, 8])[0]
    b = bytearray(data)
    if kind == "flip":  # bit rot: a few flipped bits anywhere
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == "trunc":  # an interrupted copy or download
        del b[rng.randrange(len(b)):]
    elif kind == "header":  # sizes, offsets, counts and type fields live in the first bytes
        span = min(len(b), rng.choice([16, 64, 256, 1024]))
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(span)] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
    elif kind == "magic":  # a valid signature, then junk: the parser gets past identification
        b = b[:rng.choice([4, 8, 16, 32])] + bytearray(rng.randbytes(rng.randint(0, 4096)))
    elif kind == "empty":
        b = bytearray()
    else:  # garbage that only has an image's name
        b = bytearray(rng.randbytes(rng.randint(1, 8192)))
    return kind, bytes(b)


def _make_folder(folder: Path, n_files: int, seed: int) -> tuple[list[Path], list[Path]]:
    """(the unmutated files, all n_files files) written into `folder`."""
    rng = random.Random(seed)
    bases = _bases(folder.parent / "bases")
    folder.mkdir()
    good = []
    for i, (ext, data) in enumerate(bases):
        good.append(folder / f"good-{i:03d}{ext}")
        good[-1].write_bytes(data)
    files = list(good)
    for i in range(n_files - len(good)):
        ext, data = rng.choice(bases)
        kind, data = _mutate(rng, data)
        if kind == "garbage":
            ext = rng.choice(sorted(IMAGE_EXTENSIONS))
        files.append(folder / f"fuzz-{i:05d}-{kind}{ext}")
        files[-1].write_bytes(data)
    return good, files


def _child(code: str, args: list[str], timeout: float, log: Path) -> subprocess.CompletedProcess:
    with log.open("w") as err:
        return subprocess.run([sys.executable, "-X", "faulthandler", "-c", code, *args],
                              stdout=subprocess.DEVNULL, stderr=err, timeout=timeout)


def _fuzz(tmp_path: Path, models_dir: Path, n_files: int, seed: int, timeout: float) -> dict:
    folder, db, out = tmp_path / "fuzz", tmp_path / "db", tmp_path / "report.json"
    good, files = _make_folder(folder, n_files, seed)
    proc = _child(_INDEX, [str(folder), str(db), str(models_dir), str(out), str(timeout)],
                  timeout + 30, tmp_path / "index.log")
    if proc.returncode != 0:
        crash = (tmp_path / "index.log").read_text()[-4000:]
        try:
            alone = _child(_PINPOINT, [str(folder), str(tmp_path / "last")], timeout,
                           tmp_path / "pinpoint.log").returncode
        except subprocess.TimeoutExpired:
            alone = "a hang"
        last = (tmp_path / "last").read_text()
        culprit = "none (each file decodes alone)" if alone == 0 else f"{last} ({alone})"
        pytest.fail(f"index run exited {proc.returncode} (seed {seed}); file that fails alone: {culprit}\n{crash}")

    report = json.loads(out.read_text())
    assert report["scanned"] == len(files)
    skipped = dict(report["skipped"])
    assert len(skipped) == len(report["skipped"]), "a file was skipped twice"
    for path, reason in skipped.items():
        assert reason.startswith(f"{path}: ") and "\n" not in reason, reason
    with Store(db) as store:
        stored = {str(p) for p in files if store.get_item(str(p)) is not None}
    assert not stored & set(skipped), f"both stored and skipped: {sorted(stored & set(skipped))[:5]}"
    neither = {str(p) for p in files} - stored - set(skipped)
    assert not neither, f"neither stored nor skipped: {sorted(neither)[:5]}"
    assert {str(p) for p in good} <= stored, f"good files skipped: {[skipped[str(p)] for p in good if str(p) in skipped]}"
    figures = {"files": len(files), "stored": len(stored), "skipped": len(skipped), "embedded": report["embedded"],
               "wall_s": round(report["wall"], 1)}
    print(f"fuzz seed {seed}: {figures}")
    return figures


def test_fuzzed_files_are_stored_or_skipped_never_crash(tmp_path, encoder, models_dir):
    figures = _fuzz(tmp_path, models_dir, n_files=400, seed=0, timeout=240)
    assert figures["stored"] > 50 and figures["skipped"] > 50  # the mutations reach both outcomes


@pytest.mark.slow
def test_fuzzed_files_big_run(tmp_path, encoder, models_dir):
    n_files = int(os.environ.get("SIMSEARCH_FUZZ_FILES", "3000"))
    _fuzz(tmp_path, models_dir, n_files=n_files, seed=int(os.environ.get("SIMSEARCH_FUZZ_SEED", "1")),
          timeout=max(600.0, n_files * 0.2))
