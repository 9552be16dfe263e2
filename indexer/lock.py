"""The db's writer lock: one process writes a db at a time; readers never take it.

`flock` on `<db>/lock`: the kernel drops it when the holder dies (even by SIGKILL), so a killed
`index` never leaves a db locked. The holder writes its pid into the file for the waiting message.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from pathlib import Path

from simsearch.atomic import NO_SPACE
from simsearch.errors import DbBusyError

log = logging.getLogger(__name__)

LOCK_FILE = "lock"
# A reader probing for a writer holds a shared lock for microseconds; a writer that must not wait
# retries this long before calling the db busy, so a probe is never mistaken for a writer.
_NO_WAIT_GRACE_S = 0.5


def _try(fd: int, how: int) -> bool:
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise


class DbLock:
    """Exclusive writer lock of one db folder (a context manager)."""

    def __init__(self, root: Path, wait: bool = True):
        self.path = Path(root) / LOCK_FILE
        self.wait = wait
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _try(fd, fcntl.LOCK_EX):
                holder = _holder(fd)
                if not self.wait:
                    deadline = time.monotonic() + _NO_WAIT_GRACE_S
                    while not _try(fd, fcntl.LOCK_EX):
                        if time.monotonic() > deadline:
                            raise DbBusyError(f"{self.path.parent} is being written by another simsearch{holder}: "
                                              "wait for it to finish, or run again without --no-wait")
                        time.sleep(0.02)
                else:
                    log.warning("%s is being written by another simsearch%s: waiting for it to finish "
                                "(--no-wait to fail instead)", self.path.parent, holder)
                    fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            try:
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as e:  # a full disk: the lock holds without it (the pid only names the writer to waiters)
                if e.errno not in NO_SPACE:
                    raise
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> DbLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> str:
    raw = os.pread(fd, 32, 0).strip()
    return f" (pid {raw.decode()})" if raw.isdigit() else ""


def writer_active(root: Path) -> bool:
    """True while some process holds the writer lock of the db at `root` (read-only probe)."""
    try:
        fd = os.open(Path(root) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False  # no lock file: never written by this version, or not readable: assume none
    try:
        if _try(fd, fcntl.LOCK_SH):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True
    finally:
        os.close(fd)
