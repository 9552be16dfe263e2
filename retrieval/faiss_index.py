"""The `faiss` backend: build, update, save, load and search the FAISS index of one encoder in a db.

Ids in the index are the store's item ids (IVF lists store them; flat and HNSW sit in an IndexIDMap).
The kind and its size come from `index_plan.choose_index` (a pure function of count, dim and memory
budget); the search parameters (nprobe, efSearch) are tuned at build time to a recall@10 target
against exact search on a sample of the collection's own vectors (`tuning.py`) and recorded in the
manifest with the recall they reached.

A published index is segments (segments.py): a base (the index FAISS built, with its sorted id list) and
delta files. Updates are incremental: the store logs which ids changed since the index's generation, and an
update writes one delta holding just those (the ids it replaces, the live ones' vectors): O(change). A search
drops the replaced ids from the base (a FAISS IDSelector) and merges the deltas' vectors, searched exactly.
Once the deltas pass a size (SegmentConfig), or on `simsearch compact`, they are folded into a new base
(compaction: `add_with_ids` / `remove_ids`; HNSW cannot remove, so its removed ids are marked -1 in the id
map and filtered during the search). It is rebuilt from scratch only when the collection outgrew what it was
trained on (RETRAIN_GROWTH), the kind the plan asks for changed, HNSW holds more than HNSW_MAX_MARKED marked
vectors, or the change log does not reach back.

Every segment is a new file whose sha256 and size the manifest records (FaissState, the entry's `index`
object). Readers memory-map the base (a cold open reads a few pages, not the file) after checking its size,
and read the small deltas whole, verified; `check` and compaction verify every file's sha256. A damaged file
is named with the way to rebuild the index from the stored vectors (`FaissBackend.refresh`).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np

from simsearch.devices import Device
from simsearch.errors import DbCorruptError, SimsearchError
from simsearch.indexer.manifest import EncoderEntry
from simsearch.indexer.store import Store
from simsearch.retrieval import tuning
from simsearch.retrieval.backend import (REPAIR_HINT, Applied, Backend, Finding, IndexStatus, Job, Progress,
                                         RefreshConfig, encoder_entry)
from simsearch.retrieval.faiss_gpu import gpu_can_search, to_gpu
from simsearch.retrieval.index_plan import (HNSW_EF_CONSTRUCTION, RESCORE, RESCORE_LADDER, RESCORED, IndexConfig,
                                            IndexPlan)
from simsearch.retrieval.segments import (Delta, Segment, SegmentError, delete_unreferenced, merge, sorted_contains,
                                          write_segment)

log = logging.getLogger(__name__)

RETRAIN_GROWTH = 2.0  # retrain once the collection is this many times what the quantiser was trained on
DEFAULT_RECALL = 0.95
OPQ_NITER = 10
HNSW_MAX_MARKED = 0.1  # rebuild an HNSW graph once this share of its nodes are removed items
NPROBE_LADDER = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
EF_LADDER = [16, 32, 64, 128, 256, 512, 1024, 2048]
# Readers map the base file (zero-copy: flat codes, IVF lists and HNSW vectors stay in the page cache, read on
# demand); a mapped index is read-only, so compaction reads the base whole.
MMAP = faiss.IO_FLAG_MMAP_IFC
# Compaction (docs/scale.md, "Segments"): every query scans the deltas' vectors exactly and skips their replaced ids
# in the base; folding them in rewrites the base. Measured at 1M x 256 (IVF, nprobe 18; p50 of one query on one core
# of the 2-core EPYC, under load): 0.29 ms alone, 0.37 / 0.42 / 0.63 / 1.04 ms beside a delta of 1k / 4k / 8k / 16k
# vectors (and as many replaced ids); a compaction took 33 s. 4 MiB of delta vectors (4,096 at 256-d, 819 at
# 1280-d) keeps a query within ~1.5x, and costs ~8 ms of compaction per changed image.
COMPACT_DELTA_BYTES = 4 << 20
COMPACT_SHARE = 0.1  # ... or once the replaced ids reach this share of the base: tombstones the base still scans
MAX_DELTAS = 8  # delta files merged into one past this many (each is a file to read on every open)


@dataclass(frozen=True)
class SegmentConfig:
    """When an update folds the deltas into the base (compaction), or merges them into one delta."""

    delta_bytes: int = COMPACT_DELTA_BYTES
    share: float = COMPACT_SHARE
    max_deltas: int = MAX_DELTAS

    def compaction_due(self, delta: Delta, base_count: int) -> bool:
        return delta.vectors.nbytes > self.delta_bytes or len(delta.replaced) > self.share * base_count


BlockSource = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
Fetch = Callable[[np.ndarray], np.ndarray]  # ids (m,) -> their exact vectors (m, dim), for re-scoring (RESCORED)


@dataclass
class BuiltIndex:
    index: faiss.Index
    plan: IndexPlan
    params: dict = field(default_factory=dict)  # search parameters, tuned (nprobe / efSearch ...)
    recall: float = 1.0  # recall@10 of those parameters on the tuning sample (1.0: exact)
    seconds: dict = field(default_factory=dict)


def build_index(blocks: BlockSource, dim: int, count: int, config: IndexConfig = IndexConfig(),
                fetch: Fetch | None = None, on_progress: Progress | None = None) -> BuiltIndex:
    """blocks(): a fresh iterable of (ids (n,) int64, vectors (n, dim) float32) over all `count` vectors.

    Streaming: one pass draws the training sample and the tuning queries, a second adds the vectors
    block by block while computing the queries' exact answers, so memory is the index plus one block
    and the sample, whatever the collection size. `fetch` gives exact vectors for a compressed index's re-scoring
    (index_plan.RESCORED), so its parameters are tuned as it will be searched.
    """
    plan = config.plan(count, dim)
    target = config.recall or DEFAULT_RECALL
    index = faiss.index_factory(dim, plan.factory(dim), faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "hnsw":  # IDMap over HNSWFlat: a wider construction beam, a graph needing a smaller efSearch
        faiss.downcast_index(index.index).hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    seconds = {}
    t = time.perf_counter()
    train_n = plan.train_count(count)
    n_queries = 0 if plan.kind == "flat" else min(config.tune_queries, count // 10)  # at most a tenth held out
    sample, queries, query_ids = _sample(blocks, count, train_n, n_queries, config.seed, on_progress)
    seconds["sample"] = time.perf_counter() - t
    if train_n:
        if on_progress:  # one FAISS call: the bar shows it started
            on_progress(f"training {plan.kind} on {len(sample)} vectors", 0, 1)
        t = time.perf_counter()
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = config.niter
        ivf.cp.seed = config.seed
        if plan.kind == "ivfpq":
            # Polysemous codes are never used by our searches, and training them dominated the build; FAISS's
            # 50 OPQ iterations each retrain the PQ.
            faiss.downcast_index(ivf).do_polysemous_training = False
            faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0)).niter = OPQ_NITER
        log.info("training %s on %d vectors (%s)", plan.kind, len(sample), plan.factory(dim))
        index.train(sample)
        seconds["train"] = time.perf_counter() - t
        if on_progress:
            on_progress(f"training {plan.kind} on {len(sample)} vectors", 1, 1)
    del sample
    t = time.perf_counter()
    # The tuning queries are held out of the index until the parameters are tuned: a query that is itself
    # in the index makes recall look better than a new image would see (by ~0.07 for HNSW, whose greedy
    # search walks straight to the query's own node). They are added last.
    exact = tuning.ExactTopK(queries)
    done = 0
    for ids, vecs in blocks():
        keep = ~np.isin(ids, query_ids)
        ids, vecs = ids[keep], np.ascontiguousarray(vecs[keep], dtype=np.float32)
        index.add_with_ids(vecs, ids)
        exact.add(ids, vecs)
        done += len(ids)
        if on_progress:
            on_progress("adding vectors", done, count)
    seconds["add"] = time.perf_counter() - t
    built = BuiltIndex(index, plan, seconds=seconds)
    if n_queries and index.ntotal > tuning.K:
        t = time.perf_counter()
        built.params, built.recall = _tune(index, plan, queries, exact.ids(), target, fetch)
        seconds["tune"] = time.perf_counter() - t
        log.info("%s tuned to %s: recall@10 %.3f (target %.2f)", plan.kind, built.params, built.recall, target)
        if built.recall < target:
            log.warning("the %s index reaches recall@10 %.3f at most, below the --recall target %.2f",
                        plan.kind, built.recall, target)
    if len(query_ids):
        index.add_with_ids(queries, query_ids)
    return built


def _sample(blocks: BlockSource, count: int, train_n: int, n_queries: int, seed: int,
            on_progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded uniform samples drawn block by block: training vectors (~train_n, dim), and tuning
    queries (~n_queries, dim) with their ids."""
    if not train_n and not n_queries:
        return np.empty((0, 0), np.float32), np.empty((0, 0), np.float32), np.empty(0, np.int64)
    rng = np.random.default_rng(seed)
    keep_train, keep_query = min(1.0, 1.05 * train_n / max(count, 1)), min(1.0, n_queries / max(count, 1))
    train, queries, query_ids = [], [], []
    done = 0
    for ids, vecs in blocks():
        train.append(vecs[rng.random(len(vecs)) < keep_train])
        q = rng.random(len(vecs)) < keep_query
        queries.append(vecs[q])
        query_ids.append(ids[q])
        done += len(ids)
        if on_progress:
            on_progress("sampling", done, count)
    cat = lambda parts: np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)  # noqa: E731
    return cat(train), cat(queries), np.concatenate(query_ids)


def _tune(index: faiss.Index, plan: IndexPlan, queries: np.ndarray, exact: np.ndarray, target: float,
           fetch: Fetch | None) -> tuple[dict, float]:
    if plan.kind == "hnsw":
        name, ladder = "efSearch", EF_LADDER
    else:
        name, ladder = "nprobe", [p for p in NPROBE_LADDER if p < plan.nlist] + [plan.nlist]
    params: dict = {}
    searcher = LoadedIndex(index, Device.cpu, params, fetch, plan.kind)
    # A compressed index re-scores rescore * k candidates: deeper only while its codes cannot reach the target
    depths = RESCORE_LADDER if searcher.fetch is not None else (RESCORE,)
    for depth in depths:
        def set_param(value: int, depth: int = depth) -> None:
            params.clear()
            params[name] = value
            if plan.hnsw_m and plan.kind != "hnsw":  # the HNSW coarse quantiser must look at least as far as nprobe
                params["quantizer_efSearch"] = max(64, 2 * value)
            if depth != RESCORE:
                params["rescore"] = depth
            apply_params(index, params)
            searcher.rescore = depth

        value, recall = tuning.tune(lambda q, k: searcher.search(q, k), set_param, ladder, queries, exact, target)
        if recall >= target:
            break
        log.info("%s: recall@10 %.3f at most with %d candidates per result re-scored; trying more", plan.kind,
                 recall, depth)
    set_param(value)
    return dict(params), recall


def apply_params(index: faiss.Index, params: dict) -> None:
    """Set search parameters (nprobe, efSearch, quantizer_efSearch) through FAISS's ParameterSpace,
    which finds them inside IDMap / OPQ wrappers."""
    space = faiss.ParameterSpace()
    for key, value in params.items():
        if key in ("nprobe", "efSearch", "quantizer_efSearch"):
            space.set_index_parameter(index, key, value)


def index_ids(index: faiss.Index) -> np.ndarray:
    """The ids an index holds (removed HNSW nodes, marked -1, left out)."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ids = faiss.vector_to_array(faiss.downcast_index(index).id_map) if index.ntotal else np.empty(0, np.int64)
        return ids[ids >= 0]
    invlists = ivf.invlists
    parts = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
             for i in range(ivf.nlist) if invlists.list_size(i)]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def marked_count(index: faiss.Index) -> int:
    """HNSW nodes marked removed (-1 in the id map); 0 for other kinds."""
    inner = faiss.downcast_index(index)
    if not isinstance(inner, faiss.IndexIDMap) or not isinstance(faiss.downcast_index(inner.index), faiss.IndexHNSW):
        return 0
    return int((faiss.vector_to_array(inner.id_map) < 0).sum())


def update_index(index: faiss.Index, remove: np.ndarray, add_ids: np.ndarray, add_vectors: np.ndarray) -> None:
    """Remove `remove` ids, then add (add_ids, add_vectors) (a changed item is in both), in place."""
    if len(remove):
        inner = faiss.downcast_index(index)
        if isinstance(inner, faiss.IndexIDMap) and isinstance(faiss.downcast_index(inner.index), faiss.IndexHNSW):
            # HNSW cannot delete a node: its id becomes -1, and searches skip ids < 0 (LoadedIndex).
            id_map = faiss.vector_to_array(inner.id_map)
            id_map[np.isin(id_map, remove)] = -1
            faiss.copy_array_to_vector(id_map, inner.id_map)
        else:
            index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(remove, dtype=np.int64)))
    if len(add_ids):
        index.add_with_ids(np.ascontiguousarray(add_vectors, dtype=np.float32), np.ascontiguousarray(add_ids))


def _kind_of(index: faiss.Index) -> str:
    """What an index built by build_index is, read from the index itself (for callers without a manifest)."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        inner = faiss.downcast_index(faiss.downcast_index(index).index) if isinstance(
            faiss.downcast_index(index), faiss.IndexIDMap) else faiss.downcast_index(index)
        return "hnsw" if isinstance(inner, faiss.IndexHNSW) else "flat"
    ivf = faiss.downcast_index(ivf)
    return {faiss.IndexIVFFlat: "ivf", faiss.IndexIVFScalarQuantizer: "sq8"}.get(type(ivf), "ivfpq")


_STATE_TYPES = {"kind": str, "file": str, "sha256": (str, type(None)), "bytes": int, "count": int, "params": dict,
                "recall": (float, int, type(None)), "recall_target": (float, int, type(None)), "trained_count": int,
                "ids": (dict, type(None)), "deltas": list}


@dataclass(frozen=True)
class FaissState:
    """The FAISS backend's state of one encoder in the manifest (its entry's `index` object)."""

    kind: str  # flat | ivf | sq8 | ivfpq | hnsw
    file: str  # the base: the index file under index/, one per build or compaction
    sha256: str | None  # None only for an index from schema 1 (not verifiable)
    bytes: int = 0
    count: int = 0  # vectors a search can return: the base's (marked HNSW nodes excluded), less replaced, plus deltas'
    params: dict = field(default_factory=dict)  # build and search parameters: nlist, nprobe, pq_m, efSearch...
    recall: float | None = None  # recall@10 of the tuned search parameters against exact search, at build time
    recall_target: float | None = None  # what they were tuned to reach
    trained_count: int = 0  # vectors in the collection when the index was (re)trained: it is retrained at 2x
    ids: dict | None = None  # the Segment of the base's sorted ids; None: a base from schema 5 or older
    deltas: list = field(default_factory=list)  # the Segments of the deltas over the base, oldest first

    @classmethod
    def of(cls, entry: EncoderEntry, name: str) -> FaissState | None:
        """The state an entry records (None: no FAISS index published); DbCorruptError names a bad field."""
        if entry.backend != FaissBackend.name or not entry.index:
            return None
        for f, value in entry.index.items():
            if f not in _STATE_TYPES or not isinstance(value, _STATE_TYPES[f]) or isinstance(value, bool):
                raise DbCorruptError(f"the manifest's field 'encoders.{name}.index.{f}' is unknown or has the wrong "
                                     f"type; {REPAIR_HINT}")
        if "kind" not in entry.index or "file" not in entry.index or "sha256" not in entry.index:
            raise DbCorruptError(f"the manifest's FAISS index of {name} names no kind, file or sha256; {REPAIR_HINT}")
        try:
            for raw in ([entry.index["ids"]] if entry.index.get("ids") else []) + entry.index.get("deltas", []):
                Segment.of(raw)
        except ValueError as e:
            raise DbCorruptError(f"the manifest's FAISS index of {name} names a bad segment ({e}); {REPAIR_HINT}")
        return cls(**entry.index)

    def path(self, store: Store) -> Path:
        return store.index_dir() / self.file

    @property
    def id_segment(self) -> Segment | None:
        return Segment.of(self.ids) if self.ids else None

    @property
    def delta_segments(self) -> list[Segment]:
        return [Segment.of(d) for d in self.deltas]

    def files(self) -> set[str]:
        """Every file of this published index, under index/."""
        return {self.file} | {seg.file for seg in self.delta_segments + ([self.id_segment] if self.ids else [])}

    def problem(self, store: Store, verify: bool) -> str | None:
        """Why a file of the index cannot be used (missing, wrong size; verify: wrong sha256), or None."""
        segments = [s for s in [self.id_segment, *self.delta_segments] if s]
        if self.sha256 is None:  # schema-1 base: nothing to verify against (rebuilt with a checksum by `index`)
            problem = None if self.path(store).is_file() else f"{self.path(store)}: index file missing"
        else:
            segments.insert(0, Segment(self.file, self.sha256, self.bytes))
            problem = None
        for seg in segments:
            problem = problem or seg.problem(store.index_dir(), verify)
        return problem


def write_index(store: Store, name: str, index: faiss.Index, generation: int, kind: str, params: dict,
                recall: float | None, recall_target: float | None, trained_count: int) -> FaissState:
    """Write `index` as a new base (and its sorted id list) with no deltas, under new file names (never ones a
    reader may be reading); its state for the manifest."""
    data = memoryview(faiss.serialize_index(index))  # (bytes,) uint8; not copied again by .tobytes(): 1 GB at 1M x 256
    base = write_segment(store.index_dir(), name, generation, ".faiss", data)
    del data
    ids = np.sort(index_ids(index))  # (n,) live ids of the base
    id_list = write_segment(store.index_dir(), name, generation, ".ids", ids.astype("<i8").tobytes())
    return FaissState(kind, base.file, base.sha256, base.bytes, len(ids), params, recall, recall_target,
                      trained_count, id_list.as_dict(), [])


def _read_base(store: Store, state: FaissState) -> faiss.Index:
    """The base read whole and verified (schema 1's: unverifiable), as an index that can be changed: for
    compaction and `check`. SegmentError, FileNotFoundError."""
    path = state.path(store)
    if state.sha256 is None:
        data = path.read_bytes()
    else:
        data = Segment(state.file, state.sha256, state.bytes).read(store.index_dir())
    try:
        # faiss.deserialize_index, with the file's bytes dropped once FAISS has its copy: the peak is 2x the
        # index, not 3x (bytes + FAISS's buffer + the index; 1M x 256 IVF: +1 GB).
        reader = faiss.VectorIOReader()
        faiss.copy_array_to_vector(np.frombuffer(data, dtype=np.uint8), reader.data)
        del data
        return faiss.read_index(reader)
    except RuntimeError as e:  # schema-1 file (no checksum) that FAISS cannot read
        raise SegmentError(f"{path}: damaged index file ({str(e).splitlines()[0][:120]})") from None


def _map_base(store: Store, state: FaissState) -> faiss.Index:
    """The base memory-mapped after a check of its size: what a reader searches. SegmentError, FileNotFoundError."""
    path = state.path(store)
    size = path.stat().st_size
    if state.sha256 is not None and size != state.bytes:
        raise SegmentError(f"{path}: damaged index file ({size:,} bytes, the manifest says {state.bytes:,})")
    try:
        return faiss.read_index(str(path), MMAP)
    except RuntimeError as e:
        if not path.exists():  # deleted since the stat: a newer build was published
            raise FileNotFoundError(errno.ENOENT, "index file missing", str(path)) from None
        raise SegmentError(f"{path}: damaged index file ({str(e).splitlines()[0][:120]})") from None


def read_deltas(store: Store, state: FaissState, dim: int) -> Delta:
    """The state's deltas, read whole, verified and merged into one. SegmentError, FileNotFoundError."""
    directory = store.index_dir()
    return merge([Delta.from_bytes(seg.read(directory), dim, directory / seg.file) for seg in state.delta_segments],
                 dim)


def _base_ids(store: Store, state: FaissState) -> np.ndarray:
    """The base's sorted ids (n,), memory-mapped: an update reads only the pages its ids fall on."""
    seg = state.id_segment
    path = store.index_dir() / seg.file
    size = path.stat().st_size
    if size != seg.bytes or size % 8:
        raise SegmentError(f"{path}: damaged index file ({size:,} bytes, the manifest says {seg.bytes:,})")
    return np.memmap(path, dtype="<i8", mode="r") if size else np.empty(0, np.int64)


def _plan_params(plan: IndexPlan) -> dict:
    return {k: v for k, v in (("nlist", plan.nlist), ("pq_m", plan.pq_m), ("hnsw_m", plan.hnsw_m)) if v}


class FaissBackend(Backend):
    """Index files in the db per encoder (a base, its id list, deltas), each written whole under a new name and
    published by the manifest naming it: readers never see half of one.

    A reader that read the old manifest still finds the old files until they are deleted, and a reader that finds
    one deleted re-reads the manifest (`load_index`): it never mixes two states.
    """

    name = "faiss"

    def __init__(self, segments: SegmentConfig = SegmentConfig()):
        self.segments = segments

    def open(self, store: Store, name: str, entry: EncoderEntry, device: Device = Device.auto,
             uri: str | None = None) -> PublishedIndex:
        if uri:
            raise SimsearchError(f"--uri given, but the db's {name} vectors are searched with faiss: drop it, "
                                 "or mirror them with `simsearch index FOLDER --backend milvus`")
        return load_index(store, name, device)[0]

    # -- refresh steps ---------------------------------------------------------------------------------
    def validate(self, config: RefreshConfig) -> None:
        if config.uri:
            raise SimsearchError("--uri goes with --backend milvus")

    def rebuild_reason(self, job: Job) -> str | None:
        config = job.config.index
        try:
            state = FaissState.of(job.entry, job.name)
        except DbCorruptError as e:
            return str(e)
        problem = state.problem(job.store, verify=job.config.verify)
        if problem is None and state.sha256 is None:
            problem = "no checksum (schema 1)"
        if problem is None and config.kind not in ("auto", state.kind):
            problem = f"--index {config.kind} asked (it is {state.kind})"
        if problem is None and config.recall and state.recall_target and config.recall != state.recall_target:
            problem = f"--recall {config.recall:g} asked (it was tuned to {state.recall_target:g})"
        return problem

    def _recall(self, job: Job) -> float:
        """The recall target: asked, else the db's, else DEFAULT_RECALL."""
        try:
            state = FaissState.of(job.entry, job.name)
        except DbCorruptError:
            state = None  # being rebuilt for it
        return job.config.index.recall or (state and state.recall_target) or DEFAULT_RECALL

    def update(self, job: Job, changed: np.ndarray) -> Applied | str:
        """Write the changed ids (and the live ones' vectors) as a new delta: O(change). Past SegmentConfig's size,
        or when asked (`compact`), fold every delta into a new base instead."""
        state = FaissState.of(job.entry, job.name)
        compact = job.config.compact and bool(state.deltas or state.ids is None)
        if not len(changed) and not compact:
            return Applied(dataclasses.asdict(state), state.count)
        store, entry = job.store, job.entry
        ids, vectors = store.vectors_by_id(entry.key, changed, entry.dim)  # live items with a vector: (n,), (n, dim)
        change = Delta.of_change(changed, ids, vectors)
        if state.ids is None:  # a base from before segments (schema <= 5): rewritten once, with its id list
            return self._compact(job, state, change, change)
        try:
            old = read_deltas(store, state, entry.dim)
            base_ids = _base_ids(store, state)
        except (OSError, SegmentError) as e:
            return f"{e}: rebuilding"
        # Which changed ids the snapshot held: a delta's live copy, else the base's unless a delta replaced it.
        held = np.isin(change.replaced, old.ids) | (sorted_contains(base_ids, change.replaced)
                                                    & ~np.isin(change.replaced, old.replaced))
        count = state.count - int(held.sum()) + len(change.ids)
        if why := self._outgrown(job, state, count):
            return why
        merged = merge([old, change], entry.dim)
        if compact or self.segments.compaction_due(merged, len(base_ids)):
            return self._compact(job, state, merged, change)
        if len(state.deltas) < self.segments.max_deltas:
            deltas = [*state.deltas, self._write_delta(job, change)]
        else:
            deltas = [self._write_delta(job, merged)]  # one file again: O(deltas), not O(collection)
        new = dataclasses.replace(state, count=count, deltas=deltas)
        return Applied(dataclasses.asdict(new), count, len(change.ids), len(change.replaced) - len(change.ids))

    def _write_delta(self, job: Job, delta: Delta) -> dict:
        return write_segment(job.store.index_dir(), job.name, job.generation, ".delta", delta.to_bytes()).as_dict()

    def _outgrown(self, job: Job, state: FaissState, count: int) -> str | None:
        """Why `count` vectors need a rebuild rather than an update of this index, or None."""
        config = job.config.index
        if config.kind == "auto" and (wanted := config.plan(count, job.entry.dim).kind) != state.kind:
            return f"{count} vectors call for {wanted}, not {state.kind}"
        if state.kind not in ("flat", "hnsw") and state.trained_count and count > RETRAIN_GROWTH * state.trained_count:
            return f"{count} vectors, over {RETRAIN_GROWTH:g}x the {state.trained_count} it was trained on: retraining"
        return None

    def _compact(self, job: Job, state: FaissState, delta: Delta, change: Delta) -> Applied | str:
        """Fold `delta` (every delta, this update's change included) into a new base: the base read whole, the
        replaced ids removed and the live ones added, written as new files. change: this update's, for its counts."""
        t = time.perf_counter()
        try:
            index = _read_base(job.store, state)
        except (OSError, SegmentError) as e:
            return f"{e}: rebuilding"
        update_index(index, delta.replaced, delta.ids, delta.vectors)
        if why := self._outgrown(job, state, index.ntotal - marked_count(index)):
            return why
        if marked_count(index) > HNSW_MAX_MARKED * index.ntotal:
            return f"over {HNSW_MAX_MARKED:.0%} of the HNSW graph are removed items"
        # Compaction keeps what the build measured (recall, what it was trained on).
        new = write_index(job.store, job.name, index, job.generation, state.kind, state.params, state.recall,
                          state.recall_target, state.trained_count)
        log.info("compacted the %s index of %s: %d replaced ids and %d vectors folded into a new base in %.1f s",
                 state.kind, job.name, len(delta.replaced), len(delta.ids), time.perf_counter() - t)
        return Applied(dataclasses.asdict(new), new.count, len(change.ids), len(change.replaced) - len(change.ids),
                       compacted=True)

    def rebuild(self, job: Job) -> Applied:
        store, entry = job.store, job.entry
        config = replace(job.config.index, recall=self._recall(job))
        count = store.vector_count(entry.key)
        fetch = lambda ids: store.vectors_of_ids(entry.key, ids, entry.dim)  # noqa: E731
        built = build_index(lambda: store.iter_vector_blocks(entry.key, entry.dim), entry.dim, count, config, fetch,
                            job.on_progress)
        state = write_index(store, job.name, built.index, job.generation, built.plan.kind,
                            {**_plan_params(built.plan), **built.params}, built.recall,
                            config.recall if built.params else None, count)
        return Applied(dataclasses.asdict(state), state.count, state.count)

    def published(self, job: Job, state: dict) -> None:
        delete_unreferenced(job.store.index_dir(), job.name, FaissState(**state).files())

    def tidy(self, job: Job) -> None:
        entry = job.store.manifest.encoders.get(job.name)
        try:
            state = FaissState.of(entry, job.name) if entry else None
            delete_unreferenced(job.store.index_dir(), job.name, state.files() if state else set())
        except (OSError, DbCorruptError) as e:  # what is left is deleted by the next publish
            log.debug("could not remove files the manifest does not name: %s", e)

    def drop(self, store: Store, name: str, state: dict) -> None:
        delete_unreferenced(store.index_dir(), name, set())

    # -- check and info --------------------------------------------------------------------------------
    def check(self, store: Store, name: str, entry: EncoderEntry, known_ids: set[int]) -> tuple[list[Finding], dict | None]:
        if not entry.has_index:
            return [Finding("warning", f"the index of {name} was never built (an interrupted first `index`?): "
                                       f"{REPAIR_HINT}")], None
        try:  # every segment read whole and verified against the manifest's sha256
            state = FaissState.of(entry, name)
            index = _read_base(store, state)
            delta = read_deltas(store, state, entry.dim)
            base_ids = index_ids(index)
            listed = state.id_segment and np.frombuffer(state.id_segment.read(store.index_dir()), "<i8")
        except DbCorruptError as e:
            return [Finding("error", str(e))], None
        except FileNotFoundError as e:
            return [Finding("error", f"{e.filename}: index file missing; {REPAIR_HINT}")], None
        except (OSError, SegmentError) as e:
            return [Finding("error", f"{e}; {REPAIR_HINT}")], None
        if listed is not None and not np.array_equal(listed, np.sort(base_ids)):
            return [Finding("error", f"{store.index_dir() / state.id_segment.file}: lists other ids than its base "
                                     f"holds; {REPAIR_HINT}")], None
        ids = _live_ids(base_ids, delta)  # what a search can return
        facts = {"vectors": len(ids), "file": state.file, "deltas": len(state.deltas)}
        if len(ids) != state.count or index.d != entry.dim:
            return [Finding("error", f"{state.path(store)}: holds {len(ids)} vectors of {index.d} dimensions with "
                                     f"its deltas, the manifest says {state.count} of {entry.dim}; {REPAIR_HINT}")], facts
        if not entry.up_to_date(store.generation):
            unknown = set(ids.tolist()) - known_ids
            if unknown:
                return [Finding("error", f"the index of {name} returns {len(unknown)} ids the store does not know; "
                                         f"{REPAIR_HINT}")], facts
            return [Finding("warning", f"the index of {name} is older than the store (an interrupted or running "
                                       f"`index`): {REPAIR_HINT}")], facts
        expected = {int(i) for block, _ in store.iter_vector_blocks(entry.key, entry.dim) for i in block}
        got = set(ids.tolist())
        if got != expected:
            return [Finding("error", f"the index of {name} holds {len(got - expected)} ids without a stored vector "
                                     f"and misses {len(expected - got)}; {REPAIR_HINT}")], facts
        return [], facts

    def state_of(self, entry: EncoderEntry, name: str) -> FaissState | None:
        return FaissState.of(entry, name)

    def describe(self, store: Store, name: str, entry: EncoderEntry, state: FaissState, verify: bool) -> IndexStatus:
        params = ", ".join(f"{k} {v}" for k, v in state.params.items())
        text = state.kind + (f" ({params})" if params else "")
        if state.recall is not None:
            text += f"; recall@10 {state.recall:.3f}" + (f" (target {state.recall_target:.2f})"
                                                         if state.recall_target else "")
        if state.deltas:
            text += f"; {len(state.deltas)} delta segment{'s' if len(state.deltas) > 1 else ''}"
        return IndexStatus(self.name, state.kind, state.count, text, state.params, state.recall, state.recall_target,
                           file=state.file, up_to_date=entry.up_to_date(store.generation),
                           problem=state.problem(store, verify=True) if verify else None)


def load_index(store: Store, name: str, device: Device = Device.auto, attempts: int = 3) -> tuple[PublishedIndex, EncoderEntry]:
    """The published index of `name` and its manifest entry: the base memory-mapped (its size checked), the deltas
    read and verified, its tuned search parameters set (and, for a compressed kind, exact re-scoring from the stored
    vectors).

    The manifest is re-read first, so a long-lived reader follows a writer's newer build.
    """
    for attempt in range(attempts):
        entry = encoder_entry(store.read_manifest(), name, store.root)
        if entry.backend != FaissBackend.name:
            raise SimsearchError(f"the db's {name} vectors are searched with {entry.backend} now: open them again")
        state = FaissState.of(entry, name)
        if state is None:
            raise DbCorruptError(f"the index of {name} in {store.root} was never built (an interrupted first "
                                 f"`index`?): {REPAIR_HINT}, or re-run `simsearch index FOLDER --encoder {name}`")
        try:
            index = _map_base(store, state)
            delta = read_deltas(store, state, entry.dim)
        except FileNotFoundError as e:  # a writer may have published a newer state and deleted this one meanwhile
            problem = f"{e.filename}: index file missing"
        except SegmentError as e:
            problem = str(e)
        else:
            fetch = lambda ids: store.vectors_of_ids(entry.key, ids, entry.dim)  # noqa: E731
            return PublishedIndex(index, store, name, state, device, fetch, delta), entry
        if attempt + 1 < attempts and store.read_manifest().encoders.get(name) != entry:
            continue
        raise DbCorruptError(f"{problem}; {REPAIR_HINT}")
    raise DbCorruptError(f"the index of {name} in {store.root} kept changing while it was read; try again")


class LoadedIndex:
    """A FAISS index ready to search: its tuned parameters set, on the CPU or on the GPU when asked and possible.

    fetch: exact vectors by id; when given and the kind's codes are compressed (RESCORED: sq8, ivfpq), rescore * k
    candidates (params["rescore"], else RESCORE) are fetched and re-scored exactly: every score it returns is an
    exact inner product.
    delta: changes over `index` (segments.Delta): its replaced ids are dropped from the index's answers, its live
    vectors searched exactly and merged in; count: the vectors a search can then return (computed when not given).
    """

    def __init__(self, index: faiss.Index, device: Device = Device.auto, params: dict | None = None,
                 fetch: Fetch | None = None, kind: str | None = None, delta: Delta | None = None,
                 count: int | None = None):
        kind = kind or _kind_of(index)
        self.cpu_index = index
        self.fetch = fetch if kind in RESCORED else None
        self.params = dict(params or {})
        self.rescore = int(self.params.get("rescore", RESCORE))  # candidates re-scored per result (with fetch)
        apply_params(index, self.params)
        self.marked = marked_count(index)
        self.delta = delta if delta is not None and len(delta.replaced) else None
        # Removed HNSW nodes carry id -1, replaced ids are a delta's: the search skips both (the selector sees the
        # stored ids). The selectors are kept here: FAISS holds only pointers to them.
        self._selectors = []
        if self.marked:
            self._selectors.append(faiss.IDSelectorRange(0, 2**62))
        if self.delta is not None:
            batch = faiss.IDSelectorBatch(self.delta.replaced)
            self._selectors += [batch, faiss.IDSelectorNot(batch)]
        if len(self._selectors) == 3:
            self._selectors.append(faiss.IDSelectorAnd(self._selectors[0], self._selectors[2]))
        self.search_params = _search_params(index, self._selectors[-1]) if self._selectors else None
        self.delta_index = None  # the deltas' live vectors, searched exactly; position -> id by delta.ids
        if self.delta is not None and len(self.delta.ids):
            self.delta_index = faiss.IndexFlatIP(index.d)
            self.delta_index.add(self.delta.vectors)
        self.count = count if count is not None else len(self.live_ids())
        self.gpu_index = to_gpu(index, kind, device)  # None: on the CPU (logged when asked)
        self.device = "cuda" if self.gpu_index is not None else "cpu"

    def live_ids(self) -> np.ndarray:
        """The ids a search can return, sorted (n,): the base's (all its lists are read) less the replaced, plus the
        deltas'."""
        return _live_ids(index_ids(self.cpu_index), self.delta)

    def reload(self) -> LoadedIndex:
        """An index not read from a db has no newer state."""
        return self

    def close(self) -> None:
        """Nothing to release: the index is memory, freed with the object."""

    @property
    def ntotal(self) -> int:
        """Vectors a search can return (marked HNSW nodes and replaced ids excluded, the deltas' included)."""
        return self.count

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, dim) -> scores (Q, k') and ids (Q, k'), k' = min(k, ntotal), best first (-1: no answer)."""
        k = min(k, self.ntotal)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if k == 0:  # FAISS asserts k > 0
            return np.empty((len(queries), 0), dtype=np.float32), np.empty((len(queries), 0), dtype=np.int64)
        in_base = self.cpu_index.ntotal - self.marked  # replaced ids included: the selector drops them
        depth = min(k * self.rescore if self.fetch else k, in_base)
        scores, ids = np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        if depth > 0:
            scores, ids = self._search_base(queries, depth, in_base)
            if self.fetch is not None:
                scores, ids = self._rescore(queries, ids, k)
        if self.delta_index is not None:  # exact over the deltas' vectors, merged: (Q, k + k_delta) -> (Q, k)
            found, at = self.delta_index.search(queries, min(k, self.delta_index.ntotal))
            at = np.where(at >= 0, self.delta.ids[np.maximum(at, 0)], -1)
            scores, ids = _best(np.hstack([scores, found]), np.hstack([ids, at]), k)
        return scores, ids

    def _search_base(self, queries: np.ndarray, depth: int, in_base: int) -> tuple[np.ndarray, np.ndarray]:
        """The index's best `depth`, replaced ids dropped: (Q, depth) scores and ids."""
        replaced = self.delta.replaced if self.delta is not None else np.empty(0, np.int64)
        # A GPU index takes no selector: it is asked for as many more as there are replaced ids, which are dropped.
        wide = min(depth + len(replaced), in_base)
        if self.gpu_index is not None and gpu_can_search(wide, self.params.get("nprobe", 0)):
            scores, ids = self.gpu_index.search(queries, wide)
            if len(replaced):
                scores, ids = _best(scores, np.where(np.isin(ids, replaced), -1, ids), depth)
            return scores, ids
        if self.search_params is not None:
            return self.cpu_index.search(queries, depth, params=self.search_params)
        return self.cpu_index.search(queries, depth)

    def _rescore(self, queries: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of each query with its candidates (Q, depth), the best k kept."""
        valid = ids >= 0
        vectors = self.fetch(ids[valid])  # (found, dim)
        exact = np.full(ids.shape, -np.inf, dtype=np.float32)
        rows = np.nonzero(valid)[0]
        exact[valid] = np.einsum("nd,nd->n", vectors, queries[rows])
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        out_ids = np.take_along_axis(ids, order, axis=1)
        out_scores = np.take_along_axis(exact, order, axis=1)
        out_ids[~np.isfinite(out_scores)] = -1
        return out_scores, out_ids


def _live_ids(base_ids: np.ndarray, delta: Delta | None) -> np.ndarray:
    if delta is None:
        return np.sort(base_ids)
    return np.union1d(np.setdiff1d(base_ids, delta.replaced), delta.ids)


def _search_params(index: faiss.Index, sel: faiss.IDSelector) -> faiss.SearchParameters:
    """Search parameters carrying `sel`. An IVF index takes its nprobe (and its HNSW quantiser's efSearch) from
    them, not from itself, when given any: they are copied from the index."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # flat or HNSW (in an IDMap, which translates the selector to the stored ids)
        return faiss.SearchParameters(sel=sel)
    params = faiss.SearchParametersIVF(sel=sel, nprobe=ivf.nprobe)
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        params.quantizer_params = faiss.SearchParametersHNSW(efSearch=quantizer.hnsw.efSearch)
    return params


def _best(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k per row of (Q, m) candidates (-1: none), best first: (Q, k); -1 and -inf where fewer."""
    scores = np.where(ids >= 0, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    best, ids = np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
    ids[~np.isfinite(best)] = -1
    return best, ids


class PublishedIndex(LoadedIndex):
    """The index a db's manifest names for an encoder (`load_index`): it can follow the writer's newer builds."""

    def __init__(self, index: faiss.Index, store: Store, name: str, state: FaissState, device: Device = Device.auto,
                 fetch: Fetch | None = None, delta: Delta | None = None):
        super().__init__(index, device, state.params, fetch, state.kind, delta, state.count)
        self.store, self.name, self.state, self.asked_device = store, name, state, device

    def reload(self) -> PublishedIndex:
        """The build the manifest names now (the writer publishes each as a new file)."""
        return load_index(self.store, self.name, self.asked_device)[0]
