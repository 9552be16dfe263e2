"""Build, update, save, load and search the FAISS index of one encoder in a db.

Ids in the index are the store's item ids (IVF lists store them; flat and HNSW sit in an IndexIDMap).
The kind and its size come from `index_plan.choose_index` (a pure function of count, dim and memory
budget); the search parameters (nprobe, efSearch) are tuned at build time to a recall@10 target
against exact search on a sample of the collection's own vectors (`tuning.py`) and recorded in the
manifest with the recall they reached.

Updates are incremental: the store logs which ids changed since the index's generation, and those
are removed and re-added in place (`add_with_ids` / `remove_ids`; HNSW cannot remove, so its removed
ids are marked -1 in the id map and filtered during the search). It is rebuilt from scratch only when
the collection outgrew what it was trained on (RETRAIN_GROWTH), the kind the plan asks for changed,
HNSW holds more than HNSW_MAX_MARKED marked vectors, or the change log does not reach back.

Each build is published as a new file `index/<encoder>.<generation>.<sha12>.faiss` whose sha256 and
size the manifest records; readers verify a file before using it (`load_index`), so a damaged one is
named with the way to rebuild it from the stored vectors (`refresh_index`), never half-read.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np

from simsearch.devices import Device
from simsearch.errors import DbCorruptError, SimsearchError
from simsearch.indexer.manifest import EncoderEntry, write_atomic
from simsearch.indexer.store import Store
from simsearch.retrieval import tuning
from simsearch.retrieval.faiss_gpu import gpu_can_search, to_gpu
from simsearch.retrieval.index_plan import (HNSW_EF_CONSTRUCTION, KINDS, RESCORE, IndexPlan, choose_index,
                                            default_budget)

log = logging.getLogger(__name__)

RETRAIN_GROWTH = 2.0  # retrain once the collection is this many times what the quantiser was trained on
DEFAULT_RECALL = 0.95
OPQ_NITER = 10
HNSW_MAX_MARKED = 0.1  # rebuild an HNSW graph once this share of its nodes are removed items
NPROBE_LADDER = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
EF_LADDER = [16, 32, 64, 128, 256, 512, 1024, 2048]


@dataclass(frozen=True)
class IndexConfig:
    kind: str = "auto"  # auto | flat | ivf | sq8 | ivfpq | hnsw (see index_plan.py)
    max_memory: int = 0  # bytes the index may take in RAM; 0 = index_plan.default_budget()
    recall: float | None = None  # recall@10 the search parameters are tuned to reach; None: the db's, else DEFAULT_RECALL
    tune_queries: int = 500  # sampled from the collection itself
    niter: int = 10  # k-means iterations: 10 is within ~1% of FAISS's 25 for IVF recall, at 40% of the cost
    seed: int = 0

    def plan(self, count: int, dim: int) -> IndexPlan:
        budget = self.max_memory or default_budget()
        plan = choose_index(count, dim, budget, self.kind)
        if plan.memory_bytes(count, dim) > budget:
            log.warning("--index %s: %d vectors take ~%.1f GiB, over the --max-index-memory budget of %.1f GiB",
                        plan.kind, count, plan.memory_bytes(count, dim) / 2**30, budget / 2**30)
        return plan


BlockSource = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
Fetch = Callable[[np.ndarray], np.ndarray]  # ids (m,) -> their exact vectors (m, dim), for re-scoring
Progress = Callable[[str, int, int], None]  # (stage, done, total)


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
    and the sample, whatever the collection size. `fetch` gives exact vectors for ivfpq's re-scoring.
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

    def set_param(value: int) -> None:
        params.clear()
        params[name] = value
        if plan.hnsw_m and plan.kind != "hnsw":  # the HNSW coarse quantiser must look at least as far as nprobe
            params["quantizer_efSearch"] = max(64, 2 * value)
        apply_params(index, params)

    searcher = LoadedIndex(index, Device.cpu, params, fetch, plan.kind)
    value, recall = tuning.tune(lambda q, k: searcher.search(q, k), set_param, ladder, queries, exact, target)
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


def index_kind(entry: EncoderEntry) -> str:
    """The kind of a manifest entry's index ("ivf1264,nprobe39" in a schema-3 manifest is "ivf"; "sq8" stays "sq8")."""
    head = entry.index_type.split(",")[0]
    return head if head in KINDS else head.rstrip("0123456789") or entry.index_type


def describe(entry: EncoderEntry) -> str:
    """One line for `info`: kind, parameters, and the recall they were tuned to."""
    params = ", ".join(f"{k} {v}" for k, v in entry.index_params.items())
    text = index_kind(entry) + (f" ({params})" if params else "")
    if entry.recall is not None:
        text += f"; recall@10 {entry.recall:.3f}" + (f" (target {entry.recall_target:.2f})" if entry.recall_target else "")
    return text


REPAIR_HINT = "run `simsearch check --repair` to rebuild it from the stored vectors (nothing is embedded again)"


def index_problem(store: Store, name: str, entry: EncoderEntry) -> str | None:
    """Why this encoder's index file cannot be used (missing, wrong size, wrong sha256, never built), or None."""
    path = store.index_file(entry)
    if path is None:
        return f"the index of {name} was never built (an interrupted first `index`?)"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return f"{path}: index file missing"
    except OSError as e:
        return f"{path}: cannot read ({e.strerror})"
    return _content_problem(path, data, entry)


def _content_problem(path: Path, data: bytes, entry: EncoderEntry) -> str | None:
    if entry.index_sha256 is None:
        return None  # schema-1 index: nothing to verify against (rebuilt with a checksum by the next `index`)
    if len(data) != entry.index_bytes:
        return f"{path}: damaged index file ({len(data):,} bytes, the manifest says {entry.index_bytes:,})"
    if hashlib.sha256(data).hexdigest() != entry.index_sha256:
        return f"{path}: damaged index file (sha256 differs from the manifest)"
    return None


def publish_index(store: Store, name: str, index: faiss.Index, generation: int, kind: str, params: dict,
                  recall: float | None = None, recall_target: float | None = None,
                  trained_count: int | None = None) -> EncoderEntry:
    """Write `index` under a new file name, point the manifest at it, then delete the encoder's older files.

    A reader that read the old manifest still finds the old file until it is deleted, and a reader
    that finds it deleted re-reads the manifest (`load_index`): it never mixes two builds.
    recall / trained_count None: unchanged (an in-place update keeps what the build measured).
    """
    data = memoryview(faiss.serialize_index(index))  # (bytes,) uint8; not copied again by .tobytes(): 1 GB at 1M x 256
    sha = hashlib.sha256(data).hexdigest()
    entry = store.manifest.encoders[name]
    file_name = f"{name}.{generation}.{sha[:12]}.faiss"
    write_atomic(store.index_dir() / file_name, data)
    entry.index_file, entry.index_sha256, entry.index_bytes = file_name, sha, len(data)
    entry.index_type, entry.index_params, entry.index_generation = kind, params, generation
    entry.count = index.ntotal - marked_count(index)
    if recall is not None:
        entry.recall, entry.recall_target = recall, recall_target
    if trained_count is not None:
        entry.trained_count = trained_count
    store.save_manifest()
    for old in store.index_dir().iterdir():
        if old.name != file_name and (old.name == f"{name}.faiss" or _is_build_of(old.name, name)):
            old.unlink(missing_ok=True)
    store.collect_tombstones()
    return entry


def _is_build_of(file_name: str, name: str) -> bool:
    """`<name>.<generation>.<sha12>.faiss` (or a temp file of one left by a killed write)."""
    rest = file_name[len(name) + 1:] if file_name.startswith(name + ".") else ""
    parts = rest.split(".")
    return len(parts) >= 3 and parts[0].isdigit() and parts[2].startswith("faiss")


def refresh_index(store: Store, name: str, config: IndexConfig = IndexConfig(),
                  on_progress: Progress | None = None) -> str | None:
    """Bring `name`'s index up to date with the store: in place when it can, else rebuilt.

    Returns what was done ("updated: +A -R", "built", "rebuilt: <why>") or None when it was already
    current. The store must be open for writing.
    """
    entry = store.manifest.encoders[name]
    generation = store.generation
    problem = index_problem(store, name, entry) if entry.index_file else "never built"
    if entry.index_sha256 is None and problem is None:
        problem = "no checksum (schema 1)"
    if problem is None and config.kind not in ("auto", index_kind(entry)):
        problem = f"--index {config.kind} asked (it is {index_kind(entry)})"
    if problem is None and config.recall and entry.recall_target and config.recall != entry.recall_target:
        problem = f"--recall {config.recall:g} asked (it was tuned to {entry.recall_target:g})"
    config = replace(config, recall=config.recall or entry.recall_target or DEFAULT_RECALL)
    if problem is None and entry.index_generation == generation:
        return None
    if problem is None:
        changed = store.changed_ids(entry.index_generation)
        if changed is None:
            problem = "the store's change log does not reach back to this index"
        else:
            outcome = _update_in_place(store, name, entry, changed, config, generation)
            if outcome.startswith("updated"):
                return outcome
            problem = outcome
    elif entry.index_file:
        log.warning("%s; rebuilding it from the stored vectors", problem)
    count = store.vector_count(entry.key)
    fetch = lambda ids: store.vectors_of_ids(entry.key, ids, entry.dim)  # noqa: E731
    built = build_index(lambda: store.iter_vector_blocks(entry.key, entry.dim), entry.dim, count, config, fetch,
                        on_progress)
    params = {**_plan_params(built.plan), **built.params}
    publish_index(store, name, built.index, generation, built.plan.kind, params, built.recall,
                  config.recall if built.params else None, count)
    return "built" if problem == "never built" else f"rebuilt: {problem}"


def _plan_params(plan: IndexPlan) -> dict:
    return {k: v for k, v in (("nlist", plan.nlist), ("pq_m", plan.pq_m), ("hnsw_m", plan.hnsw_m)) if v}


def _update_in_place(store: Store, name: str, entry: EncoderEntry, changed: np.ndarray, config: IndexConfig,
                     generation: int) -> str:
    """Apply the store's changes since the index's generation; "updated: ..." or why it must be rebuilt."""
    index = load_index(store, name, Device.cpu)[0].cpu_index
    ids, vectors = store.vectors_by_id(entry.key, changed, entry.dim)  # live items with a vector: (n,), (n, dim)
    t = time.perf_counter()
    update_index(index, changed, ids, vectors)
    live = index.ntotal - marked_count(index)
    kind = index_kind(entry)
    if config.kind == "auto" and (wanted := config.plan(live, entry.dim).kind) != kind:
        return f"{live} vectors call for {wanted}, not {kind}"
    if kind != "flat" and kind != "hnsw" and entry.trained_count and live > RETRAIN_GROWTH * entry.trained_count:
        return f"{live} vectors, over {RETRAIN_GROWTH:g}x the {entry.trained_count} it was trained on: retraining"
    if marked_count(index) > HNSW_MAX_MARKED * index.ntotal:
        return f"over {HNSW_MAX_MARKED:.0%} of the HNSW graph are removed items"
    seconds = time.perf_counter() - t
    removed = len(changed) - len(ids)
    publish_index(store, name, index, generation, kind, entry.index_params)
    log.info("updated the %s index of %s in place: %d added or changed, %d removed (%.3f s of index work)",
             kind, name, len(ids), removed, seconds)
    return f"updated: {len(ids)} added or changed, {removed} removed"


def load_index(store: Store, name: str, device: Device = Device.auto, attempts: int = 3) -> tuple[LoadedIndex, EncoderEntry]:
    """The published index of `name` and its manifest entry, verified against the manifest's sha256,
    with its tuned search parameters set (and, for ivfpq, exact re-scoring from the stored vectors).

    The manifest is re-read first, so a long-lived reader follows a writer's newer build.
    """
    for attempt in range(attempts):
        entry = store.read_manifest().encoders.get(name)
        if entry is None:
            have = ", ".join(store.read_manifest().encoders) or "none"
            raise SimsearchError(f"the db at {store.root} has no vectors of encoder {name!r} (indexed: {have}); "
                                 f"run `simsearch index FOLDER --encoder {name}`")
        path = store.index_file(entry)
        if path is None:
            raise DbCorruptError(f"the index of {name} in {store.root} was never built (an interrupted first "
                                 f"`index`?): {REPAIR_HINT}, or re-run `simsearch index FOLDER --encoder {name}`")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if attempt + 1 < attempts and store.read_manifest().encoders.get(name) != entry:
                continue  # a writer published a newer build and deleted this one meanwhile
            raise DbCorruptError(f"{path}: index file missing; {REPAIR_HINT}") from None
        problem = _content_problem(path, data, entry)
        if problem is None:
            try:
                # faiss.deserialize_index, with the file's bytes dropped once FAISS has its copy: the peak is 2x the
                # index, not 3x (bytes + FAISS's buffer + the index; 1M x 256 IVF: +1 GB).
                reader = faiss.VectorIOReader()
                faiss.copy_array_to_vector(np.frombuffer(data, dtype=np.uint8), reader.data)
                del data
                index = faiss.read_index(reader)
                del reader
            except RuntimeError as e:  # schema-1 file (no checksum) that FAISS cannot read
                problem = f"{path}: damaged index file ({str(e).splitlines()[0][:120]})"
            else:
                fetch = None
                if index_kind(entry) == "ivfpq":
                    fetch = lambda ids: store.vectors_of_ids(entry.key, ids, entry.dim)  # noqa: E731
                return LoadedIndex(index, device, entry.index_params, fetch, index_kind(entry)), entry
        if attempt + 1 < attempts and store.read_manifest().encoders.get(name) != entry:
            continue
        raise DbCorruptError(f"{problem}; {REPAIR_HINT}")
    raise DbCorruptError(f"the index of {name} in {store.root} kept changing while it was read; try again")


class LoadedIndex:
    """A FAISS index ready to search: its tuned parameters set, on the CPU or on the GPU when asked and possible.

    fetch: exact vectors by id; when given, RESCORE * k candidates are fetched and re-scored exactly
    (ivfpq's compressed codes rank roughly; the stored float32 vectors rank exactly).
    """

    def __init__(self, index: faiss.Index, device: Device = Device.auto, params: dict | None = None,
                 fetch: Fetch | None = None, kind: str | None = None):
        self.cpu_index = index
        self.fetch = fetch
        self.params = dict(params or {})
        apply_params(index, self.params)
        self.marked = marked_count(index)
        # Removed HNSW nodes carry id -1: the search skips them (the selector sees the stored ids).
        self.search_params = faiss.SearchParameters(sel=faiss.IDSelectorRange(0, 2**62)) if self.marked else None
        self.gpu_index = to_gpu(index, kind or _kind_of(index), device)  # None: on the CPU (logged when asked)
        self.device = "cuda" if self.gpu_index is not None else "cpu"

    @property
    def ntotal(self) -> int:
        """Vectors a search can return (marked HNSW nodes excluded)."""
        return self.cpu_index.ntotal - self.marked

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, dim) -> scores (Q, k') and ids (Q, k'), k' = min(k, ntotal), best first (-1: no answer)."""
        k = min(k, self.ntotal)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if k == 0:  # FAISS asserts k > 0
            return np.empty((len(queries), 0), dtype=np.float32), np.empty((len(queries), 0), dtype=np.int64)
        depth = min(k * RESCORE, self.ntotal) if self.fetch else k
        on_gpu = self.gpu_index is not None and gpu_can_search(depth, self.params.get("nprobe", 0))
        index = self.gpu_index if on_gpu else self.cpu_index
        if self.search_params is not None:
            scores, ids = index.search(queries, depth, params=self.search_params)
        else:
            scores, ids = index.search(queries, depth)
        if self.fetch is not None:
            scores, ids = self._rescore(queries, ids, k)
        return scores, ids

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
