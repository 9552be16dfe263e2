"""`simsearch check`: verify a db end to end, and repair what can be rebuilt from the stored vectors.

Errors are damage (a file that does not match the manifest, ids that disagree, an unreadable
store); warnings are states a normal interruption leaves (an index older than the store, an index
never built) — `check` exits non-zero only for errors, and every finding says what to do.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lmdb

from simsearch.errors import DbCorruptError, SchemaError
from simsearch.indexer.store import REBUILD_HINT, Store
from simsearch.retrieval.backend import Finding, RefreshConfig, RefreshOutcome, backend_of, refresh
from simsearch.retrieval.index_plan import IndexConfig

log = logging.getLogger(__name__)


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
        for name, entry in store.manifest.encoders.items():
            found, index_facts = backend_of(entry).check(store, name, entry, known_ids)
            findings += found
            if index_facts is not None:
                facts["indexes"][name] = index_facts
    return findings, facts


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


def repair_db(root: str | Path, config: IndexConfig = IndexConfig(), wait: bool = True) -> list[tuple[str, RefreshOutcome]]:
    """Rebuild every encoder's index that is missing, damaged (every file's checksum verified) or stale, from the
    stored vectors, with the backend the db records for it: (encoder, what was done) for each that changed."""
    done = []
    with Store(root, wait=wait) as store:
        for name in list(store.manifest.encoders):
            outcome = refresh(store, name, RefreshConfig(config, verify=True))
            if outcome.changed:
                done.append((name, outcome))
    return done


def compact_db(root: str | Path, wait: bool = True) -> list[tuple[str, RefreshOutcome]]:
    """Bring every built index up to date and fold what updates left beside it into it (FAISS: the deltas into a new
    base), whatever their size: (encoder, what was done) for each."""
    with Store(root, wait=wait) as store:
        return [(name, refresh(store, name, RefreshConfig(compact=True)))
                for name, entry in list(store.manifest.encoders.items()) if entry.has_index]
