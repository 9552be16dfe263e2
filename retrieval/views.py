"""The one JSON form of each result type: a search hit, a duplicate group (and the whole `dupes` answer), the db's
info. `simsearch ... --json` prints these and the server sends them, so a client reads one shape from both.

Every value is a plain JSON type (dict, list, str, int, float, bool, None). Paths follow one rule: a stored path
may hold surrogate escapes (the bytes of a name that is not valid UTF-8), which a JSON encoder cannot write as
UTF-8, so `path` is the name with such bytes shown as `\\xe9` (always valid text), and `path_bytes`, present only
for such a name, is the base64 of its exact bytes.
"""

from __future__ import annotations

import base64
import os

from simsearch.indexer.lock import writer_active
from simsearch.indexer.scan import shown_path
from simsearch.indexer.store import Store
from simsearch.retrieval.backend import backend_of
from simsearch.retrieval.dupes import DEFAULT_THRESHOLD, TIERS, DupeGroup, DupeItem
from simsearch.retrieval.query import Term
from simsearch.retrieval.search import Hit


def path_fields(path: str, key: str = "path") -> dict:
    """{key: the path as text} plus {key + "_bytes": base64 of its bytes} when it is not valid UTF-8."""
    raw = os.fsencode(path)
    try:
        raw.decode("utf-8")
        return {key: path}
    except UnicodeDecodeError:
        return {key: shown_path(path), f"{key}_bytes": base64.b64encode(raw).decode()}


def hit_view(hit: Hit) -> dict:
    """rank (1-based), id, path, score (cosine), rerank_score (P(same) when reranked, else None)."""
    return {"rank": hit.rank, "id": hit.id, **path_fields(hit.path), "score": float(hit.score),
            "rerank_score": None if hit.rerank_score is None else float(hit.rerank_score)}


def term_view(term: Term) -> dict:
    """kind (image | text | item), value (an image's path, with value_bytes as `path_fields` says; the words; the
    item's id), weight (negative: subtracted)."""
    value = path_fields(term.value, "value") if term.kind == "image" else {"value": term.value}
    return {"kind": term.kind, **value, "weight": float(term.weight)}


def dupe_item_view(item: DupeItem) -> dict:
    """id, path, width and height (0 when the file is gone), bytes, score (cosine to the keeper), tier (how it is a
    duplicate of the keeper: exact | edited | similar; "keeper" for the keeper)."""
    return {"id": item.id, **path_fields(item.path), "width": item.width, "height": item.height, "bytes": item.bytes,
            "score": float(item.score), "tier": item.tier}


def dupe_group_view(group: DupeGroup) -> dict:
    """tier (its weakest link: exact | edited | similar), the suggested keeper first, the others, min_score."""
    return {"tier": group.tier, "keeper": dupe_item_view(group.keeper),
            "others": [dupe_item_view(o) for o in group.others], "min_score": float(group.min_score)}


def dupes_view(groups: list[DupeGroup], encoder: str, threshold: float | None, similar: bool | None = None) -> dict:
    """The answer of a duplicate search: its encoder, whether the similar tier was asked for (None: when a threshold
    was given, as `find_duplicates` decides) and its threshold (None: the calibrated default), totals (groups, per
    tier, images that could be removed keeping each group's keeper, their bytes) and the groups."""
    removable = [o for g in groups for o in g.others]
    return {"encoder": encoder, "threshold": DEFAULT_THRESHOLD if threshold is None else threshold,
            "similar": threshold is not None if similar is None else similar,
            "totals": {"groups": len(groups), "by_tier": {t: sum(g.tier == t for g in groups) for t in TIERS},
                       "removable_images": len(removable), "reclaimable_bytes": sum(o.bytes for o in removable)},
            "groups": [dupe_group_view(g) for g in groups]}


def db_info(store: Store, verify: bool = True) -> dict:
    """What the db holds: items, generation, default encoder, whether a writer is at work, size on disk, and per
    encoder its vectors and index (backend, kind, parameters, recall, up to date). verify: also read each index to
    name a problem (`index_problem`; a FAISS file's checksum reads the whole file): None when not verified."""
    generation = store.generation
    encoders = {}
    for name, e in store.manifest.encoders.items():
        s = backend_of(e).status(store, name, e, verify)
        encoders[name] = {"dim": e.dim, "preprocess": e.preprocess, "metric": e.metric, "weights": e.key,
                          "backend": s.backend, "index_type": s.kind, "index": s.description,
                          "index_params": s.params, "recall_at_10": s.recall, "recall_target": s.recall_target,
                          "vectors_in_index": s.count, "index_file": s.file, "backend_uri": s.uri,
                          "index_up_to_date": s.up_to_date, "index_problem": s.problem}
    return {**path_fields(str(store.root.absolute()), "db"), "schema_version": store.manifest.schema_version,
            "items": store.item_count(), "generation": generation, "default_encoder": store.manifest.default_encoder,
            "writer_active": writer_active(store.root), "size_on_disk_bytes": store.size_on_disk(),
            "encoders": encoders}
