"""`manifest.json`: what a db holds per encoder, validated field by field when read.

A manifest is small and rewritten whole (atomically), only by the process holding the db's writer lock,
so two writers can never lose each other's entries.

The store owns an entry's own fields (the encoder's key, dim, preprocessing policy, metric) and which
backend serves its index, and from which store generation. The index's own state (a FAISS file and its
checksum, a Milvus collection...) is one `index` object that only its backend reads and writes
(`Store.set_index_state`); the backend validates it (see retrieval/backend.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from simsearch.encoders.spec import Preprocess
from simsearch.errors import DbCorruptError, EmptyDbError, SchemaError

# Every older manifest is read through the ladder in `_upgrade` and written back as the current schema:
# 2: index files are named per build and carry their sha256 and size (schema 1 had one unverified
# `index/<encoder>.faiss`). 3: each encoder entry names its preprocessing policy (before: always "crop").
# 4: index kinds with tuned search parameters and the recall they were tuned to; the store logs changes
# so an index is updated in place; an encoder's vectors may be served by Milvus instead of FAISS.
# 5: the index's state is one `index` object owned by its backend; the entry keeps the store's fields.
# 6: a FAISS index is segments: its base file, the base's id list (`ids`) and delta files (`deltas`); a base from
# before has no id list (its first update rewrites it with one) and no deltas.
SCHEMA_VERSION = 6
MANIFEST = "manifest.json"
POLICIES = tuple(p.value for p in Preprocess)


@dataclass
class EncoderEntry:
    """What the manifest says about one encoder's vectors in this db, and which backend indexes them."""

    key: str  # EncoderSpec.key (name, weights, precision, policy): vectors of another key are never mixed in
    dim: int
    preprocess: str = "crop"  # the policy the vectors were made with; queries are embedded the same way
    metric: str = "inner_product"
    backend: str = "faiss"  # the vector backend that serves this encoder's index (retrieval/backend.py)
    # Store generation the published index was built from; -1: none published. The store keeps the path of every
    # id removed after it (tombstones) and its change log since it, whatever the backend.
    index_generation: int = -1
    index: dict = field(default_factory=dict)  # the backend's own state; {} when none was published

    def up_to_date(self, generation: int) -> bool:
        """Whether an index is published and holds the store's state at `generation` (the store's now)."""
        return self.index_generation == generation

    @property
    def has_index(self) -> bool:
        return self.index_generation >= 0


@dataclass
class Manifest:
    schema_version: int = SCHEMA_VERSION
    default_encoder: str | None = None
    encoders: dict[str, EncoderEntry] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        data = asdict(self)
        data["schema_version"] = SCHEMA_VERSION  # what is written is always the current schema
        return (json.dumps(data, indent=2) + "\n").encode()

    def encoder_name(self, name: str | None, db: Path) -> str:
        """`name`, else the db's default encoder; EmptyDbError when the db has none (nothing indexed yet)."""
        name = name or self.default_encoder
        if name is None:
            raise EmptyDbError(f"the db at {db} holds no images yet: run `simsearch index FOLDER`")
        return name


_TYPES = {"key": str, "dim": int, "preprocess": str, "metric": str, "backend": str, "index_generation": int,
          "index": dict}
_REQUIRED = ("key", "dim")


def parse_manifest(raw: bytes, path: Path) -> Manifest:
    """Manifest from the bytes of `path` (of any schema up to ours); DbCorruptError names the first bad field,
    SchemaError a newer schema."""

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
    entries = {}
    for name, entry in encoders.items():
        if not isinstance(entry, dict):
            raise bad(f"field 'encoders.{name}' is not an object")
        for f in _REQUIRED:
            if f not in entry:
                raise bad(f"field 'encoders.{name}.{f}' is missing")
        try:
            entry = _upgrade(dict(entry), version, name)
        except (TypeError, ValueError, AttributeError) as e:
            raise bad(f"field 'encoders.{name}' cannot be read as schema {version} ({e})") from None
        for f, value in entry.items():
            if f not in _TYPES:
                raise bad(f"unknown field 'encoders.{name}.{f}'")
            if not isinstance(value, _TYPES[f]) or (isinstance(value, bool) and _TYPES[f] is int):
                raise bad(f"field 'encoders.{name}.{f}' has the wrong type ({type(value).__name__})")
        if entry["dim"] < 1:
            raise bad(f"field 'encoders.{name}.dim' must be positive (got {entry['dim']})")
        if entry.get("preprocess", "crop") not in POLICIES:
            raise bad(f"field 'encoders.{name}.preprocess' is not a policy ({', '.join(POLICIES)})")
        if entry.get("index") and entry.get("index_generation", -1) < 0:
            raise bad(f"field 'encoders.{name}.index' is set but 'index_generation' says none was published")
        entries[name] = EncoderEntry(**entry)
    return Manifest(version, default, entries)


# The entry fields of schema 4 that schema 5 moved into the backend's `index` object.
_V4_INDEX_FIELDS = ("index_type", "index_params", "recall", "recall_target", "trained_count", "count", "index_file",
                    "index_sha256", "index_bytes", "backend_uri")


def _upgrade(entry: dict, version: int, name: str) -> dict:
    """One encoder entry of schema `version` as schema SCHEMA_VERSION has it: every migration, in order."""
    if version < 2 and entry.get("index_type", "none") != "none":
        entry["index_file"] = f"{name}.faiss"  # schema 1's single file, unverified (no sha256) until rebuilt
    if version < 3:
        entry.setdefault("preprocess", "crop")  # the only policy there was
    if version < 4:
        # "ivf<nlist>,nprobe<p>" named the parameters in the type: they become the kind and its parameters (the
        # same nprobe the file was saved with).
        if m := re.fullmatch(r"ivf(\d+),nprobe(\d+)", entry.get("index_type", "none")):
            entry["index_type"], entry["index_params"] = "ivf", {"nlist": int(m[1]), "nprobe": int(m[2])}
    if version < 5:
        old = {f: entry.pop(f) for f in _V4_INDEX_FIELDS if f in entry}
        backend = entry.setdefault("backend", "faiss")
        params = dict(old.get("index_params", {}))
        if backend == "milvus":
            entry["index"] = {"uri": old.get("backend_uri"), "collection": params.pop("collection", None),
                              "params": params, "count": old.get("count", 0)}
        elif old.get("index_file") is not None:
            entry["index"] = {"kind": old.get("index_type", "none"), "params": params, "recall": old.get("recall"),
                              "recall_target": old.get("recall_target"), "trained_count": old.get("trained_count", 0),
                              "count": old.get("count", 0), "file": old["index_file"],
                              "sha256": old.get("index_sha256"), "bytes": old.get("index_bytes", 0)}
        else:  # never built (an interrupted first `index`)
            entry["index"], entry["index_generation"] = {}, -1
    if version < 6 and entry.get("backend", "faiss") == "faiss" and entry.get("index"):
        entry["index"] = {**entry["index"], "ids": None, "deltas": []}
    return entry
