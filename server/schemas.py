"""The shapes the API answers with: the OpenAPI document at /openapi.json is made from these.

The routes send the library's JSON views (retrieval/views.py) as they are, so these models document those views
field for field; `extra="forbid"` puts `additionalProperties: false` in the document, and the suite's Schemathesis
run checks every answer against it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


PATH_BYTES = Field(None, description="base64 of the path's exact bytes; only for a name that is not valid UTF-8 "
                                     "(`path` then shows those bytes as \\xNN)")


class ErrorOut(Model):
    """Every error answer."""

    detail: str = Field(description="what went wrong, on one line")


class HitOut(Model):
    rank: int
    id: int
    path: str
    path_bytes: str | None = PATH_BYTES
    score: float = Field(description="cosine similarity")
    rerank_score: float | None = Field(description="P(same) from the reranker; null when not reranked")


class TermOut(Model):
    """One term of a query, as it was searched: the combined query vector is normalize(sum of weight x the term's
    unit vector)."""

    kind: Literal["image", "text", "item"] = Field(description="an uploaded image, words (the text tower), or an "
                                                              "item of the db (its stored vector)")
    value: str | int = Field(description="the upload's file name, the words, or the item's id")
    value_bytes: str | None = Field(None, description="base64 of an image path's exact bytes; only for a name that "
                                                      "is not valid UTF-8")
    weight: float = Field(description="1 for text and like, -1 for minus and unlike")


class QueryOut(Model):
    k: int = Field(description="hits asked for, or every item when the db holds fewer (`under` and `min_score` can "
                               "leave fewer hits)")
    encoder: str
    reranker: str | None
    terms: list[TermOut] = Field(description="the query's terms, in the order given: image, text, minus, like, "
                                             "unlike")
    under: str | None = Field(description="only items under this folder or matching this glob")
    min_score: float | None = Field(description="hits below this cosine to the combined query are dropped")
    hits: list[HitOut]
    seconds: dict[str, float] = Field(description="time per stage: load+embed, search, rerank")


class SimilarOut(Model):
    k: int
    encoder: str
    query_id: int
    hits: list[HitOut]


class ItemRef(Model):
    """An item: its store id and its path."""

    id: int
    path: str
    path_bytes: str | None = PATH_BYTES


class ItemsOut(Model):
    total: int
    offset: int
    limit: int
    items: list[ItemRef]


class ItemOut(ItemRef):
    bytes: int
    sha256: str
    mtime_ns: int
    width: int = Field(description="read from the file's header now (0 when the file is gone or unreadable)")
    height: int
    exists: bool


class HealthOut(Model):
    status: str
    generation: int
    items: int


class DupeItemOut(ItemRef):
    width: int
    height: int
    bytes: int
    score: float = Field(description="cosine to the group's keeper (1 for the keeper)")
    tier: Literal["keeper", "exact", "edited", "similar"] = Field(
        description="how it is a duplicate of the keeper: the same pixels, a verified edited copy, or only similar")


class DupeGroupOut(Model):
    tier: Literal["exact", "edited", "similar"] = Field(description="the group's weakest link")
    keeper: DupeItemOut
    others: list[DupeItemOut]
    min_score: float


class DupeTotalsOut(Model):
    groups: int
    by_tier: dict[str, int] = Field(description="groups per tier (exact, edited, similar)")
    removable_images: int
    reclaimable_bytes: int


class DupesOut(Model):
    encoder: str
    threshold: float = Field(description="the similar tier's cosine")
    similar: bool = Field(description="whether the similar tier was asked for")
    totals: DupeTotalsOut
    groups: list[DupeGroupOut]


class MoveGroupIn(Model):
    keep: int = Field(ge=0, le=2**63 - 1, description="the item kept: never moved; its file must be there, else "
                                                       "none of the group's items is moved")
    move: list[Annotated[int, Field(ge=0, le=2**63 - 1)]] = Field(
        min_length=1, max_length=10_000, description="the items to move out (ids of the db: a path is never taken)")


class MoveIn(Model):
    destination: str = Field(min_length=1, max_length=4096, pattern=r"^[^\x00]*$", description=(
        "an absolute folder outside the db; made if it is not there"))
    groups: list[MoveGroupIn] = Field(min_length=1, max_length=100_000)


class MovedOut(ItemRef):
    """A file moved: `path` where it was, `to` where it is now."""

    to: str
    to_bytes: str | None = PATH_BYTES


class MoveFailedOut(Model):
    """A file left where it was, and why."""

    id: int
    path: str | None = Field(description="null: no such item in the db")
    path_bytes: str | None = PATH_BYTES
    reason: str


class MoveOut(Model):
    destination: str = Field(description="the folder the files were moved into (its real path)")
    destination_bytes: str | None = PATH_BYTES
    moved: list[MovedOut]
    failed: list[MoveFailedOut]


class ExplainOut(Model):
    method: str = Field(description="decomposition or occlusion")
    score: float
    exact: bool
    encoder: str
    preprocess: str
    image_size: int
    grid_shape: list[int]
    grid_a: list[list[float]]
    grid_b: list[list[float]]


class EncoderInfoOut(Model):
    dim: int
    preprocess: str
    metric: str
    weights: str = Field(description="the encoder's key: name, weights, precision, policy")
    backend: str = Field(description="faiss or milvus")
    index_type: str = Field(description="flat, ivf, sq8, ivfpq, hnsw; none when never built")
    index: str = Field(description="one line: where the index is, its kind, parameters, recall")
    index_params: dict = Field(description="the search parameters the index was built and tuned with")
    recall_at_10: float | None
    recall_target: float | None
    vectors_in_index: int
    index_file: str | None
    backend_uri: str | None
    index_up_to_date: bool
    index_problem: str | None = Field(description="why the index cannot be used; null when not verified: the "
                                                   "server does not read index files per request (`simsearch info` "
                                                   "does)")
    text: bool = Field(description="whether the encoder has a text tower (a CLIP encoder): queries may hold words")


class InfoOut(Model):
    db: str
    db_bytes: str | None = PATH_BYTES
    schema_version: int
    items: int
    generation: int
    default_encoder: str | None
    writer_active: bool = Field(description="whether a `simsearch index` is writing to the db now")
    size_on_disk_bytes: int
    encoders: dict[str, EncoderInfoOut]
    max_upload_bytes: int = Field(description="the server's cap on an uploaded image")
