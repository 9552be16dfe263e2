"""Errors as HTTP answers: which status each error gets, the one body every error is sent with (schemas.ErrorOut:
`{"detail": "<one line>"}`), and the `responses` each route declares, so the OpenAPI document lists exactly the
statuses a route can answer with the body they are sent with."""

from __future__ import annotations

import lmdb
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match, Route

from simsearch.errors import (DbCorruptError, DbNotFoundError, EmptyDbError, ImageLoadError, ModelError,
                              NotFoundError, SimsearchError, UnknownNameError)
from simsearch.server.schemas import ErrorOut

# What each status means in this API; a route declares the ones it can answer (see `responses`).
MEANINGS = {
    400: "a request the library refuses (a reranker that reads another encoder's vectors, a depth below k, an "
         "explanation method the encoder does not allow)",
    403: "a request that moves files from another machine, at a name that is not a loopback one, or from another "
         "site's page",
    404: "no such item (or its file is gone), no vectors of that encoder in the db, the db holds no images yet, "
         "or no such reranker",
    413: "an upload over the server's cap (--max-upload)",
    422: "a parameter out of its range or of the wrong type, or an upload that is not a readable image",
    503: "the db cannot be read (gone, damaged) or a model cannot be loaded",
}


def responses(*statuses: int) -> dict[int, dict]:
    """The `responses` of a route that can answer with these error statuses."""
    return {s: {"model": ErrorOut, "description": MEANINGS[s]} for s in statuses}


def status_of(e: SimsearchError) -> int:
    if isinstance(e, (NotFoundError, UnknownNameError, EmptyDbError)):
        return 404
    if isinstance(e, ImageLoadError):
        return 422
    if isinstance(e, (DbNotFoundError, DbCorruptError, ModelError)):
        return 503
    return 400


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def error(status: int, text: object, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": one_line(text)}, status_code=status, headers=headers)


def answer_to(e: Exception) -> JSONResponse | None:
    """The answer to an error the library or a route raised (the handlers below, and hot.py, which answers outside
    FastAPI); None for any other exception (a bug: a 500)."""
    if isinstance(e, SimsearchError):
        return error(status_of(e), e)
    if isinstance(e, HTTPException):
        return error(e.status_code, e.detail, e.headers)
    if isinstance(e, lmdb.Error):
        return error(503, f"the db's LMDB store is damaged ({e}): see `simsearch check`")
    return None


def install(app: FastAPI) -> None:
    """Every error answer is ErrorOut, with a 4xx (503 for a db or model the server cannot read)."""

    @app.exception_handler(SimsearchError)
    async def simsearch_error(request, e: SimsearchError):
        return answer_to(e)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, e: RequestValidationError):
        parts = []
        for err in e.errors():
            where = ".".join(str(x) for x in err.get("loc", ())[1:]) or "request"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return error(422, "; ".join(parts))

    @app.exception_handler(HTTPException)  # FastAPI's own (an upload over the cap) and Starlette's (404, 405)
    async def http_error(request, e: HTTPException):
        if e.status_code == 405:
            # Starlette names only the methods of the first route that matched the path; GET and POST
            # /api/explain are two routes, and `Allow` must list both.
            allowed = {m for r in request.app.router.routes if isinstance(r, Route)
                       and r.matches(request.scope)[0] != Match.NONE for m in r.methods or ()}
            return error(e.status_code, e.detail, {**(e.headers or {}), "Allow": ", ".join(sorted(allowed))})
        return answer_to(e)

    @app.exception_handler(lmdb.Error)
    async def lmdb_error(request, e: lmdb.Error):
        return answer_to(e)
