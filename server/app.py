"""The HTTP API of `simsearch serve`: FastAPI over the library, read-only over one db.

    app = create_app(ServerConfig(db=Path(".simsearch")))     # then: run(app, listen("127.0.0.1", 8000))

One process serves one app; `serve --workers N` runs N of them on one socket (workers.py).

The pieces, one job each: library.py (the db, following a running `simsearch index`), routes.py (the routes),
hot.py (the plain "similar" and "query" requests answered without FastAPI's per-request cost), schemas.py (the
answers' shapes, which make the OpenAPI document), errors.py (errors as statuses and one body), uploads.py (the caps
on uploads), moves.py (the duplicates view's "move the others"). No torch is imported on this path. The only
thing the server writes is `<db>/thumbnails/<sha256>-<side>.jpg`, once per image content (atomically); the one
request that touches the user's files, POST /api/dupes/move (loopback clients only), moves them and deletes nothing.
"""

from __future__ import annotations

import socket
from contextlib import asynccontextmanager

import faiss
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from simsearch.errors import SimsearchError
from simsearch.server import errors
from simsearch.server.hot import HotRoutes
from simsearch.server.library import Library, ServerConfig
from simsearch.server.moves import is_loopback
from simsearch.server.routes import STATIC, add_routes
from simsearch.server.uploads import MULTIPART_SLACK, UploadLimit

__all__ = ["ServerConfig", "create_app", "is_loopback", "listen", "run"]


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
        # On the event loop's thread (hot.py searches there), FAISS searches one query with this thread alone: an
        # OpenMP team would make the loop wait at its barrier for a thread a busy machine has not scheduled yet
        # (demo db, 2-core AMD EPYC under load: 0.31 -> 0.26 ms of server CPU per "similar"). The setting is the
        # calling thread's: the worker threads' searches (dupes) keep their team.
        faiss.omp_set_num_threads(1)
        yield
        lib.close()

    app = FastAPI(title="simsearch", version="1", lifespan=lifespan,
                  description="Image-similarity search over one db: query by image, similar items, browse, "
                              "thumbnails, explanations, near-duplicates. Every error is `{\"detail\": \"<one "
                              "line>\"}`.")
    app.state.library = lib
    app.add_middleware(HotRoutes, library=lib)
    # Added last, so it is the outer one: the hot routes' uploads are capped too.
    app.add_middleware(UploadLimit, limit=config.max_upload_bytes + MULTIPART_SLACK, upload=config.max_upload_bytes)
    errors.install(app)
    add_routes(app, lib)
    # The page's files come from the package's static/ folder only: StaticFiles refuses anything outside it.
    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")
    return app


# -- listening -----------------------------------------------------------------------------------------------------
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
