"""The HTTP API of `simsearch serve`: FastAPI over the library, one process, read-only over one db.

    app = create_app(ServerConfig(db=Path(".simsearch")))     # then: run(app, listen("127.0.0.1", 8000))

Every route calls the library the CLI calls (Searcher, Store, retrieval.explain, retrieval.dupes); no torch is
imported on this path. What the server reads and writes:
  - files are served by item id only: a path is never taken from a request (the web page's own files come
    from the package's static/ folder through Starlette's StaticFiles, which refuses anything outside it);
  - uploads are capped (ServerConfig.max_upload_bytes: a larger Content-Length is refused before any byte of
    the body is read, a body that grows past it is cut off) and decoded by the guarded loader `index` uses, so
    a decompression bomb or a truncated file is a 4xx with its one-line reason, never a 500;
  - the only thing written is `<db>/thumbnails/<sha256>-<side>.jpg`, once per image content (temp + os.replace).

A running `simsearch index` on the same db is followed without a restart: before each request the server
compares the store's generation and the manifest file's identity with what it last saw; when either changed it
re-reads the manifest and swaps in a freshly loaded index for each encoder whose published index changed.
Requests in flight keep the Searcher they started with (the shared store stays open), so no query fails
during an index, and a query sees a complete published index, old or new.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import io
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import lmdb
from fastapi import FastAPI, File, HTTPException, Path as PathParam, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel

from simsearch.devices import Device
from simsearch.errors import DbCorruptError, DbNotFoundError, ImageLoadError, SimsearchError
from simsearch.indexer.images import header_size, load_rgb
from simsearch.indexer.manifest import MANIFEST, EncoderEntry, Manifest, write_atomic
from simsearch.indexer.scan import shown_path
from simsearch.indexer.store import ItemRecord, Store
from simsearch.retrieval.faiss_index import index_kind, load_index
from simsearch.retrieval.milvus_backend import MilvusIndex
from simsearch.retrieval.rerank import Reranker, get_reranker
from simsearch.retrieval.search import Hit, Searcher

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
THUMBNAILS = "thumbnails"
MAX_ID = 2**63 - 1  # ids are stored as signed 64-bit integers
MAX_K = 1000
MAX_DEPTH = 10_000
# Room for the multipart boundaries and part headers around the image in an upload's body.
MULTIPART_SLACK = 64 << 10


@dataclass(frozen=True)
class ServerConfig:
    db: Path
    models_dir: Path | None = None
    device: Device = Device.auto
    max_upload_bytes: int = 20 << 20  # an uploaded image larger than this is refused with 413
    thumbnail_side: int = 256  # longest side of a thumbnail, in pixels


# -- response shapes (the OpenAPI schema at /openapi.json is made from these) -------------------------------------
class HitOut(BaseModel):
    rank: int
    id: int
    path: str
    score: float
    rerank_score: float | None = None


class QueryOut(BaseModel):
    k: int
    encoder: str
    reranker: str | None = None
    hits: list[HitOut]
    seconds: dict[str, float]


class SimilarOut(BaseModel):
    k: int
    encoder: str
    query_id: int
    hits: list[HitOut]


class ItemRef(BaseModel):
    id: int
    path: str


class ItemsOut(BaseModel):
    total: int
    offset: int
    limit: int
    items: list[ItemRef]


class ItemOut(BaseModel):
    id: int
    path: str
    bytes: int
    sha256: str
    mtime_ns: int
    width: int  # read from the file's header now (0 when the file is gone or unreadable)
    height: int
    exists: bool


class HealthOut(BaseModel):
    status: str
    generation: int
    items: int


class EncoderOut(BaseModel):
    name: str
    dim: int
    index: str
    count: int
    preprocess: str
    backend: str
    up_to_date: bool


class InfoOut(BaseModel):
    db: str
    items: int
    generation: int
    encoders: list[EncoderOut]
    default_encoder: str | None
    max_upload_bytes: int


class DupeItemOut(BaseModel):
    id: int
    path: str
    width: int
    height: int
    bytes: int
    score: float  # cosine to the group's keeper (1 for the keeper)


class DupeGroupOut(BaseModel):
    keeper: DupeItemOut
    others: list[DupeItemOut]
    min_score: float


class DupesOut(BaseModel):
    threshold: float
    encoder: str
    groups: list[DupeGroupOut]


class NotFound(SimsearchError):
    """An item id the db does not hold (or holds only as a removed item), or an item whose file is gone."""


def _hit(h: Hit) -> dict:
    return {"rank": h.rank, "id": h.id, "path": shown_path(h.path), "score": h.score, "rerank_score": h.rerank_score}


# -- the db as the server sees it ----------------------------------------------------------------------------------
class Library:
    """One read-only Store for the process's life, a Searcher per encoder asked for, and what is derived from them
    (the item list, duplicate groups), each kept until a writer changes the db."""

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
        self._dupes: dict[tuple, dict] = {}
        self._dupes_lock = threading.Lock()  # one duplicate search at a time: it reads every vector

    def close(self) -> None:
        for s in [s for s, _ in self._searchers.values()] + self._retired:
            if isinstance(s.index, MilvusIndex):
                s.index.close()
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
                elif not isinstance(searcher.index, MilvusIndex):  # a collection is updated in place
                    index, now = load_index(self.store, name, self.config.device)
                    self._searchers[name] = (Searcher(self.store, searcher.encoder, index, name, searcher.device), now)
                    log.info("%s: loaded the index published at generation %d", name, now.index_generation)
            self.manifest = manifest
            self._seen = seen
            return seen
        finally:
            self._refreshing.release()

    def encoder_name(self, name: str | None) -> str:
        name = name or self.manifest.default_encoder
        if name is None:
            raise SimsearchError(f"the db at {self.store.root} holds no images yet: run `simsearch index FOLDER`")
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
        """(path, record) of a live item; NotFound otherwise."""
        (path,) = self.store.paths_of([item_id])
        record = self.store.get_item(path) if path is not None else None
        if record is None or record.id != item_id:
            raise NotFound(f"no item with id {item_id} in the db")
        return path, record

    def items(self) -> list[tuple[str, int]]:
        """Every live item as (path, id), in path order (the order of `Store.iter_items`), kept per generation."""
        generation = self.refresh()[0]
        cached = self._items
        if cached is None or cached[0] != generation:
            cached = (generation, [(path, record.id) for path, record in self.store.iter_items()])
            self._items = cached
        return cached[1]

    def thumbnail(self, item_id: int) -> Path | bytes:
        """The cached JPEG thumbnail of an item (made now if it is not there yet); its bytes when the db folder
        cannot be written."""
        path, record = self.item(item_id)
        if not os.path.isfile(path):
            raise NotFound(f"item {item_id}: its file is gone ({shown_path(path)})")
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

    def dupes(self, name: str | None, threshold: float | None) -> dict:
        from simsearch.retrieval.dupes import DEFAULT_THRESHOLD, find_duplicates

        seen = self.refresh()
        name = self.encoder_name(name)
        key = (seen, name, threshold)
        with self._dupes_lock:
            if key not in self._dupes:
                groups = find_duplicates(self.store, name, threshold)
                self._dupes = {key: {
                    "threshold": DEFAULT_THRESHOLD if threshold is None else threshold, "encoder": name,
                    "groups": [{"keeper": _dupe_item(g.keeper), "others": [_dupe_item(o) for o in g.others],
                                "min_score": g.min_score} for g in groups]}}
            return self._dupes[key]


def _dupe_item(item) -> dict:
    return {**dataclasses.asdict(item), "path": shown_path(item.path)}


# -- uploads -------------------------------------------------------------------------------------------------------
class UploadLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before it is read (by its Content-Length) or
    as soon as it grows past the limit (a chunked body); the app then sees the client gone. `upload`: the cap on
    the image itself that the message names (the body also carries the multipart framing)."""

    def __init__(self, app, limit: int, upload: int):
        self.app = app
        self.limit = limit
        self.message = f"upload larger than the server's limit of {upload:,} bytes (--max-upload)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_large = JSONResponse({"detail": self.message}, status_code=413, headers={"Connection": "close"})
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_large(scope, receive, send)
        received, answered = 0, False

        async def limited_receive():
            nonlocal received, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    answered = True
                    await too_large(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not answered:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not answered:
                raise
            log.debug("request abandoned after an over-size upload", exc_info=True)


@contextmanager
def saved_upload(upload: UploadFile, limit: int) -> Iterator[Path]:
    """The uploaded file as a temporary file (the library reads images by path), removed afterwards."""
    upload.file.seek(0, os.SEEK_END)
    size = upload.file.tell()
    if size > limit:
        raise HTTPException(413, f"upload of {size:,} bytes is larger than the server's limit of {limit:,} bytes "
                                 "(--max-upload)")
    upload.file.seek(0)
    with tempfile.NamedTemporaryFile(prefix="simsearch-upload-") as f:
        shutil.copyfileobj(upload.file, f)
        f.flush()
        yield Path(f.name)


def upload_name(upload: UploadFile) -> str:
    """The client's file name, on one line, for messages."""
    return " ".join((upload.filename or "upload").split())[:200] or "upload"


# -- the app -------------------------------------------------------------------------------------------------------
# Parameter types shared by the routes (module level: FastAPI resolves the annotations by name).
ItemId = Annotated[int, PathParam(ge=0, le=MAX_ID, description="the store's item id")]
AnyId = Annotated[int, Query(ge=0, le=MAX_ID, description="the store's item id")]
K = Annotated[int, Query(ge=1, le=MAX_K, description="number of results")]
EncoderName = Annotated[str | None, Query(description="encoder (default: the db's)")]
Format = Annotated[Literal["json", "png"], Query(description="json: the grids; png: the overlays")]
Method = Annotated[Literal["auto", "decomposition", "occlusion"], Query(
    description="auto: the exact decomposition where the encoder allows it, else occlusion")]


def create_app(config: ServerConfig) -> FastAPI:
    """The FastAPI app over config.db; DbNotFoundError (and the store's other errors) at once if it cannot be opened."""
    lib = Library(config)
    if lib.manifest.default_encoder is not None:
        try:
            lib.searcher()  # the first query should not pay for opening the model and the index
        except BaseException:
            lib.close()
            raise

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        lib.close()

    app = FastAPI(title="simsearch", version="1", lifespan=lifespan,
                  description="Image-similarity search over one db: query by image, similar items, browse, "
                              "thumbnails, explanations, near-duplicates.")
    app.state.library = lib
    app.add_middleware(UploadLimit, limit=config.max_upload_bytes + MULTIPART_SLACK, upload=config.max_upload_bytes)
    _error_handlers(app)

    @app.get("/api/health", response_model=HealthOut)
    def health():
        generation = lib.refresh()[0]
        return {"status": "ok", "generation": generation, "items": lib.store.item_count()}

    @app.get("/api/info", response_model=InfoOut)
    def info():
        generation = lib.refresh()[0]
        manifest = lib.manifest
        encoders = [{"name": name, "dim": e.dim, "index": index_kind(e), "count": e.count, "preprocess": e.preprocess,
                     "backend": e.backend, "up_to_date": e.index_generation == generation
                     and (e.index_file is not None or e.backend == "milvus")}
                    for name, e in manifest.encoders.items()]
        return {"db": str(lib.store.root.absolute()), "items": lib.store.item_count(), "generation": generation,
                "encoders": encoders, "default_encoder": manifest.default_encoder,
                "max_upload_bytes": config.max_upload_bytes}

    @app.post("/api/query", response_model=QueryOut)
    def query(image: Annotated[UploadFile, File(description="the query image")], k: K = 10,
              encoder: EncoderName = None,
              rerank: Annotated[str | None, Query(description="reranker name (see `simsearch rerankers`)")] = None,
              depth: Annotated[int, Query(ge=1, le=MAX_DEPTH, description="candidates the reranker sees")] = 100):
        searcher = lib.searcher(encoder)
        reranker = lib.reranker(rerank) if rerank else None
        with saved_upload(image, config.max_upload_bytes) as path:
            (result,) = searcher.query([path], k, reranker, depth)
        if result.error:
            raise ImageLoadError(result.error.replace(str(path), upload_name(image)))
        return {"k": min(k, searcher.index.ntotal), "encoder": searcher.name, "reranker": rerank,
                "hits": [_hit(h) for h in result.hits], "seconds": result.seconds}

    @app.get("/api/items/{item_id}/similar", response_model=SimilarOut)
    def similar(item_id: ItemId, k: K = 10, encoder: EncoderName = None):
        searcher = lib.searcher(encoder)
        lib.item(item_id)
        spec = searcher.encoder.spec
        vector = searcher.store.vectors_of_ids(spec.key, [item_id], spec.dim)  # (1, dim): as it was indexed
        hits = searcher.search_vectors(vector, k)[0]
        own = next((h for h in hits if h.id == item_id), None)
        if own is not None and hits[0] is not own:  # an exact duplicate tied with it: the item itself comes first
            hits = [dataclasses.replace(h, rank=r) for r, h in enumerate([own] + [h for h in hits if h is not own], 1)]
        # A Response is sent as it is: FastAPI validates a returned dict against SimilarOut first (the schema still
        # documents the route), which cost ~0.3 ms of this route's ~1.4 ms of server CPU.
        return JSONResponse({"k": min(k, searcher.index.ntotal), "encoder": searcher.name, "query_id": item_id,
                             "hits": [_hit(h) for h in hits]})

    @app.get("/api/items", response_model=ItemsOut)
    def items(offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=1000)] = 50,
              q: Annotated[str, Query(description="case-insensitive path substring")] = ""):
        listed = lib.items()
        if q:
            needle = q.casefold()
            listed = [(p, i) for p, i in listed if needle in p.casefold()]
        return {"total": len(listed), "offset": offset, "limit": limit,
                "items": [{"id": i, "path": shown_path(p)} for p, i in listed[offset:offset + limit]]}

    @app.get("/api/items/{item_id}", response_model=ItemOut)
    def item(item_id: ItemId):
        path, record = lib.item(item_id)
        width, height = header_size(path)  # (0, 0): a file gone or unreadable since it was indexed
        return {"id": item_id, "path": shown_path(path), "bytes": record.size, "sha256": record.sha256,
                "mtime_ns": record.mtime_ns, "width": width, "height": height, "exists": os.path.isfile(path)}

    @app.get("/api/items/{item_id}/thumbnail", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}})
    def thumbnail(item_id: ItemId):
        thumb = lib.thumbnail(item_id)
        headers = {"Cache-Control": "public, max-age=86400"}
        if isinstance(thumb, bytes):
            return Response(thumb, media_type="image/jpeg", headers=headers)
        return FileResponse(thumb, media_type="image/jpeg", headers=headers)

    @app.get("/api/items/{item_id}/image", response_class=FileResponse)
    def image(item_id: ItemId):
        path, _ = lib.item(item_id)
        if not os.path.isfile(path):
            raise NotFound(f"item {item_id}: its file is gone ({shown_path(path)})")
        return FileResponse(path, headers={"X-Content-Type-Options": "nosniff"})

    def _explained(expl, a: Path | str, b: Path | str, fmt: str, names: tuple[str, str] | None = None) -> Response:
        from simsearch.retrieval.explain import render_png

        if fmt == "png":
            return Response(render_png(expl, a, b, names), media_type="image/png")
        return Response(json.dumps(expl.to_dict()), media_type="application/json")

    @app.get("/api/explain", response_class=Response)
    def explain(a: AnyId, b: AnyId,
                format: Format = "json", encoder: EncoderName = None, method: Method = "auto"):
        from simsearch.retrieval.explain import explain_pair

        searcher = lib.searcher(encoder)
        (path_a, _), (path_b, _) = lib.item(a), lib.item(b)
        expl = explain_pair(searcher.encoder, path_a, path_b, method=method, models_dir=config.models_dir)
        return _explained(expl, path_a, path_b, format)

    @app.post("/api/explain", response_class=Response)
    def explain_upload(image: Annotated[UploadFile, File(description="image A")],
                       b: AnyId, format: Format = "json",
                       encoder: EncoderName = None, method: Method = "auto"):
        from simsearch.retrieval.explain import explain_pair

        searcher = lib.searcher(encoder)
        path_b, _ = lib.item(b)
        with saved_upload(image, config.max_upload_bytes) as path_a:
            try:
                expl = explain_pair(searcher.encoder, path_a, path_b, method=method, models_dir=config.models_dir)
                # titled with the upload's own name, not its temp file's
                names = (upload_name(image), Path(shown_path(str(path_b))).name)
                return _explained(expl, path_a, path_b, format, names)
            except ImageLoadError as e:
                raise ImageLoadError(str(e).replace(str(path_a), upload_name(image))) from None

    @app.get("/api/dupes", response_model=DupesOut)
    def dupes(threshold: Annotated[float | None, Query(gt=0.0, le=1.0, description="cosine (default: calibrated)")]
              = None, encoder: EncoderName = None):
        return lib.dupes(encoder, threshold)

    @app.get("/", response_class=FileResponse, include_in_schema=False)
    def page():
        index = STATIC / "index.html"
        if not index.is_file():
            raise HTTPException(404, "the web page is not installed (server/static/index.html is missing)")
        return FileResponse(index)

    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")
    return app


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _error_handlers(app: FastAPI) -> None:
    """Every error is `{"detail": "<one line>"}` with a 4xx (5xx only for a damaged db)."""

    def status_of(e: SimsearchError) -> int:
        if isinstance(e, NotFound):
            return 404
        if isinstance(e, ImageLoadError):
            return 422
        if isinstance(e, (DbNotFoundError, DbCorruptError)):
            return 503
        return 400

    @app.exception_handler(SimsearchError)
    async def simsearch_error(request, e: SimsearchError):
        return JSONResponse({"detail": _one_line(e)}, status_code=status_of(e))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, e: RequestValidationError):
        parts = []
        for err in e.errors():
            where = ".".join(str(x) for x in err.get("loc", ())[1:]) or "request"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse({"detail": _one_line("; ".join(parts))}, status_code=422)

    @app.exception_handler(lmdb.Error)
    async def lmdb_error(request, e: lmdb.Error):
        return JSONResponse({"detail": _one_line(f"the db's LMDB store is damaged ({e}): see `simsearch check`")},
                            status_code=503)


# -- listening -----------------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (port 0: a free one, read it back with getsockname()); SimsearchError if
    it cannot be bound (the port taken, an address not of this machine)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        # proto given explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and without it
        # Nagle holds the body behind the headers until the client's delayed ACK (+40 ms a response).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    except OSError as e:
        raise SimsearchError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise SimsearchError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def run(app: FastAPI, sock: socket.socket) -> None:
    """Serve `app` on a listening socket until interrupted (uvicorn, one process; no access log: it costs CPU on
    every request)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False))
    server.run(sockets=[sock])
