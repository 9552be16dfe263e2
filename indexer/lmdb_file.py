"""Checking an LMDB data file against LMDB's own size fields before it is memory-mapped.

LMDB maps `data.mdb` and reads pages straight from the mapping: in a truncated file those pages do
not exist and the first read kills the process with SIGBUS (no exception, no message). The two meta
pages at the start of the file say how many pages a committed transaction uses, so a short file is
caught here with a message instead.

Layout (lmdb 0.9, 64-bit; mdb.c `MDB_page` + `MDB_meta`), each meta page:
    16  uint32 mm_magic (0xBEEFC0DE)      20  uint32 mm_version
    40  uint32 page size (mm_dbs[FREE_DBI].md_pad)
    136 uint64 mm_last_pg                  144 uint64 mm_txnid
"""

from __future__ import annotations

import struct
from pathlib import Path

from simsearch.errors import DbCorruptError

MAGIC = 0xBEEFC0DE
_HEADER = 152  # bytes of a meta page that are read
_MIN_PAGE = 512


def check_data_file(path: Path, recover: str) -> None:
    """Raise DbCorruptError (naming the file, ending with `recover`) if `path` cannot be mapped safely.

    A missing file is fine (LMDB creates it); the newest meta page decides the size needed.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            first = f.read(_HEADER)
            # The second meta page sits one page in; if the first page is garbage, guess the usual 4 KiB.
            f.seek((_meta(first) or (4096,))[0])
            second = f.read(_HEADER)
    except FileNotFoundError:
        return
    except OSError as e:
        raise DbCorruptError(f"{path}: cannot read ({e.strerror}); {recover}") from None
    if size == 0:
        return  # created but never written (a killed first open): LMDB initialises it
    metas = [m for m in (_meta(first), _meta(second)) if m is not None]
    if not metas:
        raise DbCorruptError(f"{path}: not an LMDB file (bad header); {recover}")
    psize, last_pg, _ = max(metas, key=lambda m: m[2])
    needed = (last_pg + 1) * psize
    if size < needed:
        raise DbCorruptError(f"{path}: truncated ({size:,} of {needed:,} bytes); {recover}")


def _meta(page: bytes) -> tuple[int, int, int] | None:
    """(page size, last page number, transaction id) of a valid meta page, else None."""
    if len(page) < _HEADER:
        return None
    magic, version = struct.unpack_from("<II", page, 16)
    psize = struct.unpack_from("<I", page, 40)[0]
    last_pg, txnid = struct.unpack_from("<QQ", page, 136)
    if magic != MAGIC or version != 1 or not _MIN_PAGE <= psize <= 1 << 16:
        return None
    return psize, last_pg, txnid
