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

A server that checks credentials gets them from SIMSEARCH_MILVUS_TOKEN (`user:password`, or an API key),
never from the URI: the db records the URI in its manifest, and error messages show it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import numpy as np

from simsearch.devices import Device
from simsearch.errors import DbCorruptError, SimsearchError
from simsearch.indexer.manifest import EncoderEntry
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import (REPAIR_HINT, Applied, Backend, Finding, IndexStatus, Job, Progress,
                                        RefreshConfig)

log = logging.getLogger(__name__)
T = TypeVar("T")

LITE_FILE = "milvus.db"  # the default Milvus Lite data folder, inside the db folder
TOKEN_ENV = "SIMSEARCH_MILVUS_TOKEN"  # a server's credentials: `user:password` or an API key
INSTALL_HINT = "pip install -e '.[milvus]'"
MAX_TOPK = 16384  # the most hits a Milvus server returns per query


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


def check_uri(uri: str) -> None:
    """Refuse a server URI that carries credentials (`http://user:password@host`): the db would record them."""
    if not is_lite(uri) and "@" in urlsplit(uri).netloc:
        raise SimsearchError(f"--uri: give the Milvus server's address without credentials (the db records it) and "
                             f"the credentials in {TOKEN_ENV} (user:password, or an API key)")


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


def _failures() -> tuple[type[BaseException], ...]:
    """What a failed Milvus call raises: a MilvusException, or a gRPC error pymilvus lets through (a server that
    checks credentials refuses a call without them so: UNAUTHENTICATED)."""
    import grpc

    return _pymilvus().exceptions.MilvusException, grpc.RpcError


def _why(e: BaseException) -> str:
    """One line of a failure `_failures` names."""
    import grpc

    def code(error: BaseException):
        return error.code() if isinstance(error, grpc.RpcError) and callable(getattr(error, "code", None)) else None

    # pymilvus reports refused credentials as "Fail connecting to server": the gRPC error it chains says why. Its
    # chains can loop (`raise e from e`).
    cause, seen = e, set()
    while cause is not None and id(cause) not in seen and code(cause) != grpc.StatusCode.UNAUTHENTICATED:
        seen.add(id(cause))
        cause = cause.__cause__
    if cause is not None and id(cause) not in seen:
        text = _one_line(cause.details() if callable(getattr(cause, "details", None)) else cause)
        return f"{text}: the server checks credentials; set {TOKEN_ENV} to user:password or an API key"
    if not isinstance(e, grpc.RpcError):
        return _one_line(e.message)
    text = _one_line(e.details() if callable(getattr(e, "details", None)) else e)
    return f"{code(e).name.lower()}: {text}" if code(e) else text


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
            raise SimsearchError(f"--uri {uri}: a Milvus Lite file's name ends in .db; a server is "
                                 "http://host:19530")
        if importlib.util.find_spec("milvus_lite") is None:
            raise SimsearchError(f"{uri}: a Milvus Lite file needs milvus-lite ({INSTALL_HINT}); or pass a server "
                                 "as --uri http://host:19530")
    token = "" if is_lite(uri) else os.environ.get(TOKEN_ENV, "")
    try:
        return pymilvus.MilvusClient(uri=uri, token=token, timeout=timeout_s)
    except _failures() as e:
        if is_lite(uri) and _lite_busy(uri):
            raise SimsearchError(f"the Milvus Lite file {uri} is in use by another process (Milvus Lite serves one "
                                 f"at a time): wait for it, or serve the file with `milvus-lite server --data-dir "
                                 f"{uri}` and pass --uri http://127.0.0.1:19530") from None
        if is_lite(uri) and Path(uri).parent.is_dir():
            raise SimsearchError(f"cannot open the Milvus Lite file {uri} (not a Milvus Lite folder, unreadable or "
                                 "damaged?): the stored vectors are intact; move it aside and run `simsearch index "
                                 "FOLDER --backend milvus` to mirror them again") from None
        raise SimsearchError(f"cannot connect to Milvus at {uri} ({_why(e)})") from None


def _close_client(client, uri: str) -> None:
    client.close()
    if is_lite(uri):  # stop this process's Milvus Lite server: it flushes the folder and releases its lock
        from milvus_lite import server_manager_instance

        server_manager_instance.release_server(uri)


@contextmanager
def _milvus_errors(uri: str) -> Iterator[None]:
    """A failed Milvus call becomes a one-line SimsearchError naming the URI."""
    try:
        yield
    except _failures() as e:
        raise SimsearchError(f"Milvus at {uri}: {_why(e)}") from None


@contextmanager
def _connect(uri: str, timeout_s: float) -> Iterator:
    client = _open_client(uri, timeout_s)
    try:
        with _milvus_errors(uri):
            yield client
    finally:
        _close_client(client, uri)


STRONG = {"consistency_level": "Strong"}  # a server answers once it has applied every write made before the call


def _count(client, collection: str, consistency: dict = STRONG) -> int:
    rows = client.query(collection, output_fields=["count(*)"], **consistency)
    return int(rows[0]["count(*)"])


def _dim(client, collection: str) -> int | None:
    """The collection's vector dimension, or None when there is no such collection."""
    if not client.has_collection(collection):
        return None
    fields = client.describe_collection(collection)["fields"]
    return next((int(f["params"]["dim"]) for f in fields if f["name"] == "vector"), None)


# -- the backend --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MilvusState:
    """The Milvus backend's state of one encoder in the manifest (its entry's `index` object)."""

    uri: str  # as `record_uri` keeps it: a Lite folder inside the db relative to it
    collection: str
    params: dict  # the HNSW parameters it was built with (MilvusConfig.index_params)
    count: int = 0  # vectors in the collection
    # Unix time (the writer's clock) after the refresh's last write; 0: unknown (a db written before it was kept).
    synced_at: float = 0.0

    @classmethod
    def of(cls, entry: EncoderEntry, name: str) -> MilvusState | None:
        """The state an entry records (None: no Milvus mirror published); DbCorruptError names a bad field."""
        if entry.backend != MilvusBackend.name or not entry.index:
            return None
        types = {"uri": str, "collection": str, "params": dict, "count": int, "synced_at": (int, float)}
        required = set(types) - {"synced_at"}
        if (not required <= set(entry.index) <= set(types)
                or any(f in entry.index and not isinstance(entry.index[f], t) for f, t in types.items())):
            raise DbCorruptError(f"the manifest's Milvus state of {name} is not uri, collection, params, count "
                                 f"(and synced_at); {REPAIR_HINT}")
        return cls(**entry.index)


@dataclass
class _Mirror:
    """What one refresh works on: an open client, the URI it reached, the collection."""

    client: object
    uri: str
    recorded: str
    collection: str


class MilvusBackend(Backend):
    """The encoder's stored vectors mirrored to a Milvus collection, searched there."""

    name = "milvus"
    takes_uri = True

    def __init__(self, config: MilvusConfig = MilvusConfig()):
        self.config = config

    def open(self, store: Store, name: str, entry: EncoderEntry, device: Device = Device.auto,
             uri: str | None = None) -> MilvusIndex:
        """The search side of `name`'s mirror; `uri` (a server, or a Lite file relative to the working directory)
        overrides the recorded one."""
        state = MilvusState.of(entry, name)
        if state is None:
            raise SimsearchError(f"the Milvus mirror of {name} in {store.root} was never made: {REPAIR_HINT}")
        if uri:
            check_uri(uri)
        return MilvusIndex(uri or resolve_uri(store.root, state.uri), state.collection, entry.dim, state.params,
                           self.config.connect_timeout_s, state.synced_at)

    def validate(self, config: RefreshConfig) -> None:
        if config.uri:
            check_uri(config.uri)

    # -- refresh steps ---------------------------------------------------------------------------------
    @contextmanager
    def connect(self, job: Job) -> Iterator[_Mirror]:
        """uri: the one asked (a path is relative to the working directory), else the recorded one, else
        `<db>/milvus.db`."""
        try:
            state = MilvusState.of(job.entry, job.name)
        except DbCorruptError:
            state = None  # mirrored again from scratch
        uri = job.config.uri or (resolve_uri(job.store.root, state.uri) if state else str(job.store.root / LITE_FILE))
        collection = state.collection if state else collection_name(job.store.root, job.name)
        with _connect(uri, self.config.connect_timeout_s) as client:
            yield _Mirror(client, uri, record_uri(job.store.root, uri), collection)

    def _state(self, job: Job, count: int) -> dict:
        return dataclasses.asdict(MilvusState(job.conn.recorded, job.conn.collection, self.config.index_params(),
                                              count, round(time.time(), 3)))

    def rebuild_reason(self, job: Job) -> str | None:
        """Why the recorded mirror cannot be updated in place, or None."""
        try:
            state = MilvusState.of(job.entry, job.name)
        except DbCorruptError as e:
            return str(e)
        if state.uri != job.conn.recorded:
            return f"the URI changed from {state.uri} to {job.conn.recorded}"
        if state.params != self.config.index_params():
            return "other index parameters asked"
        dim = _dim(job.conn.client, job.conn.collection)
        if dim is None:
            return "the collection is missing"
        if dim != job.entry.dim:
            return f"the collection holds {dim}-d vectors, the encoder makes {job.entry.dim}-d"
        return None

    def update(self, job: Job, changed: np.ndarray) -> Applied | str:
        """Upsert the changed ids that are live with a vector, delete the others; then the collection must hold
        what the store does."""
        client, collection = job.conn.client, job.conn.collection
        client.load_collection(collection)  # counted below; a server counts only loaded collections
        upserted, deleted = _apply_changes(client, collection, job.store, job.entry, changed, self.config,
                                           job.on_progress)
        count, expected = _count(client, collection), job.store.vector_count(job.entry.key)
        if count != expected:
            why = f"the collection holds {count} vectors, the store {expected}"
            log.warning("Milvus collection %s at %s: %s; mirroring every stored vector again", collection,
                        job.conn.uri, why)
            return why
        return Applied(self._state(job, count), count, upserted, deleted)

    def rebuild(self, job: Job) -> Applied:
        client, collection = job.conn.client, job.conn.collection
        expected = job.store.vector_count(job.entry.key)
        _fill(client, collection, job.store, job.entry, expected, self.config, job.on_progress)
        count = _count(client, collection)
        if count != expected:
            raise SimsearchError(f"Milvus at {job.conn.uri}: the collection {collection} holds {count} vectors after "
                                 f"mirroring {expected}")
        return Applied(self._state(job, count), count, count)

    def drop(self, store: Store, name: str, state: dict) -> None:
        """The Milvus collection is left where it is: dropping it would need the server."""
        log.info("the index of %s left Milvus; the collection %s at %s is left as it is", name,
                 state.get("collection"), state.get("uri"))

    # -- check and info --------------------------------------------------------------------------------
    def check(self, store: Store, name: str, entry: EncoderEntry, known_ids: set[int]) -> tuple[list[Finding], dict | None]:
        """A mirror has no index file: its collection must exist and hold what the manifest and the store say
        (counts; Milvus is not asked for every id)."""
        try:
            state = MilvusState.of(entry, name)
            if state is None:
                return [Finding("warning", f"the Milvus mirror of {name} was never made: {REPAIR_HINT}")], None
            with _connect(resolve_uri(store.root, state.uri), self.config.connect_timeout_s) as client:
                present = client.has_collection(state.collection)
                if present:
                    client.load_collection(state.collection)
                    count = _count(client, state.collection)
        except SimsearchError as e:
            return [Finding("error", str(e))], None
        collection = f"the Milvus collection {state.collection} of {name} at {state.uri}"
        if not present:
            return [Finding("error", f"{collection} is missing; {REPAIR_HINT}")], None
        facts = {"vectors": count, "backend": self.name, "uri": state.uri}
        if count != state.count:
            return [Finding("error", f"{collection} holds {count} vectors, the manifest says {state.count}; "
                                     f"{REPAIR_HINT}")], facts
        if not entry.up_to_date(store.generation):
            return [Finding("warning", f"{collection} is older than the store (an interrupted or running `index`): "
                                       f"{REPAIR_HINT}")], facts
        expected = store.vector_count(entry.key)
        if count != expected:
            return [Finding("error", f"{collection} holds {count} vectors, the store {expected}; {REPAIR_HINT}")], facts
        return [], facts

    def state_of(self, entry: EncoderEntry, name: str) -> MilvusState | None:
        return MilvusState.of(entry, name)

    def describe(self, store: Store, name: str, entry: EncoderEntry, state: MilvusState, verify: bool) -> IndexStatus:
        """Read from the manifest only (`check` asks Milvus)."""
        uri = resolve_uri(store.root, state.uri)
        params = {"collection": state.collection, **state.params}
        text = "hnsw (" + ", ".join(f"{k} {v}" for k, v in params.items()) + ")"
        return IndexStatus(self.name, "hnsw", state.count, f"milvus at {uri}: {text}", params, uri=uri,
                           up_to_date=entry.up_to_date(store.generation))


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
    # A server keeps inserted rows in growing segments, searched by brute force, until it seals them itself (its
    # dataNode.segment.syncPeriod, 10 min by default). Flushing seals them now; the server then builds their HNSW
    # index and hands them to its query nodes within seconds (20k x 128: 200 queries 0.72 s -> 0.15 s on 2.3.5).
    client.flush(collection)
    log.info("Milvus collection %s: created, %d vectors inserted", collection, done)



class MilvusIndex:
    """A Milvus collection as a VectorIndex (backend.py). The client is opened by the first call and held until
    `close()`."""

    device = "cpu"  # the vectors are searched on the Milvus side; nothing runs on this machine's GPU

    def __init__(self, uri: str, collection: str, dim: int, params: dict, connect_timeout_s: float = 10.0,
                 synced_at: float = 0.0):
        self.uri = uri
        self.synced_at = synced_at  # MilvusState.synced_at
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

    def reload(self) -> MilvusIndex:
        """A collection is updated in place: searching it again sees the newest state."""
        return self

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            _close_client(client, self.uri)

    def _consistency(self) -> dict:
        """How a search or count asks for fresh data. Strong makes a server wait for its next time tick on every
        call (p50 200 ms on 2.3.5, against 2-3 ms for the search itself). A guarantee timestamp at the last sync is
        served at once by a server that has applied that sync (it had: a sync ends with a Strong count), and the
        answer still includes every write the server has applied since. The writer's clock stands for the
        server's: one behind by d may hide the sync's last d of writes; one ahead is capped at the reader's clock,
        so a search waits at most for the reader's lead over the server."""
        if not self.synced_at:
            return STRONG
        from pymilvus import mkts_from_unixtime

        return {"consistency_level": "Customized",
                "guarantee_timestamp": mkts_from_unixtime(min(self.synced_at, time.time()))}

    def _call(self, fn: Callable[[object], T]) -> T:
        """fn(client). A server that restarted answers "collection not loaded" until it has loaded its collections
        again (tens of seconds on 2.3.5), so a held index (`simsearch serve`) would fail until then: after a failure
        the collection is loaded again, which waits for the server, and fn tried once more."""
        client = self._open()
        with _milvus_errors(self.uri):
            try:
                return fn(client)
            except _failures() as e:
                log.info("Milvus at %s: %s; loading %s again", self.uri, _why(e), self.collection)
                client.load_collection(self.collection)
                return fn(client)

    @property
    def ntotal(self) -> int:
        return self._call(lambda client: _count(client, self.collection, self._consistency()))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, dim) -> scores (Q, k') and ids (Q, k'), k' <= k (the longest answer), best first (-1: no answer)."""
        if k > MAX_TOPK:
            raise SimsearchError(f"Milvus returns at most {MAX_TOPK} hits per query (asked for {k})")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not len(queries):
            return np.empty((0, 0), dtype=np.float32), np.empty((0, 0), dtype=np.int64)
        # ef below k is refused by a server (and would cut the answer short)
        params = {"metric_type": "IP", "params": {"ef": max(self.ef, k)}}
        answers = self._call(lambda client: client.search(self.collection, data=queries, limit=k, output_fields=["id"],
                                                          search_params=params, **self._consistency()))
        width = max((len(a) for a in answers), default=0)
        scores = np.full((len(queries), width), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), width), -1, dtype=np.int64)
        for row, answer in enumerate(answers):
            ids[row, :len(answer)] = [hit["id"] for hit in answer]
            scores[row, :len(answer)] = [hit["distance"] for hit in answer]
        return scores, ids
