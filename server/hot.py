"""The two routes the page calls most, answered without FastAPI's per-request machinery.

`GET /api/items/{id}/similar` and `POST /api/query` (an uploaded image) cost the library 0.1-0.3 ms and ~6 ms of CPU;
FastAPI's dependency resolution, parameter validation and thread-pool hops added ~0.35 ms and ~0.7 ms to them, and
uvicorn itself costs ~0.03 ms a request (measured on a 2-core AMD EPYC; docs/serving.md, "Load benchmark").

`HotRoutes` is ASGI middleware inside the upload cap (app.py). It takes only a request in its plain form, whose
meaning cannot differ from what FastAPI would make of it:
  - the item id in the path and `k` as plain decimals, `k` within 1..MAX_K, the id within 0..MAX_ID;
  - no query field besides `k` and `encoder`, each at most once, `encoder` a name of [A-Za-z0-9._-];
  - the upload as a multipart body of one part, `name="image"` with a plain `filename`, and nothing else;
  - the encoder's searcher open and the db as last followed (Library.ready): nothing to reload or open.
It answers with the routes' own functions (routes.similar_answer, routes.query_answer) and errors.answer_to, so
its answers are the routes' byte for byte (tests/server/test_hot.py sends each request both ways). Every other
request goes on to FastAPI unchanged (a body read here is handed over as it came), which validates it and answers
as the OpenAPI document says.

"similar" runs on the event loop, its work being shorter than a hop to a worker thread and back, when its index is
searched in this process (a FAISS index); an index at a URI (Milvus) is searched from the thread pool FastAPI's
routes use, as "query" always is (embedding takes milliseconds and releases the GIL): the loop never waits on
another process.
"""

from __future__ import annotations

import re

from anyio import to_thread

from simsearch.server import errors, routes
from simsearch.server.library import Library
from simsearch.server.uploads import upload_name

SIMILAR = re.compile(r"/api/items/(0|[1-9][0-9]{0,18})/similar")
QUERY = "/api/query"
# key=value pairs of plain characters only: no percent-escapes, no '+', nothing FastAPI would decode or coerce
PLAIN_FIELDS = re.compile(rb"[a-z]+=[A-Za-z0-9._-]*(&[a-z]+=[A-Za-z0-9._-]*)*")
PLAIN_K = re.compile(r"[1-9][0-9]{0,3}")
PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]+")
FIELDS = ("k", "encoder")
# The request's Content-Type, and the part's headers, exactly as browsers, curl and http.client send them.
MULTIPART = re.compile(rb"(?i:multipart/form-data); boundary=([0-9A-Za-z'()+_,./:=?-]{1,70})")
PART_HEADERS = re.compile(rb'(?i:content-disposition): form-data; name="image"; '
                          rb'filename="([^"\\\x00-\x1f\x7f]{1,1000})"'
                          rb"(\r\n(?i:content-type): [A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+)?")


def plain_fields(query_string: bytes) -> tuple[int, str | None] | None:
    """(k, encoder) of a query string in the plain form (module docstring); None for any other."""
    if not query_string:
        return routes.DEFAULT_K, None
    if not PLAIN_FIELDS.fullmatch(query_string):
        return None
    fields: dict[str, str] = {}
    for pair in query_string.decode("ascii").split("&"):
        key, _, value = pair.partition("=")
        if key not in FIELDS or key in fields:
            return None
        fields[key] = value
    k, encoder = fields.get("k"), fields.get("encoder")
    if k is not None and not (PLAIN_K.fullmatch(k) and int(k) <= routes.MAX_K):
        return None
    if encoder is not None and not PLAIN_NAME.fullmatch(encoder):
        return None
    return (routes.DEFAULT_K if k is None else int(k)), encoder


def boundary_of(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The multipart boundary of a request whose only Content-Type parameter is its boundary; None otherwise."""
    types = [v for k, v in headers if k == b"content-type"]
    match = MULTIPART.fullmatch(types[0]) if len(types) == 1 else None
    return match[1] if match else None


def single_image(body: bytes, boundary: bytes) -> tuple[str, bytes] | None:
    """(file name, bytes) of a multipart body holding one part, the file `image`, and nothing else; None for any
    other body. The name is decoded as Starlette decodes it (UTF-8, else Latin-1)."""
    opening, delimiter = b"--" + boundary + b"\r\n", b"\r\n--" + boundary
    closing = delimiter + b"--"
    if not body.startswith(opening):
        return None
    end = len(body) - len(closing) - (2 if body.endswith(b"\r\n") else 0)
    if body[end:end + len(closing)] != closing:
        return None
    split = body.find(b"\r\n\r\n", len(opening), end)
    if split < 0 or body.find(delimiter, split) != end:
        return None
    headers = PART_HEADERS.fullmatch(body, len(opening), split)
    if headers is None:
        return None
    raw = headers[1]
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        name = raw.decode("latin-1")
    return name, body[split + 4:end]


async def read_body(receive) -> bytes | None:
    """The whole request body; None when the client went away (or the upload cap answered) first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive):
    """`receive` for the app that gets a request whose body was read here: the body, then the client's messages."""
    given = False

    async def again():
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return again


class HotRoutes:
    """ASGI middleware: the plain "similar" and "query" requests answered here (module docstring), the rest passed
    on to `app`."""

    def __init__(self, app, library: Library):
        self.app = app
        self.lib = library

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not scope.get("root_path"):
            path = scope["path"]
            if scope["method"] == "GET" and path.endswith("/similar") and (match := SIMILAR.fullmatch(path)):
                if await self.similar(int(match[1]), scope, receive, send):
                    return
            elif scope["method"] == "POST" and path == QUERY:
                return await self.query(scope, receive, send)
        await self.app(scope, receive, send)

    async def similar(self, item_id: int, scope, receive, send) -> bool:
        """Answer a plain "similar" request; False (nothing sent) for any other."""
        fields = plain_fields(scope["query_string"])
        ready = self.lib.ready(fields[1]) if fields is not None else None
        if ready is None or item_id > routes.MAX_ID:
            return False
        searcher, here = ready
        await self.answer(scope, receive, send, routes.similar_answer, searcher, item_id, fields[0], thread=not here)
        return True

    async def query(self, scope, receive, send) -> None:
        """Answer a plain "query" request; pass any other on (with its body, if it was read to tell)."""
        fields = plain_fields(scope["query_string"])
        ready = self.lib.ready(fields[1]) if fields is not None else None
        boundary = boundary_of(scope["headers"]) if ready is not None else None
        if boundary is None:
            return await self.app(scope, receive, send)
        searcher = ready[0]
        body = await read_body(receive)
        if body is None:
            return
        upload = single_image(body, boundary)
        if upload is None:
            return await self.app(scope, replay(body, receive), send)
        name, data = upload
        await self.answer(scope, receive, send, routes.query_answer, searcher, data, upload_name(name),
                          self.lib.config.max_upload_bytes, routes.PLAIN, fields[0], thread=True)

    async def answer(self, scope, receive, send, work, *args, thread: bool = False) -> None:
        """Send what `work(*args)` answers (run on a worker thread when `thread`), or the answer to the library's
        error it raised (errors.answer_to); any other exception propagates (a 500, as from a route)."""
        try:
            response = await to_thread.run_sync(work, *args) if thread else work(*args)
        except Exception as e:  # noqa: BLE001 - answer_to picks the library's errors; the rest is re-raised
            response = errors.answer_to(e)
            if response is None:
                raise
        await response(scope, receive, send)
