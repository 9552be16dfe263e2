"""Atomic writes: a reader, or a run killed half-way, sees the old file (or folder) or the new one, never half.

The one place simsearch calls `os.replace`. Temp files live beside their target (same filesystem, so the rename
is atomic) and are removed if the write fails.

    write_atomic(path, data)        bytes -> file
    with atomic_path(path) as tmp:  a file some library writes by name (torch.save, ONNX export, quantisation)
    with staged_dir(folder) as tmp: a folder filled in a temp folder, then put in place whole
    replace_dir(staging, final)     a finished folder put in place of another
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path, mode: int | None = None) -> Iterator[Path]:
    """A temp path beside `path` to write; on leaving the block without an error it is synced and renamed onto
    `path` (with permission bits `mode` if given), else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the bytes reach the disk before the name points at them
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def replace_dir(staging: Path, final: Path) -> None:
    """Put the finished folder `staging` in place of `final` (which may not exist yet)."""
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(staging, final)
        shutil.rmtree(old)
    else:
        os.replace(staging, final)


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """A temp folder beside `final` to fill; put in place of `final` when the block ends without an error, else
    removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield work
        replace_dir(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
