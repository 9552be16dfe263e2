"""`manifest.json`: what a db holds per encoder, validated field by field when read.

A manifest is small and rewritten whole (temp file + `os.replace`), only by the process holding
the db's writer lock, so two writers can never lose each other's entries.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from simsearch.encoders.spec import Preprocess
from simsearch.errors import DbCorruptError, SchemaError

# 2: index files are named per build and carry their sha256 and size (schema 1 had one unverified
# `index/<encoder>.faiss`). 3: each encoder entry names its preprocessing policy (before: always "crop").
# 4: index kinds with tuned search parameters and the recall they were tuned to; the store logs changes
# so an index is updated in place; an encoder's vectors may be served by Milvus instead of FAISS.
# Older manifests are read and upgraded on the next write.
SCHEMA_VERSION = 4
MANIFEST = "manifest.json"
POLICIES = tuple(p.value for p in Preprocess)
BACKENDS = ("faiss", "milvus")


@dataclass
class EncoderEntry:
    """What the manifest says about one encoder's vectors and index in this db."""

    key: str  # EncoderSpec.key (name, weights, precision, policy): vectors of another key are never mixed in
    dim: int
    preprocess: str = "crop"  # the policy the vectors were made with; queries are embedded the same way
    metric: str = "inner_product"
    index_type: str = "none"  # flat | ivf | sq8 | ivfpq | hnsw (schema <= 3: "flat" or "ivf<nlist>,nprobe<p>")
    index_params: dict = field(default_factory=dict)  # build and search parameters: nlist, nprobe, pq_m, ef_search...
    recall: float | None = None  # recall@10 of the tuned search parameters against exact search, at build time
    recall_target: float | None = None  # what they were tuned to reach
    trained_count: int = 0  # vectors in the collection when the index was (re)trained: it is retrained at 2x
    count: int = 0  # vectors in the index file
    index_generation: int = -1  # store generation the index was built from (stale if different)
    index_file: str | None = None  # file name under index/; None: never built
    index_sha256: str | None = None  # None only for an index from schema 1 (not verifiable)
    index_bytes: int = 0
    backend: str = "faiss"  # faiss: the index file above; milvus: vectors mirrored to a Milvus collection
    backend_uri: str | None = None  # the Milvus URI (a Milvus Lite file or http://host:19530)


@dataclass
class Manifest:
    schema_version: int = SCHEMA_VERSION
    default_encoder: str | None = None
    encoders: dict[str, EncoderEntry] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        data = asdict(self)
        data["schema_version"] = SCHEMA_VERSION  # what is written is always the current schema
        return (json.dumps(data, indent=2) + "\n").encode()


_TYPES = {"key": str, "dim": int, "preprocess": str, "metric": str, "index_type": str, "count": int,
          "index_generation": int, "index_file": (str, type(None)), "index_sha256": (str, type(None)), "index_bytes": int,
          "index_params": dict, "recall": (float, int, type(None)), "recall_target": (float, int, type(None)),
          "trained_count": int, "backend": str, "backend_uri": (str, type(None))}
_REQUIRED = ("key", "dim")


def parse_manifest(raw: bytes, path: Path) -> Manifest:
    """Manifest from the bytes of `path`; DbCorruptError names the first bad field, SchemaError a newer schema."""

    def bad(what: str) -> DbCorruptError:
        return DbCorruptError(f"{path}: {what}; move the db aside and index again with `simsearch index FOLDER --rebuild`")

    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise bad(f"expected a JSON object, found {type(data).__name__}")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise bad("field 'schema_version' is missing or not an integer")
    if version > SCHEMA_VERSION:
        raise SchemaError(f"the db at {path.parent} was written by a newer simsearch (schema {version}; this version "
                          f"reads up to {SCHEMA_VERSION}): upgrade simsearch or use another --db")
    default = data.get("default_encoder")
    if default is not None and not isinstance(default, str):
        raise bad("field 'default_encoder' is not a string")
    encoders = data.get("encoders", {})
    if not isinstance(encoders, dict):
        raise bad(f"field 'encoders' must be an object of encoder name -> entry, found {type(encoders).__name__}")
    known = {f.name for f in fields(EncoderEntry)}
    entries = {}
    for name, entry in encoders.items():
        if not isinstance(entry, dict):
            raise bad(f"field 'encoders.{name}' is not an object")
        for f in _REQUIRED:
            if f not in entry:
                raise bad(f"field 'encoders.{name}.{f}' is missing")
        for f, value in entry.items():
            if f not in known:
                raise bad(f"unknown field 'encoders.{name}.{f}'")
            if not isinstance(value, _TYPES[f]) or (isinstance(value, bool) and _TYPES[f] is int):
                raise bad(f"field 'encoders.{name}.{f}' has the wrong type ({type(value).__name__})")
        if entry["dim"] < 1:
            raise bad(f"field 'encoders.{name}.dim' must be positive (got {entry['dim']})")
        if entry.get("preprocess", "crop") not in POLICIES:
            raise bad(f"field 'encoders.{name}.preprocess' is not a policy ({', '.join(POLICIES)})")
        if entry.get("backend", "faiss") not in BACKENDS:
            raise bad(f"field 'encoders.{name}.backend' is not a backend ({', '.join(BACKENDS)})")
        e = EncoderEntry(**entry)
        if version == 1 and e.index_type != "none":
            e.index_file = f"{name}.faiss"  # schema 1's single file, unverified until rebuilt
        entries[name] = e
    return Manifest(version, default, entries)


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write a file so that a reader (or a crash) sees the old content or the new, never half."""
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
