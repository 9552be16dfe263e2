"""Moving the copies a user chose to drop out of their folders, into one folder the user names (the page's
duplicates view: "move the others into a folder"). Nothing is ever deleted and the db is not written: the next
`simsearch index` sees the files gone (and the new folder, if it indexes it).

Safe by construction: the files are named by item id only (their paths are the db's, never the request's); the
one path taken from the request is the destination, which must be absolute and not inside the db; a name already
there is never overwritten (a hard link or an exclusive create claims the name, then the source is unlinked); a
group's keeper must be there, and is never moved; a file changed since it was indexed is left where it is.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from simsearch.errors import NotFoundError, SimsearchError
from simsearch.indexer.scan import shown_path
from simsearch.indexer.store import ItemRecord

MAX_SUFFIX = 10_000  # name clashes: "a.jpg", then "a-1.jpg" ... "a-9999.jpg"


@dataclass(frozen=True)
class MoveGroup:
    keep: int  # the item the user keeps: never moved, and it must be there
    move: tuple[int, ...]  # the items to move out


@dataclass(frozen=True)
class Moved:
    id: int
    path: str  # where it was (the db's path)
    to: str  # where it is now


@dataclass(frozen=True)
class Failed:
    id: int
    path: str | None  # None: no such item in the db
    reason: str


def is_loopback(host: str) -> bool:
    """Whether `host` (an address to listen on, or a client's) is this machine's own."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def refusal(client: str | None, host: str | None, authority: str | None, origin: str | None) -> str | None:
    """Why a request that moves files is refused (403), or None. It must come from this machine (a loopback
    client), be addressed to it by a loopback name or address (`host`, from the Host header: a name of another site
    rebound to 127.0.0.1 is not), and not come from a page of another origin (`origin` against `authority`, the Host
    header as sent); a cross-site form cannot send JSON (it gets 422)."""
    if client is None or not is_loopback(client):
        return "moving files is only allowed from this machine (a loopback client)"
    if host is None or not is_loopback(host):
        return "moving files is only allowed at a loopback address (http://127.0.0.1:PORT or http://localhost:PORT)"
    if origin is not None and urlsplit(origin).netloc != authority:
        return "moving files is only allowed from the page this server serves (another origin sent it)"
    return None


def destination_folder(dest: str, db_root: Path) -> Path:
    """The folder `dest` names, made if it is not there; SimsearchError (400) when it is refused: relative, inside
    the db, not a folder, or it cannot be made."""
    if "\x00" in dest or not os.path.isabs(dest):
        raise SimsearchError(f"destination {shown_path(dest)!r}: give an absolute folder path")
    folder = Path(os.path.realpath(dest))
    db = Path(os.path.realpath(db_root))
    if folder == db or db in folder.parents:
        raise SimsearchError(f"destination {shown_path(dest)!r} is inside the db ({shown_path(str(db))}): choose a "
                             "folder outside it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SimsearchError(f"destination {shown_path(dest)!r}: cannot make the folder "
                             f"({e.strerror or e})") from None
    if not folder.is_dir():
        raise SimsearchError(f"destination {shown_path(dest)!r} is not a folder")
    return folder


def check_groups(groups: list[MoveGroup]) -> None:
    """SimsearchError (400) for a plan that would move a group's keeper."""
    keepers = {g.keep for g in groups}
    for g in groups:
        clash = keepers.intersection(g.move)
        if clash:
            raise SimsearchError(f"item {min(clash)} is a keeper: a keeper is never moved")


def move_groups(groups: list[MoveGroup], folder: Path, item) -> tuple[list[Moved], list[Failed]]:
    """Each group's items to move, moved into `folder` (made by `destination_folder`) when its keeper's file is
    there; `item(id)` -> (path, ItemRecord), NotFoundError for an id the db does not hold. Every item is reported:
    moved (from, to) or failed (why)."""
    moved: list[Moved] = []
    failed: list[Failed] = []
    for g in groups:
        try:
            keep_path, _ = item(g.keep)
            keeper_there = os.path.isfile(keep_path)
        except NotFoundError:
            keeper_there = False
        for i in g.move:
            try:
                path, record = item(i)
            except NotFoundError:
                failed.append(Failed(i, None, f"no item with id {i} in the db"))
                continue
            if not keeper_there:
                failed.append(Failed(i, path, f"the group's keeper (item {g.keep}) is gone: its copies stay"))
                continue
            why = _unmovable(path, record)
            if why:
                failed.append(Failed(i, path, why))
                continue
            try:
                moved.append(Moved(i, path, _move(path, folder)))
            except OSError as e:
                failed.append(Failed(i, path, f"cannot move it ({e.strerror or e})"))
    return moved, failed


def _unmovable(path: str, record: ItemRecord) -> str | None:
    """Why the file at `path` is not moved (gone, or changed since it was indexed: then it may not be the copy the
    user saw), or None."""
    try:
        st = os.stat(path)  # as the indexer read it (a symlink's target)
    except OSError:
        return "its file is gone"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size != record.size or st.st_mtime_ns != record.mtime_ns:
        return "its file changed since it was indexed: run `simsearch index` and look again"
    return None


def _move(src: str, folder: Path) -> str:
    """Move `src` into `folder` under its own name, or "stem-N.ext" when that name is taken; the new path. The name
    is claimed without overwriting anything (a hard link, or an exclusive create for a copy across file systems),
    and only then is the source unlinked."""
    name = os.path.basename(src)
    stem, ext = os.path.splitext(name)
    for n in range(MAX_SUFFIX):
        target = str(folder / (name if n == 0 else f"{stem}-{n}{ext}"))
        try:
            os.link(src, target, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
                raise
            if not _copy_exclusive(src, target):
                continue
        try:
            os.unlink(src)
        except OSError:
            os.unlink(target)  # the source stays where it was: the new name goes (it was ours, made above)
            raise
        return target
    raise OSError(errno.EEXIST, f"{MAX_SUFFIX} names like {name} are taken in the destination")


def _copy_exclusive(src: str, target: str) -> bool:
    """Copy src to target (another file system), its times and mode too; False when the name is taken."""
    try:
        out = open(target, "xb")
    except FileExistsError:
        return False
    try:
        with out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
        shutil.copystat(src, target)
    except BaseException:
        os.unlink(target)  # a partial copy of ours
        raise
    return True
