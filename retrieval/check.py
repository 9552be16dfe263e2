"""`simsearch check`: verify a db end to end, and repair what can be rebuilt from the stored vectors.

Errors are damage (a file that does not match the manifest, ids that disagree, an unreadable
store); warnings are states a normal interruption leaves (an index older than the store, an index
never built) — `check` exits non-zero only for errors, and every finding says what to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import lmdb

from simsearch.devices import Device
from simsearch.errors import DbCorruptError, SchemaError, SimsearchError
from simsearch.indexer.manifest import EncoderEntry
from simsearch.indexer.store import REBUILD_HINT, Store
from simsearch.retrieval.faiss_index import REPAIR_HINT, IndexConfig, index_ids, load_index, refresh_index
from simsearch.retrieval.milvus_backend import mirror_count, sync_milvus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finding:
    level: str  # "error" | "warning"
    message: str  # one line: what is wrong, then what to do


def check_db(root: str | Path) -> tuple[list[Finding], dict]:
    """(findings, facts): facts are the counts that were verified (items, ids, vectors per index)."""
    try:
        store = Store(root, readonly=True)
    except (DbCorruptError, SchemaError) as e:
        return [Finding("error", str(e))], {}
    with store:
        findings: list[Finding] = []
        facts: dict = {"items": 0, "removed_pending": 0, "indexes": {}}
        try:
            known_ids = _check_items(store, findings, facts)
        except (lmdb.Error, ValueError, KeyError) as e:
            return findings + [Finding("error", f"{store.root / 'store.lmdb'}: unreadable ({e}); {REBUILD_HINT}")], facts
        generation = store.generation
        for name, entry in store.manifest.encoders.items():
            if entry.backend == "milvus":
                findings += _check_mirror(store, name, entry, generation, facts)
                continue
            if entry.index_file is None:
                findings.append(Finding("warning", f"the index of {name} was never built (an interrupted first "
                                                   f"`index`?): {REPAIR_HINT}"))
                continue
            try:  # one read of the file: verified against the manifest's sha256, then deserialized
                index = load_index(store, name, Device.cpu)[0].cpu_index
            except DbCorruptError as e:
                findings.append(Finding("error", str(e)))
                continue
            ids = index_ids(index)
            facts["indexes"][name] = {"vectors": len(ids), "file": entry.index_file}
            if len(ids) != entry.count or index.d != entry.dim:
                findings.append(Finding("error", f"{store.index_file(entry)}: holds {len(ids)} vectors of {index.d} "
                                                 f"dimensions, the manifest says {entry.count} of {entry.dim}; {REPAIR_HINT}"))
            elif entry.index_generation != generation:
                unknown = set(ids.tolist()) - known_ids
                if unknown:
                    findings.append(Finding("error", f"the index of {name} returns {len(unknown)} ids the store does not "
                                                     f"know; {REPAIR_HINT}"))
                else:
                    findings.append(Finding("warning", f"the index of {name} is older than the store (an interrupted or "
                                                       f"running `index`): {REPAIR_HINT}"))
            else:
                expected = {int(i) for block, _ in store.iter_vector_blocks(entry.key, entry.dim) for i in block}
                got = set(ids.tolist())
                if got != expected:
                    findings.append(Finding("error", f"the index of {name} holds {len(got - expected)} ids without a "
                                                     f"stored vector and misses {len(expected - got)}; {REPAIR_HINT}"))
    return findings, facts


def _check_mirror(store: Store, name: str, entry: EncoderEntry, generation: int, facts: dict) -> list[Finding]:
    """A Milvus-backed encoder has no index file: its collection must exist and hold what the manifest and the
    store say (counts; Milvus is not asked for every id)."""
    try:
        count = mirror_count(store, entry)
    except SimsearchError as e:
        return [Finding("error", str(e))]
    collection = f"the Milvus collection {entry.index_params.get('collection')} of {name} at {entry.backend_uri}"
    if count is None:
        return [Finding("error", f"{collection} is missing; {REPAIR_HINT}")]
    facts["indexes"][name] = {"vectors": count, "backend": "milvus", "uri": entry.backend_uri}
    if count != entry.count:
        return [Finding("error", f"{collection} holds {count} vectors, the manifest says {entry.count}; {REPAIR_HINT}")]
    if entry.index_generation != generation:
        return [Finding("warning", f"{collection} is older than the store (an interrupted or running `index`): "
                                   f"{REPAIR_HINT}")]
    expected = store.vector_count(entry.key)
    if count != expected:
        return [Finding("error", f"{collection} holds {count} vectors, the store {expected}; {REPAIR_HINT}")]
    return []


def _check_items(store: Store, findings: list[Finding], facts: dict) -> set[int]:
    """Items and the id table agree both ways; returns every id the store can resolve (tombstones included)."""
    by_id = {}
    for path, rec in store.iter_items():
        by_id[rec.id] = path
    known = set()
    for item_id, path, is_live in store.iter_ids():
        known.add(item_id)
        if is_live:
            if by_id.get(item_id) != path:
                findings.append(Finding("error", f"{path}: the id table and the items disagree (id {item_id}); {REBUILD_HINT}"))
        else:
            facts["removed_pending"] += 1
    missing = set(by_id) - known
    if missing:
        findings.append(Finding("error", f"{len(missing)} items have no entry in the id table; {REBUILD_HINT}"))
    facts["items"] = len(by_id)
    return known


def refresh_encoder(store: Store, name: str, config: IndexConfig = IndexConfig()) -> str | None:
    """Bring an encoder's index (FAISS file or Milvus mirror, as the manifest says) up to date with the store."""
    if store.manifest.encoders[name].backend == "milvus":
        return sync_milvus(store, name)
    return refresh_index(store, name, config)


def repair_db(root: str | Path, config: IndexConfig = IndexConfig(), wait: bool = True) -> list[str]:
    """Rebuild every encoder's index (or Milvus mirror) that is missing, damaged or stale, from the stored vectors."""
    done = []
    with Store(root, wait=wait) as store:
        for name in list(store.manifest.encoders):
            if outcome := refresh_encoder(store, name, config):
                done.append(f"the index of {name}: {outcome} ({store.manifest.encoders[name].count} vectors)")
    return done


