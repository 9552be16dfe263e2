"""The index run: scan -> read+hash+decode (worker threads, bounded lookahead) -> embed (batched) -> store.

The search index is built from the store afterwards (`retrieval.backend.refresh`).

A run commits every batch in its own LMDB transaction, so a run that is killed keeps everything it
embedded, and the next run only does the rest. Files whose (size, mtime) are unchanged and whose
vector is stored are not even read; files whose content hash already has a vector (renamed,
touched, duplicated) are read and hashed but not decoded or embedded (decoded only when their perceptual hashes,
indexer/phash.py, are missing). The perceptual hashes come from the vector's decode when the encoder decodes at
their side (the default encoder does), else from a decode of their own.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simsearch.encoders.preprocess import decode_side, to_input
from simsearch.encoders.runtime import OnnxEncoder, cpu_count
from simsearch.errors import ImageLoadError
from simsearch.indexer.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, load_rgb
from simsearch.indexer.phash import DECODE_SIDE, hashes_of
from simsearch.indexer.scan import FileEntry, item_path, scan
from simsearch.indexer.store import Store

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (items done so far, items to do)


@dataclass(frozen=True)
class IndexerConfig:
    batch_size: int = 32
    workers: int = 0  # decode threads; 0 = one per core
    lookahead_batches: int = 4  # decoded batches kept ready ahead of the encoder
    max_pixels: int = DEFAULT_MAX_PIXELS
    extensions: frozenset[str] = IMAGE_EXTENSIONS


@dataclass
class IndexReport:
    encoder: str
    root: str
    scanned: int = 0
    embedded: int = 0
    reused: int = 0  # content already embedded (renamed, touched or duplicate file)
    unchanged: int = 0
    removed: int = 0
    not_checked: int = 0  # items under folders or files that could not be read this time: kept
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, one-line reason)
    ignored: dict[str, int] = field(default_factory=dict)  # reason -> files not looked at (other extensions...)
    total_items: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"scan": 0.0, "read+decode": 0.0, "embed": 0.0, "write": 0.0})
    wall: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.wall if self.wall > 0 else 0.0


@dataclass
class _Prepared:
    entry: FileEntry
    sha256: str | None = None
    array: np.ndarray | None = None  # (3, S, S); None when the vector is already stored
    hashes: bytes | None = None  # perceptual hashes (phash.Hashes), None when already stored
    error: str | None = None
    seconds: float = 0.0


def _yield_to_encoder() -> None:
    """Run this decode thread at the lowest CPU priority (Linux; elsewhere a no-op).

    The encoder's ONNX Runtime threads synchronise at every layer, so a decode thread that preempts
    one of them stalls all of them. At the lowest priority, decoding fills the encoder's idle gaps
    instead: on 2 cores, end-to-end indexing went from 0.80x to ~0.88x of pure encoder throughput
    (benchmarks/speed.py). The lookahead queue keeps the encoder fed.
    """
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError as e:  # not permitted in some sandboxes: keep the default priority
            log.debug("could not lower decode thread priority: %s", e)


class Indexer:
    """Index folders into one db with one encoder."""

    def __init__(self, encoder: OnnxEncoder, store: Store, config: IndexerConfig = IndexerConfig()):
        self.encoder = encoder
        self.spec = encoder.spec
        self.store = store
        self.config = config

    def run(self, root: str | Path, on_progress: ProgressFn | None = None) -> IndexReport:
        """Embed what is new or changed under `root` (a folder or one file); drop items whose files are gone.

        Items under a folder that could not be listed this time are kept and counted as not checked.
        """
        t0 = time.perf_counter()
        root = item_path(root)
        report = IndexReport(encoder=self.spec.name, root=root)
        old = self.store.manifest.encoders.get(self.spec.name)
        if old is not None and old.key != self.spec.key:
            log.warning("the db's %s vectors are %s, this encoder's are %s (other weights, precision or --preprocess): "
                        "embedding every image again", self.spec.name, old.key, self.spec.key)
        self.store.register_encoder(self.spec.name, self.spec.key, self.spec.dim, self.spec.preprocess.value)
        found = scan(root, self.config.extensions)
        entries = found.files
        report.scanned, report.ignored = len(entries), dict(found.ignored)
        todo = [e for e in entries if not self._unchanged(e)]
        report.unchanged = len(entries) - len(todo)
        report.seconds["scan"] = time.perf_counter() - t0
        log.info("%s: %d images, %d unchanged, %d to read", root, len(entries), report.unchanged, len(todo))

        self._process(todo, report, on_progress)

        if os.path.isdir(root):
            seen = {e.path for e in entries}
            unchecked = tuple(found.unreadable)
            gone = []
            for path, _ in self.store.iter_items(under=root):
                if path in seen:
                    continue
                if any(path == u or path.startswith(u + os.sep) for u in unchecked):
                    report.not_checked += 1
                else:
                    gone.append(path)
            report.removed = self.store.remove_items(gone)
        report.total_items = self.store.item_count()
        report.wall = time.perf_counter() - t0
        return report

    def embed_files(self, paths: list[str | Path], on_progress: ProgressFn | None = None) -> IndexReport:
        """Make sure these files have vectors in the store; nothing is removed and no index is built.

        For callers that work on a chosen list of files (benchmarks, training data), with the same
        content-hash cache as `run`, so a second call on the same files embeds nothing.
        """
        t0 = time.perf_counter()
        report = IndexReport(encoder=self.spec.name, root="")
        entries = []
        for p in paths:
            try:
                st = os.stat(p)
            except OSError as e:
                report.skipped.append((str(p), f"{p}: cannot read ({e.strerror})"))
                continue
            entries.append(FileEntry(item_path(p), st.st_size, st.st_mtime_ns))
        report.scanned = len(entries)
        todo = [e for e in entries if not self._unchanged(e)]
        report.unchanged = len(entries) - len(todo)
        report.seconds["scan"] = time.perf_counter() - t0
        self._process(todo, report, on_progress)
        report.wall = time.perf_counter() - t0
        return report

    def _unchanged(self, e: FileEntry) -> bool:
        rec = self.store.get_item(e.path)
        return (
            rec is not None
            and rec.size == e.size
            and rec.mtime_ns == e.mtime_ns
            and self.store.has_vector(self.spec.key, rec.sha256)
        )

    def _prepare(self, entry: FileEntry) -> _Prepared:
        """Runs in a worker thread: read once, hash, and decode only if the content is new."""
        t = time.perf_counter()
        out = _Prepared(entry)
        try:
            try:
                with open(entry.path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise ImageLoadError(f"{entry.path}: cannot read ({e.strerror})") from None
            out.sha256 = hashlib.sha256(data).hexdigest()
            embed = not self.store.has_vector(self.spec.key, out.sha256)
            hashed = self.store.get_hashes([out.sha256])[0] is not None
            # The vector from a decode at the encoder's own side, exactly as a query decodes (a larger decode gives
            # other pixels, and an image would not find itself at 1.0); the hashes from one at their fixed side, so
            # the pixel digest of a file never depends on the encoder. The default encoder's side is the hashes':
            # one decode serves both.
            side = decode_side(self.spec)
            im = load_rgb(entry.path, side, self.config.max_pixels, data=data) if embed else None
            if embed:
                out.array = to_input(im, self.spec)
            if not hashed:
                if im is None or side != DECODE_SIDE:
                    im = load_rgb(entry.path, DECODE_SIDE, self.config.max_pixels, data=data)
                out.hashes = hashes_of(im).to_bytes()
        except ImageLoadError as e:
            out.error = str(e)
        out.seconds = time.perf_counter() - t
        return out

    def _process(self, todo: list[FileEntry], report: IndexReport, on_progress: ProgressFn | None) -> None:
        cfg = self.config
        window = cfg.batch_size * cfg.lookahead_batches
        pending: list[_Prepared] = []
        done = 0

        def flush() -> None:
            nonlocal done
            arrays = [p for p in pending if p.array is not None]
            vectors: dict[int, np.ndarray] = {}
            if arrays:
                t = time.perf_counter()
                embedded = self.encoder.embed(np.stack([p.array for p in arrays]))  # (B, 3, S, S) -> (B, dim)
                report.seconds["embed"] += time.perf_counter() - t
                vectors = {id(p): v for p, v in zip(arrays, embedded)}
            t = time.perf_counter()
            # Hashes first: a run killed between the two transactions leaves a hash without its item (indexed again
            # next time), never an item that is then skipped as unchanged without its hash.
            hashes = [(p.sha256, p.hashes) for p in pending if p.hashes is not None]
            if hashes:
                self.store.put_hashes(hashes)
            self.store.put_items(
                self.spec.key,
                [(p.entry.path, p.sha256, p.entry.size, p.entry.mtime_ns, vectors.get(id(p))) for p in pending],
            )
            report.seconds["write"] += time.perf_counter() - t
            report.embedded += len(arrays)
            report.reused += len(pending) - len(arrays)
            done += len(pending)
            pending.clear()
            if on_progress:
                on_progress(done + len(report.skipped), len(todo))

        with ThreadPoolExecutor(max_workers=cfg.workers or cpu_count(), thread_name_prefix="decode",
                                initializer=_yield_to_encoder) as pool:
            it = iter(todo)
            futures = deque(pool.submit(self._prepare, e) for _, e in zip(range(window), it))
            while futures:
                prepared = futures.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    futures.append(pool.submit(self._prepare, nxt))
                report.seconds["read+decode"] += prepared.seconds
                if prepared.error:
                    log.warning("skipped %s", prepared.error)
                    report.skipped.append((prepared.entry.path, prepared.error))
                    if on_progress:
                        on_progress(done + len(report.skipped), len(todo))
                    continue
                pending.append(prepared)
                if sum(p.array is not None for p in pending) >= cfg.batch_size:
                    flush()
            if pending:
                flush()
