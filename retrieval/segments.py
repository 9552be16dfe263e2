"""The FAISS backend's segments: the files one published index of an encoder is made of, and what they hold.

    index/<name>.<generation>.<sha12>.faiss   the base: the index FAISS built. Readers memory-map it (FAISS's
                                               IO_FLAG_MMAP_IFC) and never read it whole on the query path
    index/<name>.<generation>.<sha12>.ids     the ids the base holds, sorted int64 little-endian (n,): an update
                                               learns which changed ids the base holds without opening it
    index/<name>.<generation>.<sha12>.delta   one update: the ids it replaced (added, changed or removed) and,
                                               of those, the live ones with their vectors; read whole on open

A snapshot is the base without every id a delta replaced (the tombstones), plus the newest delta copy of each
replaced id that is still live, searched exactly. An update writes one delta (O(change)); compaction folds the
deltas into a new base (O(collection)). Each file is written once under a new name, atomically, with its
sha256 and size recorded in the manifest: open checks sizes (a stat) and the deltas' sha256 (they are small
and read anyway); `check` and compaction verify every file's sha256.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simsearch.atomic import write_atomic

SUFFIXES = (".faiss", ".ids", ".delta")
_HEADER = struct.Struct("<8sqqq")  # magic, dim, replaced m, live n
_MAGIC = b"SSDELTA1"


class SegmentError(Exception):
    """A segment file that does not match the manifest or cannot be parsed; str: one line naming the file."""


@dataclass(frozen=True)
class Segment:
    """One file of a published index, as the manifest records it."""

    file: str  # under index/
    sha256: str
    bytes: int

    @classmethod
    def of(cls, raw: object) -> Segment:
        """From the manifest's object; ValueError when it is not one."""
        if not (isinstance(raw, dict) and set(raw) == {"file", "sha256", "bytes"} and isinstance(raw["file"], str)
                and isinstance(raw["sha256"], str) and isinstance(raw["bytes"], int)):
            raise ValueError(f"not a segment: {raw!r:.80}")
        return cls(raw["file"], raw["sha256"], raw["bytes"])

    def as_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "bytes": self.bytes}

    def problem(self, directory: Path, verify: bool) -> str | None:
        """Why the file cannot be used (missing, wrong size; with verify, wrong sha256), or None."""
        path = directory / self.file
        try:
            size = path.stat().st_size
            if size != self.bytes:
                return f"{path}: damaged index file ({size:,} bytes, the manifest says {self.bytes:,})"
            if verify:
                self.read(directory)
        except FileNotFoundError:
            return f"{path}: index file missing"
        except OSError as e:
            return f"{path}: cannot read ({e.strerror})"
        except SegmentError as e:
            return str(e)
        return None

    def read(self, directory: Path) -> bytes:
        """The file's bytes, verified against the manifest (SegmentError; FileNotFoundError passes)."""
        path = directory / self.file
        data = path.read_bytes()
        if len(data) != self.bytes:
            raise SegmentError(f"{path}: damaged index file ({len(data):,} bytes, the manifest says {self.bytes:,})")
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise SegmentError(f"{path}: damaged index file (sha256 differs from the manifest)")
        return data


def write_segment(directory: Path, name: str, generation: int, suffix: str, data: bytes | memoryview) -> Segment:
    """`data` written atomically as a new file `<name>.<generation>.<sha12><suffix>` (never one a reader may
    be reading: a name is its content)."""
    sha = hashlib.sha256(data).hexdigest()
    file = f"{name}.{generation}.{sha[:12]}{suffix}"
    write_atomic(directory / file, data)
    return Segment(file, sha, len(data))


def is_file_of(file_name: str, name: str) -> bool:
    """A segment of encoder `name`: `<name>.<generation>.<sha12><suffix>`, schema 1's `<name>.faiss`, or the temp
    file of one (`.<file>.<random>.tmp`, left by a killed write)."""
    if file_name.startswith(".") and file_name.endswith(".tmp"):
        file_name = file_name[1:].rsplit(".", 2)[0]
    if file_name == f"{name}.faiss":
        return True
    rest = file_name[len(name) + 1:] if file_name.startswith(name + ".") else ""
    parts = rest.split(".")
    return len(parts) == 3 and parts[0].isdigit() and f".{parts[2]}" in SUFFIXES


def delete_unreferenced(directory: Path, name: str, keep: set[str]) -> None:
    """Delete the encoder's files that are not in `keep` (superseded segments, orphans of a killed or failed
    write). A reader that read an older manifest finds them gone and reads the manifest again."""
    for old in directory.iterdir():
        if old.name not in keep and is_file_of(old.name, name):
            old.unlink(missing_ok=True)


@dataclass(frozen=True)
class Delta:
    """Changes over a base: `replaced` ids (m,) supersede every older copy; `ids` (n,) ⊆ replaced are the live ones,
    with `vectors` (n, dim) float32. Removed ids are replaced and not live."""

    replaced: np.ndarray  # (m,) int64, sorted, unique
    ids: np.ndarray  # (n,) int64
    vectors: np.ndarray  # (n, dim) float32

    @classmethod
    def empty(cls, dim: int) -> Delta:
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, dim), np.float32))

    @classmethod
    def of_change(cls, changed: np.ndarray, ids: np.ndarray, vectors: np.ndarray) -> Delta:
        """One update: ids (m,) changed since the snapshot, of which `ids` (n,) are live with `vectors` (n, dim)."""
        return cls(np.unique(np.asarray(changed, np.int64)), np.asarray(ids, np.int64),
                   np.ascontiguousarray(vectors, dtype=np.float32))

    def to_bytes(self) -> bytes:
        dim = self.vectors.shape[1]
        return b"".join((_HEADER.pack(_MAGIC, dim, len(self.replaced), len(self.ids)),
                         self.replaced.astype("<i8").tobytes(), self.ids.astype("<i8").tobytes(),
                         self.vectors.astype("<f4").tobytes()))

    @classmethod
    def from_bytes(cls, data: bytes, dim: int, path: Path) -> Delta:
        """Parse a delta file (SegmentError when it is not one of `dim` dimensions)."""
        if len(data) < _HEADER.size:
            raise SegmentError(f"{path}: damaged delta file (too short)")
        magic, d, m, n = _HEADER.unpack_from(data)
        if magic != _MAGIC or d != dim or not 0 <= n <= m or len(data) != _HEADER.size + 8 * (m + n) + 4 * n * dim:
            raise SegmentError(f"{path}: damaged delta file (not a {dim}-d delta)")
        at = _HEADER.size
        replaced = np.frombuffer(data, "<i8", m, at).astype(np.int64)
        ids = np.frombuffer(data, "<i8", n, at + 8 * m).astype(np.int64)
        vectors = np.frombuffer(data, "<f4", n * dim, at + 8 * (m + n)).astype(np.float32).reshape(n, dim)
        if (np.diff(replaced) <= 0).any() or not np.isin(ids, replaced).all():
            raise SegmentError(f"{path}: damaged delta file (its ids are not what it replaced)")
        return cls(replaced, ids, vectors)


def merge(deltas: list[Delta], dim: int) -> Delta:
    """The deltas (oldest first) as one: every id any of them replaced, live as the newest one that replaced it
    left it. Equal to applying them in order."""
    if not deltas:
        return Delta.empty(dim)
    if len(deltas) == 1:
        return deltas[0]
    replaced = np.unique(np.concatenate([d.replaced for d in deltas]))
    last = np.empty(len(replaced), np.int64)  # for each replaced id, the newest delta that replaced it
    for j, d in enumerate(deltas):
        last[np.searchsorted(replaced, d.replaced)] = j
    ids, vectors = [], []
    for j, d in enumerate(deltas):
        newest = last[np.searchsorted(replaced, d.ids)] == j
        ids.append(d.ids[newest])
        vectors.append(d.vectors[newest])
    return Delta(replaced, np.concatenate(ids), np.concatenate(vectors))


def sorted_contains(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mask (len(ids),): which of `ids` are in `sorted_ids` (sorted, possibly a memory map: reads O(m log n) of it)."""
    if not len(sorted_ids):
        return np.zeros(len(ids), bool)
    at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return np.asarray(sorted_ids[at]) == ids
