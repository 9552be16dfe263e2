"""The db as the server sees it, following a running writer.

A running `simsearch index` on the same db is followed without a restart: before each request the server
compares the store's generation and the manifest file's identity with what it last saw; when either changed it
re-reads the manifest and swaps in the newest published index for each encoder whose index changed (a backend
that updates its index in place hands back the same one). Requests in flight keep the Searcher they started with
(the shared store stays open), so no query fails during an index, and a query sees a complete published index,
old or new.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from simsearch.atomic import write_atomic
from simsearch.devices import Device
from simsearch.encoders.registry import get_encoder
from simsearch.errors import NotFoundError, UnknownNameError
from simsearch.indexer.images import load_rgb
from simsearch.indexer.manifest import MANIFEST, EncoderEntry, Manifest
from simsearch.indexer.scan import shown_path
from simsearch.indexer.store import ItemRecord, Store
from simsearch.retrieval.backend import backend_of
from simsearch.retrieval.dupes import find_duplicates
from simsearch.retrieval.rerank import Reranker, get_reranker
from simsearch.retrieval.search import Searcher
from simsearch.retrieval.views import db_info, dupes_view

log = logging.getLogger(__name__)

THUMBNAILS = "thumbnails"


@dataclass(frozen=True)
class ServerConfig:
    db: Path
    models_dir: Path | None = None
    device: Device = Device.auto
    max_upload_bytes: int = 20 << 20  # an uploaded image larger than this is refused with 413
    thumbnail_side: int = 256  # longest side of a thumbnail, in pixels


class Library:
    """One read-only Store for the process's life, a Searcher per encoder asked for, and what is derived from them
    (the item list, the db's info, duplicate groups), each kept until a writer changes the db."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.store = Store(config.db, readonly=True)
        self._lock = threading.Lock()  # opening a searcher or a reranker
        self._refreshing = threading.Lock()  # one request at a time follows a writer
        self._seen: tuple | None = None  # (store generation, manifest file identity) last followed
        self.manifest: Manifest = self.store.manifest
        # encoder name -> (searcher, the manifest entry read before its index was loaded)
        self._searchers: dict[str, tuple[Searcher, EncoderEntry | None]] = {}
        self._retired: list[Searcher] = []  # replaced wholesale (new weights): closed with the library
        self._rerankers: dict[str, Reranker] = {}
        self._items: tuple[int, list[tuple[str, int]]] | None = None  # (generation, [(path, id)] in path order)
        self._info: tuple[tuple, dict] | None = None  # (state seen, db_info)
        self._dupes: dict[tuple, dict] = {}
        self._dupes_lock = threading.Lock()  # one duplicate search at a time: it reads every vector

    def close(self) -> None:
        for s in [s for s, _ in self._searchers.values()] + self._retired:
            s.index.close()  # not Searcher.close: the store is shared
        self.store.close()

    def _observe(self) -> tuple:
        try:
            st = os.stat(self.store.root / MANIFEST)
            manifest_id = (st.st_ino, st.st_mtime_ns, st.st_size)  # a writer replaces it: a new inode
        except FileNotFoundError:
            manifest_id = None
        return self.store.generation, manifest_id

    def refresh(self) -> tuple:
        """Follow a writer (see the module's docstring); returns (generation, manifest identity) of the state the
        request is served from. While one request reloads an index, the others are served from the state before."""
        seen = self._observe()
        if seen == self._seen:
            return seen
        if not self._refreshing.acquire(blocking=self._seen is None):
            return self._seen
        try:
            if seen == self._seen:
                return seen
            manifest = self.store.read_manifest()
            for name, (searcher, entry) in list(self._searchers.items()):
                now = manifest.encoders.get(name)
                if now == entry:
                    continue
                if now is None or entry is None or now.key != entry.key or now.backend != entry.backend:
                    self._retired.append(self._searchers.pop(name)[0])  # opened afresh when next asked for
                    continue
                index = searcher.index.reload()
                if index is not searcher.index:
                    searcher = Searcher(self.store, searcher.encoder, index, name, searcher.device)
                    log.info("%s: loaded the index published at generation %d", name, now.index_generation)
                self._searchers[name] = (searcher, now)
            self.manifest = manifest
            self._seen = seen
            return seen
        finally:
            self._refreshing.release()

    def ready(self, name: str | None) -> tuple[Searcher, bool] | None:
        """(the open Searcher of encoder `name` (None: the db's default), whether its index is searched in this
        process) when there is nothing to follow or open: the db is as it was last followed and that searcher is
        loaded. None otherwise, and for a name the db has no vectors of: the caller then takes `searcher`, which
        follows the writer, opens, or refuses. An index at a URI (a server, a file another process serves) is
        searched elsewhere: a search waits on that process."""
        if self._observe() != self._seen:
            return None
        found = self._searchers.get(name or self.manifest.default_encoder)
        if found is None:
            return None
        searcher, entry = found
        return searcher, entry is not None and not backend_of(entry).takes_uri

    def encoder_name(self, name: str | None) -> str:
        """`name` or the db's default; EmptyDbError when the db holds nothing, NotFoundError for a name it has no
        vectors of (an encoder that exists but was not indexed here, or no encoder at all)."""
        name = self.manifest.encoder_name(name, self.store.root)
        if name not in self.manifest.encoders:
            raise NotFoundError(f"the db has no vectors of encoder {name!r} (indexed: "
                                f"{', '.join(self.manifest.encoders)}): see /api/info")
        return name

    def searcher(self, name: str | None = None) -> Searcher:
        self.refresh()
        name = self.encoder_name(name)
        found = self._searchers.get(name)
        if found is not None:
            return found[0]
        with self._lock:
            found = self._searchers.get(name)
            if found is None:
                entry = self.store.read_manifest().encoders.get(name)  # read first: a newer build is loaded later
                found = (Searcher.open(self.store, name, self.config.device, self.config.models_dir), entry)
                self._searchers[name] = found
            return found[0]

    def reranker(self, name: str) -> Reranker:
        with self._lock:
            if name not in self._rerankers:
                self._rerankers[name] = Reranker(get_reranker(name, self.config.models_dir), self.config.device)
            return self._rerankers[name]

    def item(self, item_id: int) -> tuple[str, ItemRecord]:
        """(path, record) of a live item; NotFoundError otherwise."""
        (path,) = self.store.paths_of([item_id])
        record = self.store.get_item(path) if path is not None else None
        if record is None or record.id != item_id:
            raise NotFoundError(f"no item with id {item_id} in the db")
        return path, record

    def file(self, item_id: int) -> tuple[str, ItemRecord]:
        """(path, record) of a live item whose file is there; NotFoundError otherwise."""
        path, record = self.item(item_id)
        if not os.path.isfile(path):
            raise NotFoundError(f"item {item_id}: its file is gone ({shown_path(path)})")
        return path, record

    def items(self) -> list[tuple[str, int]]:
        """Every live item as (path, id), in path order (the order of `Store.iter_items`), kept per generation."""
        generation = self.refresh()[0]
        cached = self._items
        if cached is None or cached[0] != generation:
            cached = (generation, [(path, record.id) for path, record in self.store.iter_items()])
            self._items = cached
        return cached[1]

    def info(self) -> dict:
        """The db's info (retrieval.views.db_info, index files not verified: that reads them whole), with `text` per
        encoder (whether it has a text tower: the page shows its search box for words), kept until the db changes."""
        seen = self.refresh()
        cached = self._info
        if cached is None or cached[0] != seen:
            info = db_info(self.store, verify=False)
            encoders = {name: {**e, "text": self.has_text(name)} for name, e in info["encoders"].items()}
            cached = (seen, {**info, "encoders": encoders})
            self._info = cached
        return cached[1]

    def has_text(self, name: str) -> bool:
        """Whether the registered encoder `name` has a text tower (False for a name not registered here: the
        server cannot search its vectors at all)."""
        try:
            return get_encoder(name, self.config.models_dir).has_text
        except UnknownNameError:
            return False

    def thumbnail(self, item_id: int) -> Path | bytes:
        """The cached JPEG thumbnail of an item (made now if it is not there yet); its bytes when the db folder
        cannot be written."""
        path, record = self.file(item_id)
        side = self.config.thumbnail_side
        # Named by content: a changed file gets a new thumbnail, copies share one.
        cached = self.store.root / THUMBNAILS / f"{record.sha256}-{side}.jpg"
        if cached.is_file():
            return cached
        image = load_rgb(path, side)  # the JPEG decoder may decode at 1/2..1/8 scale: shorter side still >= side
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        try:
            cached.parent.mkdir(exist_ok=True)
            write_atomic(cached, buffer.getvalue())  # a concurrent reader sees the whole file or none
        except OSError as e:
            log.warning("cannot cache thumbnails in %s (%s): serving them uncached", cached.parent, e.strerror)
            return buffer.getvalue()
        return cached

    def dupes(self, name: str | None, threshold: float | None, similar: bool = False) -> dict:
        """The duplicate groups (retrieval.views.dupes_view), with the similar tier when asked, kept until the db
        changes."""
        seen = self.refresh()
        name = self.encoder_name(name)
        key = (seen, name, threshold, similar)
        with self._dupes_lock:
            if key not in self._dupes:
                groups = find_duplicates(self.store, name, threshold, similar=similar)
                self._dupes = {key: dupes_view(groups, name, threshold, similar)}
            return self._dupes[key]
