"""The `milvus` backend: an encoder's stored vectors mirrored into a Milvus collection, and searched there.

The LMDB store stays the source of truth. The collection is a copy keyed by item id (INT64 primary key
`id`, FLOAT_VECTOR field `vector`), brought up to date from the ids the store logged as changed since
the mirror's generation (live ones upserted, the rest deleted), or filled again from every stored
vector when the log does not reach back that far or the collection does not hold what the manifest
says. Hits map back to paths through the store, as FAISS's do.

Index: HNSW, inner product (the vectors are L2-normalised, so scores are the cosines FAISS gives).
Milvus Lite 3.2.2 builds FLAT/BRUTE_FORCE, HNSW, HNSW_SQ, IVF_FLAT and IVF_SQ8 (IVF_PQ is reserved,
DiskANN absent); HNSW is the kind a Milvus server and Milvus Lite both build from the same parameters
(M, efConstruction; ef at search time) and it needs no training, so the small segments an incremental
update writes are indexed as well as a full build.

A URI is a Milvus server (`http://host:19530`, `https://...`, `tcp://...`, `unix:...`) or a Milvus Lite
data folder (a path ending in `.db`, served from inside this process). Milvus Lite admits one process
per data folder, so a client is opened only when needed and closed (the in-process server stopped,
its lock released) as soon as the work is done. pymilvus is imported only here, on first use.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simsearch.errors import SimsearchError
from simsearch.indexer.manifest import EncoderEntry
from simsearch.indexer.store import Store

log = logging.getLogger(__name__)

LITE_FILE = "milvus.db"  # the default Milvus Lite data folder, inside the db folder
INSTALL_HINT = "pip install -e '.[milvus]'"
MAX_TOPK = 16384  # the most hits a Milvus server returns per query
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class MilvusConfig:
    M: int = 16  # HNSW graph degree
    ef_construction: int = 200
    # Search breadth, raised to k per query (Milvus refuses ef < k). FAISS's HNSW (what Milvus Lite runs) with
    # M 16 / efConstruction 200 reached recall@10 0.995 at ef 64 and 1.0 at ef 128 on 20k clustered 256-d vectors.
    ef: int = 128
    batch_bytes: int = 16 << 20  # vectors per insert/upsert request: well under a server's 64 MiB gRPC limit
    connect_timeout_s: float = 10.0

    def index_params(self) -> dict:
        return {"M": self.M, "efConstruction": self.ef_construction, "ef": self.ef}


# -- URIs and names ----------------------------------------------------------------------------------

def is_lite(uri: str) -> bool:
    """A Milvus Lite data folder (a path), not a server address."""
    return "://" not in uri and not uri.startswith("unix:")


def record_uri(root: Path, uri: str) -> str:
    """What the manifest keeps: a Lite folder inside the db relative to it (the db can move), other paths absolute."""
    if not is_lite(uri):
        return uri
    path = Path(uri).absolute()
    try:
        return str(path.relative_to(Path(root).absolute()))
    except ValueError:
        return str(path)


def resolve_uri(root: Path, recorded: str) -> str:
    """The URI a client opens for a recorded one (`record_uri`'s inverse)."""
    return str(Path(root) / recorded) if is_lite(recorded) else recorded


def collection_name(root: Path, name: str) -> str:
    """`simsearch_<encoder>_<hash12>`: Milvus names allow [A-Za-z0-9_] and start with a letter or `_`; the hash of
    the db folder and the exact encoder name keeps two dbs on one server (or two names that map to the same
    characters) apart."""
    digest = hashlib.sha256(os.fsencode(Path(root).absolute()) + b"\0" + name.encode()).hexdigest()[:12]
    return f"simsearch_{re.sub(r'[^A-Za-z0-9_]', '_', name)[:200]}_{digest}"


# -- connections -------------------------------------------------------------------------------------

def _pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise SimsearchError(f"the Milvus backend needs pymilvus: {INSTALL_HINT}") from None
    # pymilvus gives itself a stderr handler at import and logs every failed call with a traceback, and Milvus
    # Lite logs a failed start the same way; each failure also reaches us as an exception that becomes a
    # one-line SimsearchError, so their own lines would only repeat it as a traceback.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    logging.getLogger("milvus_lite.server_manager").setLevel(logging.CRITICAL)
    return pymilvus


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]


def _lite_busy(uri: str) -> bool:
    """Whether another process holds the Milvus Lite folder's lock (its `LOCK` file, flock'ed while open)."""
    try:
        fd = os.open(Path(uri) / "LOCK", os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _open_client(uri: str, timeout_s: float):
    pymilvus = _pymilvus()
    if is_lite(uri):
        if not uri.endswith(".db"):
            raise SimsearchError(f"--milvus-uri {uri}: a Milvus Lite file's name ends in .db; a server is "
                                 "http://host:19530")
        if importlib.util.find_spec("milvus_lite") is None:
            raise SimsearchError(f"{uri}: a Milvus Lite file needs milvus-lite ({INSTALL_HINT}); or pass a server "
                                 "as --milvus-uri http://host:19530")
    try:
        return pymilvus.MilvusClient(uri=uri, timeout=timeout_s)
    except pymilvus.exceptions.MilvusException as e:
        if is_lite(uri) and _lite_busy(uri):
            raise SimsearchError(f"the Milvus Lite file {uri} is in use by another process (Milvus Lite serves one "
                                 f"at a time): wait for it, or serve the file with `milvus-lite server --data-dir "
                                 f"{uri}` and pass --milvus-uri http://127.0.0.1:19530") from None
        if is_lite(uri) and Path(uri).parent.is_dir():
            raise SimsearchError(f"cannot open the Milvus Lite file {uri} (not a Milvus Lite folder, unreadable or "
                                 "damaged?): the stored vectors are intact; move it aside and run `simsearch index "
                                 "FOLDER --backend milvus` to mirror them again") from None
        raise SimsearchError(f"cannot connect to Milvus at {uri} ({_one_line(e.message)})") from None


def _close_client(client, uri: str) -> None:
    client.close()
    if is_lite(uri):  # stop this process's Milvus Lite server: it flushes the folder and releases its lock
        from milvus_lite import server_manager_instance

        server_manager_instance.release_server(uri)


@contextmanager
def _milvus_errors(uri: str) -> Iterator[None]:
    """A failed Milvus call becomes a one-line SimsearchError naming the URI."""
    exc = _pymilvus().exceptions.MilvusException
    try:
        yield
    except exc as e:
        raise SimsearchError(f"Milvus at {uri}: {_one_line(e.message)}") from None


@contextmanager
def _connect(uri: str, timeout_s: float) -> Iterator:
    client = _open_client(uri, timeout_s)
    try:
        with _milvus_errors(uri):
            yield client
    finally:
        _close_client(client, uri)


def _count(client, collection: str) -> int:
    rows = client.query(collection, output_fields=["count(*)"], consistency_level="Strong")
    return int(rows[0]["count(*)"])


def _dim(client, collection: str) -> int | None:
    """The collection's vector dimension, or None when there is no such collection."""
    if not client.has_collection(collection):
        return None
    fields = client.describe_collection(collection)["fields"]
    return next((int(f["params"]["dim"]) for f in fields if f["name"] == "vector"), None)


# -- mirroring ---------------------------------------------------------------------------------------

def sync_milvus(store: Store, name: str, uri: str | None = None, on_progress: Progress | None = None,
                config: MilvusConfig = MilvusConfig()) -> str | None:
    """Bring the Milvus mirror of `name`'s stored vectors up to date, then point the manifest at it.

    uri: a server or a Milvus Lite file (a path, relative to the working directory); None: the one the
    manifest records, else `<db>/milvus.db`. Returns what was done ("updated: ...", "built", "rebuilt: <why>")
    or None when the mirror was already current. The store must be open for writing.
    """
    entry = store.manifest.encoders[name]
    mirrored = entry.backend == "milvus"
    if uri is None:
        uri = resolve_uri(store.root, entry.backend_uri) if mirrored and entry.backend_uri else str(store.root / LITE_FILE)
    recorded = record_uri(store.root, uri)
    collection = (entry.index_params.get("collection") if mirrored else None) or collection_name(store.root, name)
    generation = store.generation
    expected = store.vector_count(entry.key)
    params = config.index_params()
    with _connect(uri, config.connect_timeout_s) as client:
        problem = _mirror_problem(client, collection, entry, recorded, params) if mirrored else "never mirrored"
        if problem is None:
            client.load_collection(collection)  # counted below; a server counts only loaded collections
            changed = store.changed_ids(entry.index_generation)
            if changed is None:
                problem = "the store's change log does not reach back to the mirror"
            else:
                upserted, deleted = _apply_changes(client, collection, store, entry, changed, config, on_progress)
                count = _count(client, collection)
                if count == expected:
                    if not len(changed):
                        return None
                    outcome = f"updated: {upserted} added or changed, {deleted} removed"
                else:
                    problem = f"the collection holds {count} vectors, the store {expected}"
        if problem is not None:
            if mirrored:
                log.warning("Milvus collection %s at %s: %s; mirroring every stored vector again", collection, uri,
                            problem)
            _fill(client, collection, store, entry, expected, config, on_progress)
            count = _count(client, collection)
            if count != expected:
                raise SimsearchError(f"Milvus at {uri}: the collection {collection} holds {count} vectors after "
                                     f"mirroring {expected}")
            outcome = f"rebuilt: {problem}" if mirrored else "built"
    old_file = store.index_file(entry)
    entry.backend, entry.backend_uri, entry.index_type = "milvus", recorded, "hnsw"
    entry.index_params = {"collection": collection, **params}
    entry.count, entry.index_generation = count, generation
    entry.index_file, entry.index_sha256, entry.index_bytes = None, None, 0
    entry.recall = entry.recall_target = None  # measured for a FAISS index; the mirror's are not tuned
    store.save_manifest()
    if old_file is not None:  # the FAISS index this encoder was searched with before
        old_file.unlink(missing_ok=True)
    store.collect_tombstones()
    return outcome


def _mirror_problem(client, collection: str, entry: EncoderEntry, recorded: str, params: dict) -> str | None:
    """Why the recorded mirror cannot be updated in place, or None."""
    if entry.backend_uri != recorded:
        return f"the URI changed from {entry.backend_uri} to {recorded}"
    if {k: entry.index_params.get(k) for k in params} != params:
        return "other index parameters asked"
    dim = _dim(client, collection)
    if dim is None:
        return "the collection is missing"
    if dim != entry.dim:
        return f"the collection holds {dim}-d vectors, the encoder makes {entry.dim}-d"
    return None


def _rows_per_request(dim: int, config: MilvusConfig) -> int:
    return max(1, config.batch_bytes // (4 * dim))


def _rows(ids: np.ndarray, vectors: np.ndarray) -> list[dict]:
    return [{"id": int(i), "vector": v} for i, v in zip(ids, vectors)]


def _apply_changes(client, collection: str, store: Store, entry: EncoderEntry, changed: np.ndarray,
                   config: MilvusConfig, on_progress: Progress | None) -> tuple[int, int]:
    """Upsert the changed ids that are live with a vector, delete the others: (upserted, deleted)."""
    step = _rows_per_request(entry.dim, config)
    upserted = deleted = 0
    for start in range(0, len(changed), step):
        chunk = changed[start:start + step]
        ids, vectors = store.vectors_by_id(entry.key, chunk, entry.dim)  # (n,), (n, dim)
        gone = np.setdiff1d(chunk, ids)  # removed items, or items without a vector of this encoder
        if len(ids):
            client.upsert(collection, _rows(ids, vectors))
        if len(gone):
            client.delete(collection, ids=gone.tolist())
        upserted, deleted = upserted + len(ids), deleted + len(gone)
        if on_progress:
            on_progress("updating the Milvus collection", start + len(chunk), len(changed))
    if len(changed):
        log.info("Milvus collection %s: upserted %d, deleted %d", collection, upserted, deleted)
    return upserted, deleted


def _fill(client, collection: str, store: Store, entry: EncoderEntry, expected: int, config: MilvusConfig,
          on_progress: Progress | None) -> None:
    """Drop and create the collection, then insert every stored vector of the encoder, block by block."""
    pymilvus = _pymilvus()
    if client.has_collection(collection):
        client.drop_collection(collection)
    schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
    schema.add_field("vector", pymilvus.DataType.FLOAT_VECTOR, dim=entry.dim)
    index_params = client.prepare_index_params()
    index_params.add_index(field_name="vector", index_type="HNSW", metric_type="IP",
                           params={"M": config.M, "efConstruction": config.ef_construction})
    # Strong consistency: a search or count right after a sync sees all of it.
    client.create_collection(collection, schema=schema, consistency_level="Strong")
    # sync=False: an empty collection's index has nothing to wait for, and the wait would poll every 0.5 s from a
    # timestamp call Milvus Lite does not implement (its gRPC server logs that with a traceback).
    client.create_index(collection, index_params, sync=False)
    client.load_collection(collection)
    done = 0
    for ids, vectors in store.iter_vector_blocks(entry.key, entry.dim, _rows_per_request(entry.dim, config)):
        client.insert(collection, _rows(ids, vectors))
        done += len(ids)
        if on_progress:
            on_progress("filling the Milvus collection", done, expected)
    log.info("Milvus collection %s: created, %d vectors inserted", collection, done)


def leave_milvus(store: Store, name: str) -> None:
    """Point a mirrored encoder back at FAISS (its index is built by the next `refresh_index`); the Milvus
    collection is left where it is (dropping it would need the server)."""
    entry = store.manifest.encoders[name]
    if entry.backend != "milvus":
        return
    log.info("the index of %s goes back to FAISS; the Milvus collection %s at %s is left as it is", name,
             entry.index_params.get("collection"), entry.backend_uri)
    entry.backend, entry.backend_uri, entry.index_type, entry.index_params = "faiss", None, "none", {}
    entry.count, entry.index_generation = 0, -1


def mirror_count(store: Store, entry: EncoderEntry, config: MilvusConfig = MilvusConfig()) -> int | None:
    """Vectors in the encoder's collection (for `check`), None when there is no such collection;
    SimsearchError when Milvus cannot be reached."""
    uri = resolve_uri(store.root, entry.backend_uri or LITE_FILE)
    collection = entry.index_params.get("collection", "")
    with _connect(uri, config.connect_timeout_s) as client:
        if not client.has_collection(collection):
            return None
        client.load_collection(collection)
        return _count(client, collection)


# -- searching ---------------------------------------------------------------------------------------

def open_milvus(store: Store, name: str, entry: EncoderEntry, uri: str | None = None,
                config: MilvusConfig = MilvusConfig()) -> MilvusIndex:
    """The search side of `name`'s mirror; `uri` (a server, or a Lite file relative to the working directory)
    overrides the recorded one."""
    uri = uri or resolve_uri(store.root, entry.backend_uri or LITE_FILE)
    return MilvusIndex(uri, entry.index_params.get("collection") or collection_name(store.root, name), entry.dim,
                       entry.index_params, config.connect_timeout_s)


class MilvusIndex:
    """A Milvus collection with FAISS's LoadedIndex interface (ntotal, search, device) for the Searcher.

    The client is opened by the first call and held until `close()`.
    """

    device = "cpu"  # the vectors are searched on the Milvus side; nothing runs on this machine's GPU

    def __init__(self, uri: str, collection: str, dim: int, params: dict, connect_timeout_s: float = 10.0):
        self.uri = uri
        self.collection = collection
        self.dim = dim
        self.ef = int(params.get("ef", MilvusConfig.ef))
        self.connect_timeout_s = connect_timeout_s
        self._client = None

    def _open(self):
        if self._client is None:
            client = _open_client(self.uri, self.connect_timeout_s)
            try:
                with _milvus_errors(self.uri):
                    if not client.has_collection(self.collection):
                        raise SimsearchError(f"the Milvus collection {self.collection} is missing at {self.uri}: run "
                                             "`simsearch check --repair` to mirror the stored vectors again")
                    client.load_collection(self.collection)  # a server searches only loaded collections
            except BaseException:
                _close_client(client, self.uri)
                raise
            self._client = client
        return self._client

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            _close_client(client, self.uri)

    @property
    def ntotal(self) -> int:
        client = self._open()
        with _milvus_errors(self.uri):
            return _count(client, self.collection)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, dim) -> scores (Q, k') and ids (Q, k'), k' <= k (the longest answer), best first (-1: no answer)."""
        if k > MAX_TOPK:
            raise SimsearchError(f"Milvus returns at most {MAX_TOPK} hits per query (asked for {k})")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not len(queries):
            return np.empty((0, 0), dtype=np.float32), np.empty((0, 0), dtype=np.int64)
        client = self._open()
        with _milvus_errors(self.uri):
            # ef below k is refused by a server (and would cut the answer short)
            answers = client.search(self.collection, data=queries, limit=k, output_fields=["id"],
                                    search_params={"metric_type": "IP", "params": {"ef": max(self.ef, k)}})
        width = max((len(a) for a in answers), default=0)
        scores = np.full((len(queries), width), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), width), -1, dtype=np.int64)
        for row, answer in enumerate(answers):
            ids[row, :len(answer)] = [hit["id"] for hit in answer]
            scores[row, :len(answer)] = [hit["distance"] for hit in answer]
        return scores, ids
