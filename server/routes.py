"""The routes: each calls the library the CLI calls (Searcher, Store, retrieval.query, retrieval.explain,
retrieval.dupes) and sends its JSON view (retrieval/views.py) as it is, declaring its answer's model and every error
status it can give.

Files are served by item id only: a path is never taken from a request. JSON answers are ready `JSONResponse`s:
FastAPI would validate a returned dict against the response model first (~0.3 ms of the "similar" route's ~1.4 ms
of server CPU); the models still document them, and the suite's Schemathesis run checks each answer against them.
The answers of "similar" and "query" are made by `similar_answer` and `query_answer`, which hot.py's plain path
calls too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, BinaryIO, Literal

from fastapi import Depends, FastAPI, File, HTTPException, Path as PathParam, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import Field, StringConstraints

from simsearch.errors import ImageLoadError, SimsearchError
from simsearch.indexer.images import header_size
from simsearch.indexer.scan import shown_path
from simsearch.retrieval import query as q
from simsearch.retrieval.rerank import Reranker
from simsearch.retrieval.search import QueryResult, Searcher
from simsearch.retrieval.views import hit_view, path_fields, term_view
from simsearch.server.errors import responses
from simsearch.server.library import Library
from simsearch.server.moves import MoveGroup, check_groups, destination_folder, move_groups, refusal
from simsearch.server.schemas import (DupesOut, ExplainOut, HealthOut, InfoOut, ItemOut, ItemsOut, MoveIn, MoveOut,
                                      QueryOut, SimilarOut)
from simsearch.server.uploads import saved_upload, upload_name

STATIC = Path(__file__).resolve().parent / "static"
MAX_ID = 2**63 - 1  # ids are stored as signed 64-bit integers
MAX_K = 1000
MAX_DEPTH = 10_000
MAX_TERMS = 32  # per kind (text, minus, like, unlike): a query is a handful of terms
MAX_WORDS = 1000  # characters of one text term (the text tower reads its first 77 tokens)
MAX_UNDER = 4096  # characters of `under` (PATH_MAX)
DEFAULT_K = 10

# Parameter types shared by the routes (module level: FastAPI resolves the annotations by name).
ItemId = Annotated[int, PathParam(ge=0, le=MAX_ID, description="the store's item id")]
AnyId = Annotated[int, Query(ge=0, le=MAX_ID, description="the store's item id")]
K = Annotated[int, Query(ge=1, le=MAX_K, description="number of results")]
EncoderName = Annotated[str | None, Query(
    description="one of the db's encoders (`encoders` in /api/info); empty or absent: the db's default. A name the "
                "db holds no vectors of answers 404")]
Format = Annotated[Literal["json", "png"], Query(description="json: the grids; png: the overlays")]
Method = Annotated[Literal["auto", "decomposition", "occlusion"], Query(
    description="auto: the exact decomposition where the encoder allows it, else occlusion")]
Image = Annotated[UploadFile, File(description="an image file (any format `simsearch index` reads)")]

Words = Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_WORDS)]],
                  Query(max_length=MAX_TERMS)]
Ids = Annotated[list[Annotated[int, Field(ge=0, le=MAX_ID)]], Query(max_length=MAX_TERMS)]


@dataclass(frozen=True)
class Refinements:
    """The optional fields of a query, shared by GET /api/search and POST /api/query: its terms besides an
    uploaded image, and the filters."""

    terms: tuple[q.Term, ...]
    under: str | None
    min_score: float | None


def refinements(
        text: Annotated[Words, Query(description="words to search for (repeatable); the encoder must have a text "
                                                 "tower (`text` in /api/info), else 400")] = [],
        minus: Annotated[Words, Query(description="words to search away from (repeatable): subtracted")] = [],
        like: Annotated[Ids, Query(description="an item id to search towards (repeatable): its stored vector is "
                                               "added; an id the db does not hold answers 404")] = [],
        unlike: Annotated[Ids, Query(description="an item id to search away from (repeatable): subtracted")] = [],
        under: Annotated[str | None, Query(max_length=MAX_UNDER, pattern=r"^[^\x00]*$", description=(
            "only items under this folder, or whose path matches this glob (`*`, `?`, `[...]` within a folder, "
            "`**/` across folders); a relative one is taken from the server's working folder"))] = None,
        min_score: Annotated[float | None, Query(ge=-1.0, le=1.0, description="drop hits whose cosine to the "
                                                                              "combined query is below this")] = None,
) -> Refinements:
    terms = ([q.Term("text", t) for t in text] + [q.Term("text", t, -1.0) for t in minus]
             + [q.Term("item", i) for i in like] + [q.Term("item", i, -1.0) for i in unlike])
    return Refinements(tuple(terms), under or None, min_score)


Refined = Annotated[Refinements, Depends(refinements)]
PLAIN = Refinements((), None, None)  # a query with no field besides its image


def search(searcher: Searcher, terms: tuple[q.Term, ...], refined: Refinements, k: int, reranker=None,
           depth: int = 100) -> QueryResult:
    """Searcher.search over the combined query; words for an encoder without a text tower are refused (400) here,
    before the library would try to open a text tower it does not have (a model error, 503)."""
    if not searcher.encoder.spec.has_text and any(t.kind == "text" for t in terms):
        raise SimsearchError(f"encoder {searcher.name!r} has no text tower: words need a CLIP encoder (`text` in "
                             "/api/info; docs/clip.md)")
    query = q.Query(terms, min_score=refined.min_score, under=refined.under)
    return searcher.search(query, k, reranker, depth)


def answer(searcher: Searcher, k: int, reranker: str | None, terms: list[dict], refined: Refinements,
           result: QueryResult) -> JSONResponse:
    return JSONResponse({"k": min(k, searcher.index.ntotal), "encoder": searcher.name, "reranker": reranker,
                         "terms": terms, "under": refined.under, "min_score": refined.min_score,
                         "hits": [hit_view(h) for h in result.hits], "seconds": result.seconds})


def query_answer(searcher: Searcher, upload: BinaryIO | bytes, name: str, max_bytes: int, refined: Refinements,
                 k: int, rerank: str | None = None, reranker: Reranker | None = None, depth: int = 100
                 ) -> JSONResponse:
    """POST /api/query's answer: the uploaded image (its file or bytes; `name`: the client's name for it) and the
    refinements searched as one query; `rerank` names `reranker`."""
    with saved_upload(upload, max_bytes) as path:
        try:
            result = search(searcher, (q.Term("image", str(path)), *refined.terms), refined, k, reranker, depth)
        except ImageLoadError as e:  # named by the client's file name, not the temp file's
            raise ImageLoadError(str(e).replace(str(path), name)) from None
    terms = [term_view(t) for t in (q.Term("image", name), *refined.terms)]  # the upload by its own name
    return answer(searcher, k, rerank, terms, refined, result)


def similar_answer(searcher: Searcher, item_id: int, k: int) -> JSONResponse:
    """GET /api/items/{item_id}/similar's answer."""
    hits = searcher.similar(item_id, k)
    return JSONResponse({"k": min(k, searcher.index.ntotal), "encoder": searcher.name, "query_id": item_id,
                         "hits": [hit_view(h) for h in hits]})


# The upload's part must be an image: said in the multipart encoding (FastAPI does not write one).
IMAGE_PART = {"requestBody": {"content": {"multipart/form-data": {"encoding": {"image": {"contentType": "image/*"}}}}}}
EXPLAINED = {200: {"description": "the explanation: its grids (format=json) or the two overlays (format=png)",
                   "content": {"application/json": {"schema": ExplainOut.model_json_schema()}, "image/png": {}}}}


def add_routes(app: FastAPI, lib: Library) -> None:
    """The JSON API under /api and the web page at / over `lib` (on the app itself, not an included router: the
    405 handler in errors.py reads the app's routes)."""
    config = lib.config

    @app.get("/api/health", response_model=HealthOut, responses=responses(503))
    def health():
        generation = lib.refresh()[0]
        return JSONResponse({"status": "ok", "generation": generation, "items": lib.store.item_count()})

    @app.get("/api/info", response_model=InfoOut, responses=responses(503))
    def info():
        return JSONResponse({**lib.info(), "max_upload_bytes": config.max_upload_bytes})

    @app.post("/api/query", response_model=QueryOut, responses=responses(400, 404, 413, 422, 503),
                 openapi_extra=IMAGE_PART)
    def query(image: Image, refined: Refined, k: K = DEFAULT_K, encoder: EncoderName = None,
              rerank: Annotated[str | None, Query(description="reranker name (see `simsearch rerankers`); an "
                                                              "unknown one answers 404")] = None,
              depth: Annotated[int, Query(ge=1, le=MAX_DEPTH, description="candidates the reranker sees")] = 100):
        searcher = lib.searcher(encoder)
        reranker = lib.reranker(rerank) if rerank else None
        return query_answer(searcher, image.file, upload_name(image.filename), config.max_upload_bytes, refined, k,
                            rerank, reranker, depth)

    @app.get("/api/search", response_model=QueryOut, responses=responses(400, 404, 422, 503))
    def search_terms(refined: Refined, k: K = DEFAULT_K, encoder: EncoderName = None):
        """Search by words and items of the db: the combined query vector is normalize(sum of weight x unit
        vector) over the terms (text, minus: the text tower; like, unlike: the items' stored vectors)."""
        if not refined.terms:
            raise SimsearchError("nothing to search for: give text, minus, like or unlike")
        searcher = lib.searcher(encoder)
        result = search(searcher, refined.terms, refined, k)
        return answer(searcher, k, None, [term_view(t) for t in refined.terms], refined, result)

    @app.get("/api/items/{item_id}/similar", response_model=SimilarOut, responses=responses(404, 422, 503))
    def similar(item_id: ItemId, k: K = DEFAULT_K, encoder: EncoderName = None):
        return similar_answer(lib.searcher(encoder), item_id, k)

    @app.get("/api/items", response_model=ItemsOut, responses=responses(422, 503))
    def items(offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=1000)] = 50,
              q: Annotated[str, Query(description="case-insensitive path substring")] = ""):
        listed = lib.items()
        if q:
            needle = q.casefold()
            listed = [(p, i) for p, i in listed if needle in p.casefold()]
        return JSONResponse({"total": len(listed), "offset": offset, "limit": limit,
                             "items": [{"id": i, **path_fields(p)} for p, i in listed[offset:offset + limit]]})

    @app.get("/api/items/{item_id}", response_model=ItemOut, responses=responses(404, 422, 503))
    def item(item_id: ItemId):
        path, record = lib.item(item_id)
        width, height = header_size(path)  # (0, 0): a file gone or unreadable since it was indexed
        return JSONResponse({"id": item_id, **path_fields(path), "bytes": record.size, "sha256": record.sha256,
                             "mtime_ns": record.mtime_ns, "width": width, "height": height,
                             "exists": os.path.isfile(path)})

    @app.get("/api/items/{item_id}/thumbnail", response_class=Response,
                responses={200: {"description": "a JPEG, longest side ServerConfig.thumbnail_side",
                                 "content": {"image/jpeg": {}}}, **responses(404, 422, 503)})
    def thumbnail(item_id: ItemId):
        thumb = lib.thumbnail(item_id)
        headers = {"Cache-Control": "public, max-age=86400"}
        if isinstance(thumb, bytes):
            return Response(thumb, media_type="image/jpeg", headers=headers)
        return FileResponse(thumb, media_type="image/jpeg", headers=headers)

    @app.get("/api/items/{item_id}/image", response_class=FileResponse,
                responses={200: {"description": "the original file", "content": {"image/*": {}}},
                           **responses(404, 422, 503)})
    def image(item_id: ItemId):
        path, _ = lib.file(item_id)
        return FileResponse(path, headers={"X-Content-Type-Options": "nosniff"})

    def explained(expl, a: Path | str, b: Path | str, fmt: str, names: tuple[str, str] | None = None) -> Response:
        from simsearch.retrieval.explain import render_png

        if fmt == "png":
            return Response(render_png(expl, a, b, names), media_type="image/png")
        return Response(json.dumps(expl.to_dict()), media_type="application/json")

    @app.get("/api/explain", response_class=Response, responses={**EXPLAINED, **responses(400, 404, 422, 503)})
    def explain(a: AnyId, b: AnyId, format: Format = "json", encoder: EncoderName = None, method: Method = "auto"):
        from simsearch.retrieval.explain import explain_pair

        searcher = lib.searcher(encoder)
        (path_a, _), (path_b, _) = lib.item(a), lib.item(b)
        expl = explain_pair(searcher.encoder, path_a, path_b, method=method, models_dir=config.models_dir)
        return explained(expl, path_a, path_b, format)

    @app.post("/api/explain", response_class=Response,
                 responses={**EXPLAINED, **responses(400, 404, 413, 422, 503)}, openapi_extra=IMAGE_PART)
    def explain_upload(image: Image, b: AnyId, format: Format = "json", encoder: EncoderName = None,
                       method: Method = "auto"):
        from simsearch.retrieval.explain import explain_pair

        searcher = lib.searcher(encoder)
        path_b, _ = lib.item(b)
        with saved_upload(image.file, config.max_upload_bytes) as path_a:
            try:
                expl = explain_pair(searcher.encoder, path_a, path_b, method=method, models_dir=config.models_dir)
                # titled with the upload's own name, not its temp file's
                names = (upload_name(image.filename), Path(shown_path(str(path_b))).name)
                return explained(expl, path_a, path_b, format, names)
            except ImageLoadError as e:
                raise ImageLoadError(str(e).replace(str(path_a), upload_name(image.filename))) from None

    @app.get("/api/dupes", response_model=DupesOut, responses=responses(400, 404, 422, 503))
    def dupes(threshold: Annotated[float | None, Query(gt=0.0, le=1.0, description=(
                  "the similar tier's cosine (default: calibrated); implies similar"))] = None,
              encoder: EncoderName = None,
              similar: Annotated[bool, Query(description="also group images that are only similar (bursts, "
                                                         "retakes), not verified as copies")] = False):
        return JSONResponse(lib.dupes(encoder, threshold, similar or threshold is not None))

    @app.post("/api/dupes/move", response_model=MoveOut, responses=responses(400, 403, 422, 503))
    def move_dupes(plan: MoveIn, request: Request):
        """Move the items each group does not keep into `destination` (made if needed), by id: the one path taken
        from the request is the destination, which must be absolute and outside the db. A name already there gets
        a suffix ("a-1.jpg"); nothing is deleted or overwritten; the db is not changed (the next `simsearch
        index` sees the files gone). Each item is reported, moved or failed with the reason. Only from this
        machine, at a loopback address, and from no other site's page, else 403."""
        refused = refusal(request.client.host if request.client else None, request.url.hostname,
                          request.headers.get("host"), request.headers.get("origin"))
        if refused:
            raise HTTPException(403, refused)
        groups = [MoveGroup(g.keep, tuple(g.move)) for g in plan.groups]
        check_groups(groups)
        folder = destination_folder(plan.destination, lib.store.root)
        lib.refresh()
        moved, failed = move_groups(groups, folder, lib.item)
        return JSONResponse({**path_fields(str(folder), "destination"),
                             "moved": [{"id": m.id, **path_fields(m.path), **path_fields(m.to, "to")} for m in moved],
                             "failed": [{"id": f.id, **(path_fields(f.path) if f.path is not None else {"path": None}),
                                         "reason": f.reason} for f in failed]})

    @app.get("/", response_class=FileResponse, include_in_schema=False)
    def page():
        index = STATIC / "index.html"
        if not index.is_file():
            raise HTTPException(404, "the web page is not installed (server/static/index.html is missing)")
        return FileResponse(index)
