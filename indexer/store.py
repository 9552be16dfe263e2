"""The db folder: an LMDB environment (items, vectors) plus `manifest.json` and the FAISS index files.

Layout of one db folder:
    manifest.json                  schema version, per-encoder facts (dim, policy, backend and its index state)
    store.lmdb/                    LMDB: items (path -> meta), ids (id -> path), removed, vectors, changes, meta
    index/                         what a vector backend keeps in the db (FAISS: one file per build; retrieval/)
    lock                           the writer lock (see lock.py)

Vectors are keyed by encoder key + content sha256, not by path: a renamed or touched file reuses
its vector, and a benchmark re-run on the same images embeds nothing. Every write is one LMDB
transaction (crash-safe); manifest.json is replaced atomically, only under the writer lock.

Paths are stored as the file system's bytes (`os.fsencode`), so any file name round-trips exactly,
including names that are not valid UTF-8 (they come back as str with surrogate escapes).

Every write also logs the ids it touched under its generation (the `changes` table), so an index built
at generation G is brought up to date by re-reading only the ids changed after G (`changed_ids`).

A removed item leaves a tombstone (its id keeps its path, and its vector stays) until every
encoder's index has been rebuilt without it: a reader holding an older index always finds the
path of every id that index returns.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import lmdb
import numpy as np

from simsearch.errors import DbCorruptError, DbNotFoundError, NotFoundError, SimsearchError
from simsearch.indexer.lmdb_file import check_data_file
from simsearch.indexer.lock import DbLock
from simsearch.atomic import lacks_space, no_space, write_atomic
from simsearch.indexer.manifest import MANIFEST, EncoderEntry, Manifest, parse_manifest

log = logging.getLogger(__name__)

LMDB_DIR = "store.lmdb"
INDEX_DIR = "index"
REBUILD_HINT = "run `simsearch index FOLDER --rebuild` (moves the broken db aside, keeping its files, and indexes again)"
# Virtual address space only: LMDB grows the file as data arrives (1 TiB ~ 200M 1280-d vectors).
MAP_SIZE = 1 << 40
_ID = struct.Struct(">q")  # big-endian so LMDB's byte order is id order
SWEEP_SHARE, SWEEP_MIN = 0.01, 1000  # vectors of forgotten items are swept once they are this many


@dataclass(frozen=True)
class ItemRecord:
    id: int
    sha256: str
    size: int
    mtime_ns: int


def _vector_key(encoder_key: str, sha256: str) -> bytes:
    return f"{encoder_key}\0{sha256}".encode()


def _path_key(path: str) -> bytes:
    return os.fsencode(path)


class Store:
    """Items, vectors and the manifest of one db folder.

    Opened for writing, it holds the db's writer lock until closed (`wait=False`: DbBusyError at
    once instead of waiting). Read-only opens take no lock and never block a writer. `rebuild`: move
    whatever db files are there aside (`move_aside`, under the lock) and start an empty db.
    """

    def __init__(self, root: str | os.PathLike, create: bool = False, readonly: bool = False, wait: bool = True,
                 rebuild: bool = False):
        self.root = Path(root)
        self.readonly = readonly
        self.moved_to: Path | None = None  # where `rebuild` put the old files
        if self.root.exists() and not self.root.is_dir():
            raise DbNotFoundError(f"{self.root} is a file, not a db folder: pass another --db")
        manifest_path = self.root / MANIFEST
        # A writer locks only a db (or one it is asked to create): never leave a lock file in some other folder.
        writes = not readonly and (create or rebuild or manifest_path.is_file())
        if writes:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DbNotFoundError(f"cannot create the db folder {self.root} ({e.strerror})") from None
        self.lock = DbLock(self.root, wait) if writes else None
        if self.lock:
            self.lock.acquire()
        try:
            if rebuild and self.lock:
                self.moved_to = move_aside(self.root)
            self._open(manifest_path, create or rebuild)
        except BaseException:
            self.close()
            raise

    def _open(self, manifest_path: Path, create: bool) -> None:
        if manifest_path.is_file():
            self.manifest = self.read_manifest()
        elif create and not self.readonly:
            self.manifest = Manifest()
        else:
            raise DbNotFoundError(f"no simsearch db at {self.root} (run `simsearch index FOLDER` first, or pass --db)")
        check_data_file(self.root / LMDB_DIR / "data.mdb", REBUILD_HINT)
        if not self.readonly:
            (self.root / INDEX_DIR).mkdir(exist_ok=True)
        try:
            self.env = lmdb.open(str(self.root / LMDB_DIR), map_size=MAP_SIZE, max_dbs=8, readonly=self.readonly)
            tables = [self.env.open_db(name, create=not self.readonly) for name in (b"items", b"ids", b"vectors", b"meta")]
            self._items, self._ids, self._vectors, self._meta = tables
            # Tombstones came with schema 2: a read-only open of an older db has none.
            no_tombstones = self.readonly and not self._has_table(b"removed")
            self._removed = None if no_tombstones else self.env.open_db(b"removed", create=not self.readonly)
            # Perceptual hashes and cached local features (duplicates) came after schema 5: a read-only open of
            # an older db has neither table, and its images are hashed when `dupes` needs them.
            self._hashes, self._features = (
                self.env.open_db(t, create=not self.readonly) if not self.readonly or self._has_table(t) else None
                for t in (b"hashes", b"features"))
            # The change log came with schema 4; it covers the generations after `changes_since`.
            self._changes = None
            if not self.readonly or self._has_table(b"changes"):
                self._changes = self.env.open_db(b"changes", create=not self.readonly)
                if not self.readonly:
                    with self.env.begin(write=True, db=self._meta) as txn:
                        if txn.get(b"changes_since") is None:
                            txn.put(b"changes_since", _ID.pack(self._counter(txn, b"generation")))
        except lmdb.Error as e:
            if self.readonly and not (self.root / LMDB_DIR / "data.mdb").is_file():
                raise DbNotFoundError(f"the db at {self.root} is incomplete ({e}); re-run `simsearch index`") from None
            if isinstance(e, (lmdb.CorruptedError, lmdb.InvalidError, lmdb.PageNotFoundError, lmdb.VersionMismatchError)):
                raise DbCorruptError(f"{self.root / LMDB_DIR}: damaged ({e}); {REBUILD_HINT}") from None
            raise SimsearchError(f"{self.root / LMDB_DIR}: cannot be opened ({e})") from None
        if not manifest_path.is_file():
            # Written last: a reader that sees the manifest also finds the LMDB env with all its tables.
            self.save_manifest()

    def _has_table(self, name: bytes) -> bool:
        with self.env.begin() as txn:
            return txn.get(name) is not None  # named tables are keys of LMDB's main table

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        env = getattr(self, "env", None)
        if env is not None:
            env.close()
            self.env = None
        if self.lock:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_manifest(self) -> Manifest:
        """The manifest as it is on disk now (readers re-read it to follow a writer's new index)."""
        path = self.root / MANIFEST
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise DbNotFoundError(f"no simsearch db at {self.root} (run `simsearch index FOLDER` first, or pass --db)") from None
        except OSError as e:
            raise DbCorruptError(f"{path}: cannot read ({e.strerror})") from None
        return parse_manifest(raw, path)

    def save_manifest(self) -> None:
        if self.lock is None:
            raise SimsearchError(f"{self.root}: the manifest is only written by the process holding the writer lock")
        write_atomic(self.root / MANIFEST, self.manifest.to_bytes())

    def register_encoder(self, name: str, key: str, dim: int, preprocess: str) -> EncoderEntry:
        """The manifest entry of the encoder about to write vectors (a new entry if its weights or policy changed).

        Saved at once, so even a run killed before its first index names the encoder it was building.
        """
        entry = self.manifest.encoders.get(name)
        if entry is None or entry.key != key or entry.dim != dim:
            entry = EncoderEntry(key=key, dim=dim, preprocess=preprocess)
            self.manifest.encoders[name] = entry
            self.manifest.default_encoder = self.manifest.default_encoder or name
            self.save_manifest()
        return entry

    def set_index_state(self, name: str, backend: str, generation: int, state: dict) -> EncoderEntry:
        """Record that `backend` published `name`'s index of store generation `generation`, with its own `state`
        (opaque here: the backend reads and validates it); saved at once. generation -1, state {}: none published."""
        entry = self.manifest.encoders[name]
        before = entry.backend, entry.index_generation, entry.index
        entry.backend, entry.index_generation, entry.index = backend, generation, dict(state)
        try:
            self.save_manifest()
        except BaseException:  # e.g. a full disk: the manifest on disk still names the old state, and so do we
            entry.backend, entry.index_generation, entry.index = before
            raise
        return entry

    def index_dir(self) -> Path:
        return self.root / INDEX_DIR

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
            raw = txn.get(_path_key(path))
        return ItemRecord(**json.loads(raw)) if raw else None

    def iter_items(self, under: str | None = None) -> Iterator[tuple[str, ItemRecord]]:
        """All items, or those whose path is the file `under` or lies in the folder `under` (path order)."""
        exact = _path_key(under.rstrip(os.sep)) if under else None
        prefix = exact + os.fsencode(os.sep) if exact else b""
        with self.env.begin(db=self._items) as txn:
            if exact is not None and (raw := txn.get(exact)) is not None:
                yield os.fsdecode(exact), ItemRecord(**json.loads(raw))
            cur = txn.cursor()
            if not cur.set_range(prefix):
                return
            for k, v in cur:
                if not k.startswith(prefix):
                    break
                yield os.fsdecode(k), ItemRecord(**json.loads(v))

    def has_vector(self, encoder_key: str, sha256: str) -> bool:
        with self.env.begin(db=self._vectors) as txn:
            return txn.get(_vector_key(encoder_key, sha256)) is not None

    def get_vector(self, encoder_key: str, sha256: str) -> np.ndarray | None:
        with self.env.begin(db=self._vectors) as txn:
            raw = txn.get(_vector_key(encoder_key, sha256))
        return None if raw is None else np.frombuffer(raw, dtype="<f4").copy()

    def vectors_of(self, encoder_key: str, paths: list[str], dim: int) -> np.ndarray:
        """(len(paths), dim) float32 vectors of these items, in order; SimsearchError names a missing one."""
        with self.env.begin() as txn:
            raws = [txn.get(_path_key(p), db=self._items) for p in paths]
            return self._gather(txn, encoder_key, dim, paths, [json.loads(r) if r else None for r in raws])

    def vectors_of_ids(self, encoder_key: str, ids: list[int], dim: int, live: bool = False) -> np.ndarray:
        """(len(ids), dim) vectors of items by id, in one read transaction: removed items (tombstones) included, or
        with `live` only the db's items (NotFoundError names another id)."""
        with self.env.begin() as txn:
            paths, records = [], []
            for i in ids:
                key = _ID.pack(int(i))
                path = txn.get(key, db=self._ids)
                record = self._live_record(txn, int(i), path)
                if record is None and live:
                    raise NotFoundError(f"no item with id {i} in the db")
                if record is None and self._removed is not None and (raw := txn.get(key, db=self._removed)):
                    record = json.loads(raw)
                paths.append(os.fsdecode(path) if path else f"item {i}")
                records.append(record)
            return self._gather(txn, encoder_key, dim, paths, records)

    def _gather(self, txn, encoder_key: str, dim: int, names: list[str], records: list[dict | None]) -> np.ndarray:
        out = np.empty((len(names), dim), dtype=np.float32)
        for row, (name, record) in enumerate(zip(names, records)):
            vec = record and txn.get(_vector_key(encoder_key, record["sha256"]), db=self._vectors)
            if not vec:
                raise SimsearchError(f"{name}: no vector for {encoder_key} in {self.root} (skipped when indexed?)")
            out[row] = np.frombuffer(vec, dtype="<f4")
        return out

    def paths_of(self, ids: Iterable[int]) -> list[str | None]:
        """Item paths for ids, in one read transaction (None for an id the db no longer knows)."""
        with self.env.begin(db=self._ids) as txn:
            out = []
            for i in ids:
                raw = txn.get(_ID.pack(int(i)))
                out.append(os.fsdecode(raw) if raw else None)
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

    def changed_ids(self, since: int) -> np.ndarray | None:
        """Ids added, changed or removed after generation `since` (sorted, unique), or None when the change
        log does not reach back that far (a db from before schema 4, or a log pruned past it)."""
        if self._changes is None:
            return None
        with self.env.begin() as txn:
            if since < self._counter(txn, b"changes_since"):
                return None
            cur = txn.cursor(db=self._changes)
            ids = [_ID.unpack(k[8:])[0] for k in cur.iternext(values=False)] if cur.set_range(_ID.pack(since + 1)) else []
        return np.unique(np.asarray(ids, dtype=np.int64))

    def vectors_by_id(self, encoder_key: str, ids: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids that are live items with a vector of this encoder (n,), their vectors (n, dim)): the rest
        of `ids` (removed items, items without such a vector) are left out."""
        found, vecs = [], []
        with self.env.begin() as txn:
            for i in ids:
                record = self._live_record(txn, int(i), txn.get(_ID.pack(int(i)), db=self._ids))
                v = record and txn.get(_vector_key(encoder_key, record["sha256"]), db=self._vectors)
                if v:
                    found.append(int(i))
                    vecs.append(np.frombuffer(v, dtype="<f4"))
        return np.asarray(found, dtype=np.int64), (np.stack(vecs) if vecs else np.empty((0, dim), np.float32))

    # -- perceptual hashes and local features, by content (retrieval/dupes.py) ----------------------------------
    def get_hashes(self, sha256s: Iterable[str]) -> list[bytes | None]:
        """The stored perceptual hashes (indexer/phash.py `Hashes.to_bytes`) of these contents, None where absent."""
        return self._get_by_content(self._hashes, b"", sha256s)

    def put_hashes(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Store (sha256, hashes) pairs in one transaction."""
        self._put_by_content(self._hashes, b"", items)

    def get_features(self, key: str, sha256s: Iterable[str]) -> list[bytes | None]:
        """Cached local features (retrieval/verify.py) of these contents under the feature settings `key`."""
        return self._get_by_content(self._features, key.encode() + b"\0", sha256s)

    def put_features(self, key: str, items: Iterable[tuple[str, bytes]]) -> None:
        self._put_by_content(self._features, key.encode() + b"\0", items)

    def _get_by_content(self, table, prefix: bytes, sha256s: Iterable[str]) -> list[bytes | None]:
        if table is None:
            return [None for _ in sha256s]
        with self.env.begin(db=table) as txn:
            return [bytes(raw) if (raw := txn.get(prefix + s.encode())) is not None else None for s in sha256s]

    def _put_by_content(self, table, prefix: bytes, items: Iterable[tuple[str, bytes]]) -> None:
        if self.readonly:
            raise SimsearchError(f"{self.root}: opened read-only")
        items = list(items)
        with self._writing(sum(len(raw) + 100 for _, raw in items)) as txn:  # a full disk: DiskFullError
            for sha, raw in items:
                txn.put(prefix + sha.encode(), raw, db=table)

    def iter_ids(self) -> Iterator[tuple[int, str, bool]]:
        """(id, path, live) of every id the db knows; live is False for a tombstone."""
        with self.env.begin() as txn:
            for k, path in txn.cursor(db=self._ids):
                item_id = _ID.unpack(k)[0]
                yield item_id, os.fsdecode(path), self._live_record(txn, item_id, path) is not None

    def _live_record(self, txn, item_id: int, path: bytes | None) -> dict | None:
        """The item record of `item_id`, parsed, if it is live. A removed item's path may hold a new item (another
        id) while its tombstone lasts: that record is not this id's."""
        raw = path and txn.get(path, db=self._items)
        record = json.loads(raw) if raw else None
        return record if record and record["id"] == item_id else None

    # -- writes --------------------------------------------------------------------------------
    def put_items(self, encoder_key: str, items: list[tuple[str, str, int, int, np.ndarray | None]]) -> None:
        """Add or update items and their vectors in one transaction.

        items: (path, sha256, size, mtime_ns, vector (dim,) or None when the vector is already stored).
        """
        needed = sum(300 + (0 if vec is None else 4 * len(vec)) for *_, vec in items)  # records, keys, vectors
        with self._writing(needed) as txn:
            next_id = self._counter(txn, b"next_id")
            generation = self._counter(txn, b"generation") + 1
            for path, sha, size, mtime_ns, vec in items:
                key = _path_key(path)
                old = txn.get(key, db=self._items)
                if old is not None:
                    item_id = json.loads(old)["id"]  # a changed file keeps its id
                else:
                    item_id, next_id = next_id, next_id + 1
                    txn.put(_ID.pack(item_id), key, db=self._ids)
                rec = ItemRecord(item_id, sha, size, mtime_ns)
                txn.put(key, json.dumps(asdict(rec)).encode(), db=self._items)
                txn.put(_ID.pack(generation) + _ID.pack(item_id), b"", db=self._changes)
                if vec is not None:
                    txn.put(_vector_key(encoder_key, sha), np.asarray(vec, dtype="<f4").tobytes(), db=self._vectors)
            txn.put(b"next_id", _ID.pack(next_id), db=self._meta)
            txn.put(b"generation", _ID.pack(generation), db=self._meta)

    def remove_items(self, paths: Iterable[str]) -> int:
        """Remove items; their ids stay resolvable (tombstones) until `collect_tombstones`."""
        n = 0
        with self._writing(0) as txn:
            generation = self._counter(txn, b"generation") + 1
            for path in paths:
                raw = txn.pop(_path_key(path), db=self._items)
                if raw is not None:
                    rec = json.loads(raw)
                    txn.put(_ID.pack(rec["id"]), json.dumps({"generation": generation, "sha256": rec["sha256"]}).encode(),
                            db=self._removed)
                    txn.put(_ID.pack(generation) + _ID.pack(rec["id"]), b"", db=self._changes)
                    n += 1
            if n:
                txn.put(b"generation", _ID.pack(generation), db=self._meta)
        return n

    def collect_tombstones(self) -> int:
        """Forget removed items that no published index can return any more; sweep their vectors in bulk.

        An index built at generation G holds none of the items removed at or before G, so a tombstone
        is dropped once every built index in the manifest is at least as new as its removal. The sweep
        reads every item (~7 s at 1M), so it waits until SWEEP_SHARE of the items have been forgotten:
        until then a removed image's vector stays (a file with that content added back reuses it).
        """
        built = [e.index_generation for e in self.manifest.encoders.values() if e.has_index]
        oldest = min(built, default=self.generation)
        n = 0
        with self._writing(0) as txn:
            for k, raw in list(txn.cursor(db=self._removed)):
                if json.loads(raw)["generation"] <= oldest:
                    txn.delete(k, db=self._removed)
                    path = txn.get(k, db=self._ids)
                    txn.delete(k, db=self._ids)
                    n += 1
                    log.debug("forgot removed item %d (%r)", _ID.unpack(k)[0], path)
            unswept = self._counter(txn, b"unswept") + n
            sweep = n and unswept >= max(SWEEP_MIN, SWEEP_SHARE * txn.stat(self._items)["entries"])
            txn.put(b"unswept", _ID.pack(0 if sweep else unswept), db=self._meta)
        if sweep:
            self.sweep_vectors()
        self.prune_changes(oldest)
        return n

    def sweep_vectors(self) -> int:
        """Delete vectors whose content no item (live or tombstone) has any more."""
        with self.env.begin() as txn:
            live = {json.loads(v)["sha256"] for _, v in txn.cursor(db=self._items)}
            live |= {json.loads(v)["sha256"] for _, v in txn.cursor(db=self._removed)}
        dead = []
        with self.env.begin(db=self._vectors) as txn:
            for k in txn.cursor().iternext(values=False):
                if k.rsplit(b"\0", 1)[1].decode() not in live:
                    dead.append(k)
        if dead:
            with self._writing(0) as txn:
                for k in dead:
                    txn.delete(k, db=self._vectors)
        return len(dead)

    def prune_changes(self, upto: int) -> None:
        """Forget the change log up to generation `upto` (every index is at least that new)."""
        with self._writing(0) as txn:
            if upto <= self._counter(txn, b"changes_since"):
                return
            cur = txn.cursor(db=self._changes)
            while cur.first() and _ID.unpack(cur.key()[:8])[0] <= upto:
                cur.delete()
            txn.put(b"changes_since", _ID.pack(upto), db=self._meta)

    @contextlib.contextmanager
    def _writing(self, needed: int) -> Iterator[lmdb.Transaction]:
        """A write transaction, committed when the block ends. A commit that finds no space (LMDB reports a short
        write as EIO, so the disk is asked) raises DiskFullError, the transaction undone: the store is as it was.
        needed: about the bytes it adds (0: it frees pages, but a commit still writes a few)."""
        try:
            with self.env.begin(write=True) as txn:
                yield txn
        except lmdb.Error:
            data = self.root / LMDB_DIR / "data.mdb"
            if code := lacks_space(data, needed):
                raise no_space(data, needed, code) from None
            raise

    def _counter(self, txn, name: bytes) -> int:
        raw = txn.get(name, db=self._meta)
        return _ID.unpack(raw)[0] if raw else 0


def move_aside(root: Path) -> Path | None:
    """Move a broken db's files into `<root>/broken-<time>/` (kept for the user); None if there was nothing.

    The caller holds the writer lock, whose file stays where it is.
    """
    parts = [p for p in (root / MANIFEST, root / LMDB_DIR, root / INDEX_DIR) if p.exists()]
    if not parts:
        return None
    dest = root / time.strftime("broken-%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        dest = root / f"{dest.name.split('.')[0]}.{n}"
        n += 1
    dest.mkdir()
    for p in parts:
        shutil.move(str(p), str(dest / p.name))
    log.warning("moved the broken db files to %s", dest)
    return dest
