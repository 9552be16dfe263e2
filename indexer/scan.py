"""Finding the image files under a folder, and saying what was not looked at."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from simsearch.errors import SimsearchError
from simsearch.indexer.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileEntry:
    path: str  # absolute; may hold surrogate escapes (a name that is not valid UTF-8)
    size: int
    mtime_ns: int


@dataclass
class ScanResult:
    files: list[FileEntry] = field(default_factory=list)
    # Folders that could not be listed and files that could not be stat'ed: whatever the db holds
    # under them was not checked, and must be kept (a dropped mount is not a deletion).
    unreadable: list[str] = field(default_factory=list)
    ignored: Counter = field(default_factory=Counter)  # reason -> files not looked at


def shown_path(path: str) -> str:
    """A stored path as text can carry it (JSON, a terminal, a CSV on stdout): the bytes of a name that is not
    valid UTF-8 (surrogate escapes) written as `\\xe9`."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def item_path(path: str | os.PathLike) -> str:
    """The path an item is stored under: absolute, with its folder's symlinks resolved, the file's own name kept.

    A folder reached through a symlink is stored under its real path, so indexing it by either name
    gives one item per file; a symlinked file keeps its name (its content hash shares the vector).
    """
    path = os.path.abspath(path)
    folder, name = os.path.split(path)
    return os.path.join(os.path.realpath(folder), name) if name else os.path.realpath(path)


def scan(root: str | os.PathLike, extensions: frozenset[str] = IMAGE_EXTENSIONS) -> ScanResult:
    """Image files under `root` (recursive, sorted; hidden and symlinked folders not followed).

    A single file may be given as root. Extensions are matched case-insensitively. A symlink to a
    file inside `root` is not listed (its target is, once); one pointing outside is.
    """
    root = os.path.realpath(root)
    out = ScanResult()
    if os.path.isfile(root):
        st = os.stat(root)
        out.files.append(FileEntry(root, st.st_size, st.st_mtime_ns))
        return out
    if not os.path.isdir(root):
        raise SimsearchError(f"{root}: no such folder")
    inside = root.rstrip(os.sep) + os.sep
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: os.fsencode(e.name))
        except OSError as e:
            log.warning("%s: cannot list folder (%s): its items in the db are kept, not checked", folder, e.strerror)
            out.unreadable.append(folder)
            continue
        subfolders = []
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    if not e.name.startswith("."):
                        subfolders.append(e.path)
                elif e.is_symlink() and e.is_dir():
                    out.ignored["symlinked folders"] += 1
                elif os.path.splitext(e.name)[1].lower() not in extensions:
                    out.ignored["files with other extensions"] += 1
                elif e.is_symlink() and os.path.realpath(e.path).startswith(inside):
                    out.ignored["links to files inside the folder"] += 1
                elif e.is_file():
                    st = e.stat()
                    out.files.append(FileEntry(e.path, st.st_size, st.st_mtime_ns))
                else:
                    out.ignored["files that are not regular files"] += 1
            except OSError as err:
                log.warning("%s: cannot stat (%s): kept, not checked", e.path, err.strerror)
                out.unreadable.append(e.path)
        stack.extend(reversed(subfolders))
    return out


def missing_items(items: Iterable[str]) -> list[str]:
    """The paths among `items` whose file no longer exists.

    Only "not found" counts: a file that cannot be read (permissions, an I/O error on a failing
    disk or mount) is not reported, so it is never pruned by mistake.
    """
    out = []
    for path in items:
        try:
            os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            out.append(path)
        except OSError as e:
            log.warning("%s: cannot stat (%s): kept", path, e.strerror)
    return out
