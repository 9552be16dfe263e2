"""Installed from a wheel, away from the checkout (no ../shared, an empty HOME, another folder), simsearch writes
the very vectors the checkout writes: its default encoder (int8 on most CPUs) is built from what the package
ships, not from photos beside a checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from simsearch.encoders.preprocess import decode_side, to_input
from simsearch.encoders.registry import default_encoder, get_encoder
from simsearch.encoders.runtime import OnnxEncoder
from simsearch.indexer.images import load_rgb

from ..conftest import sample_paths

ROOT = Path(__file__).resolve().parents[2]

EMBED = """
import json, sys
from pathlib import Path
import numpy as np
import simsearch
from simsearch.encoders.preprocess import decode_side, to_input
from simsearch.encoders.registry import default_encoder, get_encoder
from simsearch.encoders.runtime import OnnxEncoder
from simsearch.indexer.images import load_rgb

spec = get_encoder(default_encoder())
x = np.stack([to_input(load_rgb(p, decode_side(spec)), spec) for p in sys.argv[1:]])
np.save("vectors.npy", OnnxEncoder(spec).embed(x))
print(json.dumps({"package": simsearch.__file__, "encoder": spec.name}))
"""


def build_wheel(out: Path) -> Path:
    """The wheel of this working tree (its tracked and untracked, not ignored files: what a clean clone has),
    built from a copy so that no stale build/ folder of the checkout can leak into it."""
    src = out / "src"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
                   check=True, capture_output=True)
    return next(out.glob("simsearch-*.whl"))


def test_the_installed_wheel_writes_the_checkouts_vectors(tmp_path, models_dir):
    photos = sample_paths(4, start=200)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                    str(build_wheel(tmp_path / "wheel"))], check=True, capture_output=True)
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMSEARCH_") and k != "XDG_CACHE_HOME"}
    env.update(PYTHONPATH=str(site), HOME=str(home))
    run = subprocess.run([sys.executable, "-c", EMBED, *map(str, photos)], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(out["package"]).is_relative_to(site)  # the wheel's simsearch, not this checkout's
    assert out["encoder"] == default_encoder()
    assert (home / ".cache" / "simsearch" / "models").is_dir()  # it built its own models, in the user's cache
    assert not (site / "shared").exists()

    spec = get_encoder(default_encoder())
    x = np.stack([to_input(load_rgb(p, decode_side(spec)), spec) for p in photos])
    mine = OnnxEncoder(spec, models_dir=models_dir).embed(x)
    theirs = np.load(work / "vectors.npy")
    assert theirs.shape == (4, spec.dim) and np.array_equal(theirs, mine)
