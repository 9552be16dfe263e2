"""The vector-backend interface: where an encoder's stored vectors are indexed and searched.

Two backends implement it: `faiss` (an index file in the db, faiss_index.py) and `milvus` (a collection the
stored vectors are mirrored to, milvus_backend.py). Which one serves an encoder is the db's own record (its
manifest entry's `backend`); nothing outside the backends names one or tests an index's type.

    backend = backend_of(entry)              # or get_backend("milvus")
    index = backend.open(store, name, entry, device, uri)   # VectorIndex: ntotal / search / reload / close
    outcome = backend.refresh(store, name, config, on_progress)   # RefreshOutcome
    findings, facts = backend.check(store, name, entry, known_ids)
    backend.status(store, name, entry)       # IndexStatus, for `info`

The LMDB store stays the source of truth: a backend only ever rebuilds or updates its index from the
stored vectors, and records its own state in the manifest through `Store.set_index_state`.
"""

from __future__ import annotations

import importlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from simsearch.devices import Device
from simsearch.errors import DbCorruptError, EmptyDbError, SimsearchError, UnknownNameError
from simsearch.indexer.manifest import EncoderEntry, Manifest
from simsearch.indexer.store import Store
from simsearch.retrieval.index_plan import IndexConfig

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)
# name -> "module:class"; imported on first use, so a FAISS-only install never imports the Milvus module's deps.
_REGISTRY = {"faiss": "simsearch.retrieval.faiss_index:FaissBackend",
             "milvus": "simsearch.retrieval.milvus_backend:MilvusBackend"}
BACKENDS = tuple(_REGISTRY)
REPAIR_HINT = "run `simsearch check --repair` to rebuild it from the stored vectors (nothing is embedded again)"


class VectorIndex(Protocol):
    """An open index of one encoder's vectors. Ids are the store's item ids."""

    device: str  # where searches run: "cpu" or "cuda"

    @property
    def ntotal(self) -> int:
        """Vectors a search can return."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, dim) float32 -> scores (Q, k') and ids (Q, k'), k' <= k, best first (-1: no answer). The scores are
        exact inner products (a compressed index re-scores its candidates), so callers may cut at a threshold."""

    def reload(self) -> VectorIndex:
        """The newest published state of this index (itself when it is updated in place)."""

    def close(self) -> None:
        """Release what the index holds (a connection, a served file)."""


@dataclass(frozen=True)
class Finding:
    level: str  # "error" | "warning"
    message: str  # one line: what is wrong, then what to do


@dataclass(frozen=True)
class RefreshConfig:
    index: IndexConfig = IndexConfig()  # how an index file is built (kind, memory budget, recall target): FAISS
    uri: str | None = None  # where a backend outside the db lives (a server, a Milvus Lite file); None: the recorded one
    compact: bool = False  # fold what updates added beside the index into it now, whatever its size (`compact`)
    verify: bool = False  # verify every index file's checksum before updating it (`check --repair`); else sizes only


@dataclass(frozen=True)
class RefreshOutcome:
    """What `Backend.refresh` did."""

    # "unchanged" | "updated" (in place) | "compacted" (no change, its deltas folded into it) | "built" (the first
    # time) | "rebuilt" (from every stored vector)
    action: str
    backend: str
    count: int  # vectors in the index now
    added: int = 0  # added or changed (an update), or every vector (a build)
    removed: int = 0
    reason: str | None = None  # why it was rebuilt rather than updated
    seconds: float = 0.0
    compacted: bool = False  # an update that also folded the index's deltas into its base

    @property
    def changed(self) -> bool:
        return self.action != "unchanged"

    def __str__(self) -> str:
        folded = "; deltas folded into the base" if self.compacted else ""
        if self.action == "updated":
            return f"updated: {self.added} added or changed, {self.removed} removed{folded}"
        if self.action == "compacted":
            return "compacted: deltas folded into the base"
        return f"rebuilt: {self.reason}" if self.action == "rebuilt" else self.action


@dataclass(frozen=True)
class IndexStatus:
    """One encoder's index as `info` shows it."""

    backend: str
    kind: str  # flat | ivf | sq8 | ivfpq | hnsw; "none" when never built
    count: int  # vectors in the index
    description: str  # one line: where it is, its kind, parameters, recall
    params: dict = field(default_factory=dict)
    recall: float | None = None  # recall@10 of the tuned search parameters against exact search
    recall_target: float | None = None
    file: str | None = None  # the index file in the db, for a backend that keeps one
    uri: str | None = None  # where it lives, for a backend outside the db
    up_to_date: bool = False
    problem: str | None = None  # why it cannot be used (verified only when asked: it reads the file)


@dataclass
class Applied:
    """What an update or a rebuild left: the backend's new state and its counts."""

    state: dict
    count: int
    added: int = 0
    removed: int = 0
    compacted: bool = False  # the update rewrote the index whole (FAISS: its deltas folded into the base)


@dataclass
class Job:
    """One refresh of one encoder's index, as the skeleton passes it to a backend's steps."""

    store: Store
    name: str
    entry: EncoderEntry
    generation: int  # the store's, read before any vector: what the index will hold
    config: RefreshConfig
    on_progress: Progress | None
    conn: Any = None  # what `connect` opened for the steps (a Milvus client), or None


class Backend(ABC):
    """A kind of vector index. Subclasses give the steps of `refresh` and the rest of the interface."""

    name: ClassVar[str]
    takes_uri: ClassVar[bool] = False  # its index lives outside the db, at a URI (a server, a file)

    # -- the interface ---------------------------------------------------------------------------------
    @abstractmethod
    def open(self, store: Store, name: str, entry: EncoderEntry, device: Device = Device.auto,
             uri: str | None = None) -> VectorIndex:
        """The published index of `name` (entry: its manifest entry), ready to search; `uri` overrides where a
        backend outside the db is."""

    @abstractmethod
    def check(self, store: Store, name: str, entry: EncoderEntry, known_ids: set[int]) -> tuple[list[Finding], dict | None]:
        """(findings, facts) of verifying the index against the manifest and the store (known_ids: every id the
        store resolves, tombstones included); facts: what was counted, None when the index could not be read."""

    def status(self, store: Store, name: str, entry: EncoderEntry, verify: bool = False) -> IndexStatus:
        """The index as `info` shows it; verify: also read it to name a problem (a FAISS file's checksum)."""
        try:
            state = self.state_of(entry, name)
        except DbCorruptError as e:
            return IndexStatus(self.name, "none", 0, "unreadable", problem=str(e))
        if state is None:
            return IndexStatus(self.name, "none", 0, "none", problem=f"the index of {name} was never built (an "
                               "interrupted first `index`?)" if verify else None)
        return self.describe(store, name, entry, state, verify)

    @abstractmethod
    def state_of(self, entry: EncoderEntry, name: str) -> Any:
        """This backend's state of the entry (its own dataclass), None when it published none; DbCorruptError
        names a bad field."""

    @abstractmethod
    def describe(self, store: Store, name: str, entry: EncoderEntry, state: Any, verify: bool) -> IndexStatus:
        """`status` of a published index."""

    def validate(self, config: RefreshConfig) -> None:
        """Refuse options this backend cannot use (SimsearchError), before any work."""

    def drop(self, store: Store, name: str, state: dict) -> None:
        """Clean up after the encoder's index moved to another backend (`state`: this backend's last one).
        The manifest already points elsewhere, so no reader is sent here any more."""

    # -- refresh: one skeleton, the steps per backend --------------------------------------------------
    def refresh(self, store: Store, name: str, config: RefreshConfig = RefreshConfig(),
                on_progress: Progress | None = None) -> RefreshOutcome:
        """Bring `name`'s index up to date with the store: in place from the ids changed since its generation
        when it can, else rebuilt from every stored vector; then record it. The store must be open for writing.

        An encoder served by another backend moves to this one (built here, then the other cleans up).
        """
        self.validate(config)
        t = time.perf_counter()
        entry = store.manifest.encoders[name]
        job = Job(store, name, entry, store.generation, config, on_progress)
        ours = entry.backend == self.name and entry.has_index
        self.tidy(job)
        try:
            with self.connect(job) as job.conn:
                why = self.rebuild_reason(job) if ours else "never built"
                if why is None:
                    changed = store.changed_ids(entry.index_generation)
                    if changed is None:
                        why = "the store's change log does not reach back to this index"
                    else:
                        applied = self.update(job, changed)  # a reason it returns is logged by the backend if unusual
                        if isinstance(applied, str):
                            why = applied
                        elif not applied.added and not applied.removed and not applied.compacted:
                            return RefreshOutcome("unchanged", self.name, applied.count,
                                                  seconds=time.perf_counter() - t)
                        elif applied.added or applied.removed:
                            log.info("updated the %s index of %s in place: %d added or changed, %d removed", self.name,
                                     name, applied.added, applied.removed)
                elif ours:
                    log.warning("the index of %s: %s; rebuilding it from the stored vectors", name, why)
                if why is not None:
                    applied = self.rebuild(job)
            previous, old_state = entry.backend, entry.index
            store.set_index_state(name, self.name, job.generation, applied.state)
        except BaseException:
            self.tidy(job)  # e.g. a full disk: nothing the manifest does not name is left behind
            raise
        if previous != self.name and old_state:
            get_backend(previous).drop(store, name, old_state)
        self.published(job, applied.state)
        store.collect_tombstones()
        action = "updated" if why is None else "rebuilt" if ours else "built"
        if action == "updated" and not applied.added and not applied.removed:
            action = "compacted"
        return RefreshOutcome(action, self.name, applied.count, applied.added, applied.removed,
                              why if action == "rebuilt" else None, time.perf_counter() - t,
                              applied.compacted and why is None)

    def connect(self, job: Job) -> AbstractContextManager:
        """What the steps of one refresh share (a client), opened before the first and closed after the last."""
        return nullcontext()

    @abstractmethod
    def rebuild_reason(self, job: Job) -> str | None:
        """Why this backend's published index cannot be updated in place (damaged, other parameters asked...)."""

    @abstractmethod
    def update(self, job: Job, changed: np.ndarray) -> Applied | str:
        """Apply the store's changes (ids (m,) added, changed or removed since the index's generation) in place;
        or say why it must be rebuilt instead. Nothing changed: an Applied with no additions or removals."""

    @abstractmethod
    def rebuild(self, job: Job) -> Applied:
        """Build the index again from every stored vector of the encoder."""

    def published(self, job: Job, state: dict) -> None:
        """After the manifest points at the new state (FAISS deletes its older files here)."""

    def tidy(self, job: Job) -> None:
        """Remove what this backend keeps for the encoder that the manifest (`job.store.manifest`, as on disk) does
        not name: what a failed refresh (a full disk, an interrupt) or a killed one left. Runs before a refresh's
        steps and after they fail; must not raise."""


def get_backend(name: str) -> Backend:
    """The backend registered as `name`; UnknownNameError lists them."""
    target = _REGISTRY.get(name)
    if target is None:
        raise UnknownNameError(f"unknown backend {name!r} (available: {', '.join(BACKENDS)})")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)()


def chosen_backend(name: str | None, uri: str | None) -> str | None:
    """The backend a user asked for: `name`; else, when a `uri` (an index outside the db) is given, the backend
    that keeps its index there; else None (the one the db records)."""
    if name or not uri:
        return name
    return next(b for b in BACKENDS if get_backend(b).takes_uri)


def backend_of(entry: EncoderEntry) -> Backend:
    """The backend that serves this encoder's index, as the db records it."""
    return get_backend(entry.backend)


def refresh(store: Store, name: str, config: RefreshConfig = RefreshConfig(), on_progress: Progress | None = None,
            backend: str | None = None) -> RefreshOutcome:
    """Bring `name`'s index up to date with `backend` (None: the one the db records for it)."""
    chosen = get_backend(backend) if backend else backend_of(store.manifest.encoders[name])
    return chosen.refresh(store, name, config, on_progress)


def encoder_entry(manifest: Manifest, name: str, root: Path) -> EncoderEntry:
    """The manifest's entry of encoder `name`; an error naming the encoders the db has when there is none."""
    entry = manifest.encoders.get(name)
    if entry is None:
        have = ", ".join(manifest.encoders) or "none"
        raise SimsearchError(f"the db at {root} has no vectors of encoder {name!r} (indexed: {have}); "
                             f"run `simsearch index FOLDER --encoder {name}`")
    return entry


def open_index(store: Store, name: str, device: Device = Device.auto, backend: str | None = None,
               uri: str | None = None) -> tuple[VectorIndex, EncoderEntry]:
    """The published index of encoder `name` as the db's manifest (re-read now) names it, and its entry.

    backend: when given, must be the db's; uri: where a backend outside the db is, instead of the recorded one.
    """
    entry = encoder_entry(store.read_manifest(), name, store.root)
    if backend and backend != entry.backend:
        raise SimsearchError(f"the db's {name} vectors are searched with {entry.backend}, not {backend}: drop "
                             f"--backend, or switch with `simsearch index FOLDER --backend {backend}`")
    return backend_of(entry).open(store, name, entry, device, uri), entry


def require_vectors(index: VectorIndex, name: str, store: Store) -> int:
    """The index's ntotal; EmptyDbError when it holds none (every image was skipped, or all were removed)."""
    total = index.ntotal
    if total == 0:
        raise EmptyDbError(f"the index of {name} in {store.root} is empty (no image could be stored): run "
                           "`simsearch index FOLDER` and see what it skipped")
    return total
