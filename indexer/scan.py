"""Finding the image files under a folder."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from simsearch.errors import SimsearchError
from simsearch.indexer.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileEntry:
    path: str  # absolute
    size: int
    mtime_ns: int


def item_path(path: str | os.PathLike) -> str:
    """The path an item is stored under: absolute, `..` folded, symlinks kept as the user named them."""
    return os.path.abspath(path)


def scan(root: str | os.PathLike, extensions: frozenset[str] = IMAGE_EXTENSIONS) -> Iterator[FileEntry]:
    """Image files under `root` (recursive, sorted, symlinked folders not followed).

    A single file may be given as root. Extensions are matched case-insensitively.
    """
    root = Path(item_path(root))
    if root.is_file():
        st = root.stat()
        yield FileEntry(str(root), st.st_size, st.st_mtime_ns)
        return
    if not root.is_dir():
        raise SimsearchError(f"{root}: no such folder")
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            log.warning("%s: cannot list folder (%s), skipped", folder, e.strerror)
            continue
        subfolders = []
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    if not e.name.startswith("."):
                        subfolders.append(e.path)
                elif os.path.splitext(e.name)[1].lower() in extensions and e.is_file():
                    st = e.stat()
                    yield FileEntry(e.path, st.st_size, st.st_mtime_ns)
            except OSError as err:
                log.warning("%s: cannot stat (%s), skipped", e.path, err.strerror)
        stack.extend(reversed(subfolders))
