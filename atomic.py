"""Atomic writes: a reader, or a run killed half-way, sees the old file (or folder) or the new one, never half.

The one place simsearch calls `os.replace`. Temp files live beside their target (same filesystem, so the rename
is atomic) and are removed if the write fails.

    write_atomic(path, data)        bytes -> file
    with atomic_path(path) as tmp:  a file some library writes by name (torch.save, ONNX export, quantisation)
    with staged_dir(folder) as tmp: a folder filled in a temp folder, then put in place whole
    replace_dir(staging, final)     a finished folder put in place of another

A write that finds no space (ENOSPC, a quota, or the file size limit: EFBIG) raises DiskFullError, one line giving
the space needed and free, after removing its temp file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from simsearch.errors import DiskFullError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def atomic_path(path: Path, mode: int | None = None, needed: int = 0) -> Iterator[Path]:
    """A temp path beside `path` to write; on leaving the block without an error it is synced and renamed onto
    `path` (with permission bits `mode` if given), else removed. needed: the bytes it will hold, for the message
    of a write that finds no space."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        with open(tmp, "rb+") as f:  # the bytes reach the disk before the name points at them
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in NO_SPACE:
            raise no_space(path, needed, e.errno) from None
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path, needed=len(data)) as tmp:
        tmp.write_bytes(data)


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def file_size_limit() -> int | None:
    """The largest file this process may write (RLIMIT_FSIZE, `ulimit -f`), or None when unlimited."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if limit == resource.RLIM_INFINITY else limit


def lacks_space(path: Path, needed: int) -> int | None:
    """Why writing `needed` more bytes to `path` (an existing file or a new one) cannot succeed: EFBIG (it would
    pass the file size limit), ENOSPC (fewer bytes free on its disk, with a MiB to spare), else None. For writers
    that lose the errno (LMDB reports a short write as EIO)."""
    path = Path(path)
    size = path.stat().st_size if path.is_file() else 0
    limit = file_size_limit()
    if limit is not None and size + needed + 2**20 > limit:
        return errno.EFBIG
    return errno.ENOSPC if shutil.disk_usage(path.parent).free < needed + 2**20 else None


def no_space(path: Path, needed: int, code: int = errno.ENOSPC) -> DiskFullError:
    """The one-line error of a write of `needed` bytes (0: unknown) to `path` that found no space."""
    path = Path(path)
    free = shutil.disk_usage(path if path.is_dir() else path.parent).free
    want = f"{_size(needed)} needed, " if needed else ""
    limit = file_size_limit()
    if code == errno.EFBIG and limit is not None:
        where = f"{want}files may not exceed {_size(limit)} here (`ulimit -f`), {_size(free)} free on the disk"
    else:
        where = f"{want}{_size(free)} free on the disk" + ("" if code != errno.EDQUOT else " (a quota is reached)")
    return DiskFullError(f"no space left to write {path} ({where}): nothing was half-written; free some space "
                         "and run it again")


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
