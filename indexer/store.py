"""The db folder: an LMDB environment (items, vectors) plus `manifest.json` and the FAISS index files.

Layout of one db folder:
    manifest.json          schema version, per-encoder facts (dim, metric, index type, counts)
    store.lmdb/            LMDB: items (path -> meta), ids (id -> path), vectors, meta
    index/<encoder>.faiss  the search index of each encoder (see retrieval/)

Vectors are keyed by encoder key + content sha256, not by path: a renamed or touched file reuses
its vector, and a benchmark re-run on the same images embeds nothing. Every write is one LMDB
transaction (crash-safe); manifest.json is replaced atomically.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lmdb
import numpy as np

from simsearch.errors import DbNotFoundError, SchemaError, SimsearchError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# Virtual address space only: LMDB grows the file as data arrives (1 TiB ~ 200M 1280-d vectors).
MAP_SIZE = 1 << 40
_ID = struct.Struct(">q")  # big-endian so LMDB's byte order is id order


@dataclass(frozen=True)
class ItemRecord:
    id: int
    sha256: str
    size: int
    mtime_ns: int


@dataclass
class EncoderEntry:
    """What the manifest says about one encoder's vectors and index in this db."""

    key: str
    dim: int
    metric: str = "inner_product"
    index_type: str = "none"
    count: int = 0
    index_generation: int = -1  # store generation the index was built from (stale if different)


@dataclass
class Manifest:
    schema_version: int = SCHEMA_VERSION
    default_encoder: str | None = None
    encoders: dict[str, EncoderEntry] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        encoders = {k: EncoderEntry(**v) for k, v in data.get("encoders", {}).items()}
        return cls(data["schema_version"], data.get("default_encoder"), encoders)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that a reader (or a crash) sees the old content or the new, never half."""
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _vector_key(encoder_key: str, sha256: str) -> bytes:
    return f"{encoder_key}\0{sha256}".encode()


class Store:
    """Items, vectors and the manifest of one db folder."""

    def __init__(self, root: str | os.PathLike, create: bool = False, readonly: bool = False):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if manifest_path.is_file():
            try:
                data = json.loads(manifest_path.read_text())
                version = int(data["schema_version"])
            except (ValueError, KeyError, TypeError) as e:
                raise SchemaError(f"{manifest_path} is not a simsearch manifest ({e})") from None
            if version > SCHEMA_VERSION:
                raise SchemaError(
                    f"the db at {self.root} was written by a newer simsearch (schema {version}; "
                    f"this version reads up to {SCHEMA_VERSION}): upgrade simsearch or use another --db"
                )
            self.manifest = Manifest.from_json(data)
        elif create and not readonly:
            self.root.mkdir(parents=True, exist_ok=True)
            self.manifest = Manifest()
        else:
            raise DbNotFoundError(f"no simsearch db at {self.root} (run `simsearch index FOLDER` first, or pass --db)")
        if not readonly:
            (self.root / "index").mkdir(exist_ok=True)
        try:
            self.env = lmdb.open(str(self.root / "store.lmdb"), map_size=MAP_SIZE, max_dbs=4, readonly=readonly)
            self._items = self.env.open_db(b"items", create=not readonly)
            self._ids = self.env.open_db(b"ids", create=not readonly)
            self._vectors = self.env.open_db(b"vectors", create=not readonly)
            self._meta = self.env.open_db(b"meta", create=not readonly)
        except lmdb.Error as e:  # read-only: the manifest is there but the LMDB env is missing or incomplete
            raise DbNotFoundError(f"the db at {self.root} is incomplete ({e}); re-run `simsearch index`") from None
        if not manifest_path.is_file():
            # Written last: a reader that sees the manifest also finds the LMDB env with all its tables.
            self.save_manifest()

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def save_manifest(self) -> None:
        data = asdict(self.manifest)
        write_atomic(self.root / MANIFEST, (json.dumps(data, indent=2) + "\n").encode())

    def index_path(self, encoder_name: str) -> Path:
        return self.root / "index" / f"{encoder_name}.faiss"

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    # -- reads ---------------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        """Bumped by every write: an index built at another generation may be stale."""
        with self.env.begin(db=self._meta) as txn:
            raw = txn.get(b"generation")
        return _ID.unpack(raw)[0] if raw else 0

    def item_count(self) -> int:
        with self.env.begin() as txn:
            return txn.stat(self._items)["entries"]

    def vector_count(self, encoder_key: str) -> int:
        """Items that have a vector from this encoder (what its index will hold)."""
        with self.env.begin() as txn:
            return sum(txn.get(_vector_key(encoder_key, json.loads(raw)["sha256"]), db=self._vectors) is not None
                       for _, raw in txn.cursor(db=self._items))

    def get_item(self, path: str) -> ItemRecord | None:
        with self.env.begin(db=self._items) as txn:
            raw = txn.get(path.encode())
        return ItemRecord(**json.loads(raw)) if raw else None

    def iter_items(self, under: str | None = None) -> Iterator[tuple[str, ItemRecord]]:
        """All items, or those whose path starts with the folder `under` (path order)."""
        prefix = (under.rstrip(os.sep) + os.sep).encode() if under else b""
        with self.env.begin(db=self._items) as txn:
            cur = txn.cursor()
            if not cur.set_range(prefix):
                return
            for k, v in cur:
                if not k.startswith(prefix):
                    break
                yield k.decode(), ItemRecord(**json.loads(v))

    def has_vector(self, encoder_key: str, sha256: str) -> bool:
        with self.env.begin(db=self._vectors) as txn:
            return txn.get(_vector_key(encoder_key, sha256)) is not None

    def get_vector(self, encoder_key: str, sha256: str) -> np.ndarray | None:
        with self.env.begin(db=self._vectors) as txn:
            raw = txn.get(_vector_key(encoder_key, sha256))
        return None if raw is None else np.frombuffer(raw, dtype="<f4").copy()

    def vectors_of(self, encoder_key: str, paths: list[str], dim: int) -> np.ndarray:
        """(len(paths), dim) float32 vectors of these items, in order; SimsearchError names a missing one."""
        out = np.empty((len(paths), dim), dtype=np.float32)
        with self.env.begin() as txn:
            for row, path in enumerate(paths):
                raw = txn.get(path.encode(), db=self._items)
                vec = raw and txn.get(_vector_key(encoder_key, json.loads(raw)["sha256"]), db=self._vectors)
                if not vec:
                    raise SimsearchError(f"{path}: no vector for {encoder_key} in {self.root} (skipped when indexed?)")
                out[row] = np.frombuffer(vec, dtype="<f4")
        return out

    def paths_of(self, ids: Iterable[int]) -> list[str | None]:
        """Item paths for ids (None for an id that is gone, e.g. from a stale index)."""
        with self.env.begin(db=self._ids) as txn:
            out = []
            for i in ids:
                raw = txn.get(_ID.pack(int(i)))
                out.append(raw.decode() if raw else None)
        return out

    def iter_vector_blocks(self, encoder_key: str, dim: int, block: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids (n,) int64, vectors (n, dim) float32) in blocks, for every item that has a vector."""
        ids: list[int] = []
        vecs = np.empty((block, dim), dtype=np.float32)
        with self.env.begin() as txn:
            for _, raw in txn.cursor(db=self._items):
                rec = json.loads(raw)
                v = txn.get(_vector_key(encoder_key, rec["sha256"]), db=self._vectors)
                if v is None:
                    continue
                vecs[len(ids)] = np.frombuffer(v, dtype="<f4")
                ids.append(rec["id"])
                if len(ids) == block:
                    yield np.asarray(ids, dtype=np.int64), vecs.copy()
                    ids = []
        if ids:
            yield np.asarray(ids, dtype=np.int64), vecs[: len(ids)].copy()

    # -- writes --------------------------------------------------------------------------------
    def put_items(self, encoder_key: str, items: list[tuple[str, str, int, int, np.ndarray | None]]) -> None:
        """Add or update items and their vectors in one transaction.

        items: (path, sha256, size, mtime_ns, vector (dim,) or None when the vector is already stored).
        """
        with self.env.begin(write=True) as txn:
            next_id = self._counter(txn, b"next_id")
            for path, sha, size, mtime_ns, vec in items:
                key = path.encode()
                old = txn.get(key, db=self._items)
                if old is not None:
                    item_id = json.loads(old)["id"]  # a changed file keeps its id
                else:
                    item_id, next_id = next_id, next_id + 1
                    txn.put(_ID.pack(item_id), key, db=self._ids)
                rec = ItemRecord(item_id, sha, size, mtime_ns)
                txn.put(key, json.dumps(asdict(rec)).encode(), db=self._items)
                if vec is not None:
                    txn.put(_vector_key(encoder_key, sha), np.asarray(vec, dtype="<f4").tobytes(), db=self._vectors)
            txn.put(b"next_id", _ID.pack(next_id), db=self._meta)
            self._bump_generation(txn)

    def remove_items(self, paths: Iterable[str]) -> int:
        n = 0
        with self.env.begin(write=True) as txn:
            for path in paths:
                raw = txn.pop(path.encode(), db=self._items)
                if raw is not None:
                    txn.delete(_ID.pack(json.loads(raw)["id"]), db=self._ids)
                    n += 1
            if n:
                self._bump_generation(txn)
        return n

    def sweep_vectors(self) -> int:
        """Delete vectors whose content no item has any more (removed or changed files)."""
        with self.env.begin() as txn:
            live = {json.loads(v)["sha256"] for _, v in txn.cursor(db=self._items)}
        dead = []
        with self.env.begin(db=self._vectors) as txn:
            for k in txn.cursor().iternext(values=False):
                if k.rsplit(b"\0", 1)[1].decode() not in live:
                    dead.append(k)
        if dead:
            with self.env.begin(write=True, db=self._vectors) as txn:
                for k in dead:
                    txn.delete(k)
        return len(dead)

    def _counter(self, txn, name: bytes) -> int:
        raw = txn.get(name, db=self._meta)
        return _ID.unpack(raw)[0] if raw else 0

    def _bump_generation(self, txn) -> None:
        txn.put(b"generation", _ID.pack(self._counter(txn, b"generation") + 1), db=self._meta)
