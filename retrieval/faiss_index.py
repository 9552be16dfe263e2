"""Build, save, load and search the FAISS index of one encoder in a db.

Ids in the index are the store's item ids (IndexIDMap2), so a removed item is simply not in the
next build and a hit maps back to its path through the store. The kind is chosen by collection
size ("auto"): exact inner product while a full scan is cheap, an inverted file (IVF) above that,
because a flat scan reads every vector per query (100k x 1280-d float32 = 512 MB, ~30 ms on 2 cores).

Each build is published as a new file `index/<encoder>.<generation>.<sha12>.faiss` whose sha256 and
size the manifest records; readers verify a file before using it (`load_index`), so a damaged one is
named with the way to rebuild it from the stored vectors (`refresh_index`), never half-read.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from simsearch.devices import Device, faiss_use_gpu
from simsearch.errors import DbCorruptError, SimsearchError
from simsearch.indexer.manifest import EncoderEntry, write_atomic
from simsearch.indexer.store import Store

log = logging.getLogger(__name__)

# FAISS GPU k-selection is limited to k <= 2048; above it we search on the CPU.
GPU_MAX_K = 2048


@dataclass(frozen=True)
class IndexConfig:
    kind: str = "auto"  # "auto" | "flat" | "ivf"; vectors are L2-normalised, so inner product is cosine
    flat_max: int = 10_000  # "auto" stays exact up to this many vectors
    nlist: int = 0  # IVF lists; 0 = 4 * sqrt(n), the low end of FAISS's guideline (4..16 * sqrt(n))
    nprobe: int = 0  # lists scanned per query; 0 = nlist / 32 (recall@10 ~0.97 on clustered data, see benchmarks/speed.py)
    train_per_list: int = 40  # k-means sample size per list (FAISS warns below 39)
    seed: int = 0

    def resolve(self, count: int) -> str:
        if self.kind not in KINDS:
            raise SimsearchError(f"unknown index kind {self.kind!r} (available: {', '.join(KINDS)})")
        if self.kind == "auto":
            return "flat" if count <= self.flat_max else "ivf"
        return self.kind


KINDS = ("auto", "flat", "ivf")

BlockSource = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


def build_index(blocks: BlockSource, dim: int, count: int, config: IndexConfig = IndexConfig()) -> faiss.Index:
    """blocks(): a fresh iterable of (ids (n,) int64, vectors (n, dim) float32) over all `count` vectors.

    It is called twice for IVF (train on a sample, then add), so vectors never all sit in memory at once
    beyond what FAISS itself stores.
    """
    kind = config.resolve(count)
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    else:
        nlist = config.nlist or max(1, int(4 * np.sqrt(count)))
        nlist = min(nlist, max(1, count // 39))  # k-means needs ~39 points per centroid
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.nprobe = config.nprobe or max(1, nlist // 32)
        ivf.train(_training_sample(blocks, count, nlist * config.train_per_list, config.seed))
        log.info("IVF index: %d lists, nprobe %d, trained on up to %d vectors", nlist, ivf.nprobe,
                 nlist * config.train_per_list)
        index = faiss.IndexIDMap2(ivf)
    for ids, vecs in blocks():
        index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), ids)
    return index


def index_kind(index: faiss.Index) -> str:
    """What build_index made, for the manifest: "flat" or "ivf<nlist>,nprobe<p>"."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return "flat"
    return f"ivf{ivf.nlist},nprobe{ivf.nprobe}"


def _training_sample(blocks: BlockSource, count: int, size: int, seed: int) -> np.ndarray:
    """A seeded uniform sample of about `size` vectors, drawn block by block: (<=size, dim)."""
    rng = np.random.default_rng(seed)
    keep = min(1.0, size / max(count, 1))
    parts = [vecs[rng.random(len(vecs)) < keep] for _, vecs in blocks()]
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


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


def publish_index(store: Store, name: str, index: faiss.Index, generation: int) -> EncoderEntry:
    """Write `index` under a new file name, point the manifest at it, then delete the encoder's older files.

    A reader that read the old manifest still finds the old file until it is deleted, and a reader
    that finds it deleted re-reads the manifest (`load_index`): it never mixes two builds.
    """
    data = faiss.serialize_index(index).tobytes()
    sha = hashlib.sha256(data).hexdigest()
    entry = store.manifest.encoders[name]
    file_name = f"{name}.{generation}.{sha[:12]}.faiss"
    write_atomic(store.index_dir() / file_name, data)
    entry.index_file, entry.index_sha256, entry.index_bytes = file_name, sha, len(data)
    entry.index_type, entry.count, entry.index_generation = index_kind(index), index.ntotal, generation
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


def refresh_index(store: Store, name: str, config: IndexConfig = IndexConfig()) -> bool:
    """Rebuild `name`'s index from the stored vectors if the store changed, the kind asked for differs,
    or the file is missing or damaged. True if it was rebuilt. The store must be open for writing."""
    entry = store.manifest.encoders[name]
    generation = store.generation
    count = store.vector_count(entry.key)
    wanted = config.resolve(count)
    if entry.index_generation == generation and entry.index_type.startswith(wanted) and entry.index_sha256:
        problem = index_problem(store, name, entry)
        if problem is None:
            return False
        log.warning("%s; rebuilding it from the stored vectors", problem)
    index = build_index(lambda: store.iter_vector_blocks(entry.key, entry.dim), entry.dim, count, config)
    publish_index(store, name, index, generation)
    return True


def load_index(store: Store, name: str, device: Device = Device.auto, attempts: int = 3) -> tuple[LoadedIndex, EncoderEntry]:
    """The published index of `name` and its manifest entry, verified against the manifest's sha256.

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
                return LoadedIndex(faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)), device), entry
            except RuntimeError as e:  # schema-1 file (no checksum) that FAISS cannot read
                problem = f"{path}: damaged index file ({str(e).splitlines()[0][:120]})"
        if attempt + 1 < attempts and store.read_manifest().encoders.get(name) != entry:
            continue
        raise DbCorruptError(f"{problem}; {REPAIR_HINT}")
    raise DbCorruptError(f"the index of {name} in {store.root} kept changing while it was read; try again")


class LoadedIndex:
    """A FAISS index on the CPU, or on the GPU when asked and possible."""

    def __init__(self, index: faiss.Index, device: Device = Device.auto):
        self.cpu_index = index
        self.index = index
        self.device = "cpu"
        if faiss_use_gpu(device, faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0):
            try:
                self.index = faiss.index_cpu_to_all_gpus(index)
                self.device = "cuda"
            except (RuntimeError, AttributeError) as e:
                log.warning("could not move the FAISS index to the GPU (%s); searching on the CPU", e)

    @property
    def ntotal(self) -> int:
        return self.cpu_index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, dim) -> scores (Q, k') and ids (Q, k'), k' = min(k, ntotal), best first."""
        k = min(k, self.ntotal)
        if k == 0:  # FAISS asserts k > 0
            return np.empty((len(queries), 0), dtype=np.float32), np.empty((len(queries), 0), dtype=np.int64)
        index = self.index if (self.device == "cpu" or k <= GPU_MAX_K) else self.cpu_index
        scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, ids
