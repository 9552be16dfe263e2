"""Upload limits: the cap on a request's body (ASGI middleware, before any byte of an over-size body is read) and
on the uploaded image itself; uploads are handed to the library as temporary files."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from fastapi import HTTPException
from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)

# Room for the multipart boundaries and part headers around the image in an upload's body.
MULTIPART_SLACK = 64 << 10


class UploadLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before it is read (by its Content-Length) or
    as soon as it grows past the limit (a chunked body); the app then sees the client gone. `upload`: the cap on
    the image itself that the message names (the body also carries the multipart framing)."""

    def __init__(self, app, limit: int, upload: int):
        self.app = app
        self.limit = limit
        self.message = f"upload larger than the server's limit of {upload:,} bytes (--max-upload)"

    def refused(self) -> JSONResponse:  # made when needed: rendering it costs every request ~10 us otherwise
        return JSONResponse({"detail": self.message}, status_code=413, headers={"Connection": "close"})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self.refused()(scope, receive, send)
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
                    await self.refused()(scope, receive, send)
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
def saved_upload(upload: BinaryIO | bytes, limit: int) -> Iterator[Path]:
    """The uploaded file (a file object, as FastAPI's UploadFile holds it, or its bytes) as a temporary file (the
    library reads images by path), removed afterwards."""
    if isinstance(upload, bytes):
        size = len(upload)
    else:
        upload.seek(0, os.SEEK_END)
        size = upload.tell()
        upload.seek(0)
    if size > limit:
        raise HTTPException(413, f"upload of {size:,} bytes is larger than the server's limit of {limit:,} bytes "
                                 "(--max-upload)")
    with tempfile.NamedTemporaryFile(prefix="simsearch-upload-") as f:
        if isinstance(upload, bytes):
            f.write(upload)
        else:
            shutil.copyfileobj(upload, f)
        f.flush()
        yield Path(f.name)


def upload_name(filename: str | None) -> str:
    """The client's file name, on one line, for messages."""
    return " ".join((filename or "upload").split())[:200] or "upload"
