"""Durable scheduler state in SQLite (WAL): the epoch counter and the leases currently held.

The epoch is incremented and the lease row written in one transaction *before* the grant is sent, so after a
crash the restarted scheduler knows every lease that may still be in use and never reuses an epoch.
"""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from pathlib import Path

from baton.runtime.sqlite import Durability, open_database, transaction
from services.scheduler.model import LeaseKind, LeaseRef, LeaseSpec, StoredLease

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters (name, value) VALUES ('epoch', 0);
CREATE TABLE IF NOT EXISTS held_leases (
    lease_id            TEXT PRIMARY KEY,
    holder_id           TEXT NOT NULL UNIQUE,
    epoch               INTEGER NOT NULL UNIQUE,
    kind                INTEGER NOT NULL,
    priority            INTEGER NOT NULL,
    vram_bytes          INTEGER NOT NULL,
    exclusive           INTEGER NOT NULL,
    preemptible         INTEGER NOT NULL,
    expected_duration_s REAL NOT NULL,
    description         TEXT NOT NULL,
    granted_at_unix     REAL NOT NULL
);
"""


class LeaseStore:
    """SQLite-backed store. ``durability="FULL"`` survives power loss; ``NORMAL`` survives process crashes."""

    def __init__(self, path: Path, *, durability: Durability = "FULL") -> None:
        # One writer (the service's event loop); transactions are explicit BEGIN IMMEDIATE blocks.
        self._db = open_database(path, _SCHEMA, SCHEMA_VERSION, durability=durability)

    def current_epoch(self) -> int:
        return int(self._db.execute("SELECT value FROM counters WHERE name = 'epoch'").fetchone()[0])

    def grant(self, lease_id: str, spec: LeaseSpec, granted_at_unix: float) -> int:
        """Allocate the next epoch and record the lease as held, atomically. Returns the epoch."""
        with self._transaction():
            epoch = int(
                self._db.execute(
                    "UPDATE counters SET value = value + 1 WHERE name = 'epoch' RETURNING value"
                ).fetchone()[0]
            )
            self._db.execute(
                "INSERT INTO held_leases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    lease_id,
                    spec.holder_id,
                    epoch,
                    int(spec.kind),
                    spec.priority,
                    spec.vram_bytes,
                    int(spec.exclusive),
                    int(spec.preemptible),
                    spec.expected_duration_s,
                    spec.description,
                    granted_at_unix,
                ),
            )
        return epoch

    def delete(self, lease_id: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM held_leases WHERE lease_id = ?", (lease_id,))

    def held_leases(self) -> list[StoredLease]:
        rows = self._db.execute(
            "SELECT lease_id, epoch, holder_id, kind, priority, vram_bytes, exclusive, preemptible,"
            " expected_duration_s, description, granted_at_unix FROM held_leases ORDER BY epoch"
        ).fetchall()
        return [
            StoredLease(
                ref=LeaseRef(lease_id=row[0], epoch=row[1]),
                spec=LeaseSpec(
                    holder_id=row[2],
                    kind=LeaseKind(row[3]),
                    priority=row[4],
                    vram_bytes=row[5],
                    exclusive=bool(row[6]),
                    preemptible=bool(row[7]),
                    expected_duration_s=row[8],
                    description=row[9],
                ),
                granted_at_unix=row[10],
            )
            for row in rows
        ]

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._db)
