"""The embedded store's vector index as a derived cache of SQLite: restoring a tenant's index from its snapshot in
``vectors/<tenant id>/`` and catching it up, and dropping snapshots that are not from SQLite's history.

Catching up by row ids is sound only along one history (ids are never reused within it): "ids in SQLite, not in the
index" are exactly the rows to add, and the reverse the rows to tombstone. A snapshot from a write SQLite no longer
has is dropped and the index rebuilt from SQLite.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
from pathlib import Path

import numpy as np

from baton.store.embedded_sql import Version, batches, load_vectors, tenant_rowids
from baton.store.vector_index import IndexParams, TenantIndex

log = logging.getLogger(__name__)

_ROW_BATCH = 20_000


def restore_index(
    conn: sqlite3.Connection, folder: Path, tenant_id: int, version: Version, dim: int, params: IndexParams
) -> TenantIndex:
    """The tenant's index at SQLite's ``version``: its snapshot, caught up, or rebuilt from SQLite."""
    index = _snapshot(folder, tenant_id, version, dim, params)
    if (index.generation, index.stamp) != (version.generation, version.stamp):
        index = _catch_up(conn, index, tenant_id, params)
        index.generation, index.stamp = version.generation, version.stamp
    if index.wants_hnsw():
        index = index.rebuilt(hnsw=True)
    return index


def _snapshot(folder: Path, tenant_id: int, version: Version, dim: int, params: IndexParams) -> TenantIndex:
    """The tenant's snapshot if it can be trusted as a base for catching up, else an empty index.

    Catching up by row ids is sound only along one history: a snapshot from a write SQLite no longer has (newer
    generation, or the same generation with another stamp — SQLite restored from a backup, or rolled back by
    a power loss under ``durable=False``) may hold other vectors under reused ids, so it is dropped."""
    try:
        index = TenantIndex.load(folder, dim, params)
    except Exception:
        log.exception("vector snapshot of tenant %d unreadable; rebuilding it from SQLite", tenant_id)
        index = None
    if index is not None and (
        index.generation > version.generation
        or (index.generation == version.generation and index.stamp != version.stamp)
    ):
        log.warning("vector snapshot of tenant %d is not from SQLite's history; rebuilding it", tenant_id)
        index = None
    return index or TenantIndex(dim, params)


def _catch_up(conn: sqlite3.Connection, index: TenantIndex, tenant_id: int, params: IndexParams) -> TenantIndex:
    """Bring ``index`` to SQLite's rows: tombstone what SQLite no longer has, add what it gained."""
    current = tenant_rowids(conn, tenant_id)
    live = index.live_rowids()
    last = int(index.rowids[-1]) if index.size else 0
    if not np.isin(current[current <= last], live, assume_unique=True).all():
        log.warning("vector snapshot of tenant %d misses old rows; rebuilding it from SQLite", tenant_id)
        return _catch_up(conn, TenantIndex(index.dim, params), tenant_id, params)
    index.remove(np.setdiff1d(live, current, assume_unique=True))
    added = current[current > last]
    if not index.is_hnsw and index.live_count + added.size >= params.hnsw_threshold:
        index = index.rebuilt(hnsw=True)
    for part in batches(added, _ROW_BATCH):
        index.add(part, load_vectors(conn, part, index.dim))
    return index


def drop_foreign_snapshots(conn: sqlite3.Connection, vectors: Path) -> None:
    """At open, before any write: remove snapshots newer than SQLite (or of tenants it does not have). Were
    they kept, writes before the tenant's first search could bring SQLite to the same generation along another
    history, with reused row ids."""
    generations = dict(conn.execute("SELECT id, generation FROM tenants").fetchall())
    for folder in vectors.glob("*"):
        tenant_id = int(folder.name) if folder.name.isdigit() else None
        snapshot = TenantIndex.snapshot_generation(folder)
        if tenant_id not in generations or (snapshot is not None and snapshot > generations[tenant_id]):
            log.warning("removing vector snapshot %s: it is not from this store's history", folder)
            shutil.rmtree(folder, ignore_errors=True)
