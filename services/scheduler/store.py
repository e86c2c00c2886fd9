"""Durable scheduler state in SQLite (WAL): the epoch counter, the leases currently held, and a day of lease
history (who held the GPU when: the web page's GPU timeline).

The epoch is incremented and the lease row written in one transaction *before* the grant is sent, so after a
crash the restarted scheduler knows every lease that may still be in use and never reuses an epoch.
"""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from pathlib import Path

from baton.runtime.sqlite import Durability, open_database, transaction
from services.scheduler.model import HeldInterval, LeaseKind, LeaseRef, LeaseSpec, StoredLease

SCHEMA_VERSION = 1  # lease_history was added beside the version-1 tables: older files simply gain it
HISTORY_KEPT_S = 24 * 3600.0

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
CREATE TABLE IF NOT EXISTS lease_history (
    epoch           INTEGER PRIMARY KEY,
    lease_id        TEXT NOT NULL,
    holder_id       TEXT NOT NULL,
    kind            INTEGER NOT NULL,
    vram_bytes      INTEGER NOT NULL,
    description     TEXT NOT NULL,
    granted_at_unix REAL NOT NULL,
    ended_at_unix   REAL,
    end_reason      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS lease_history_by_lease ON lease_history (lease_id);
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
            self._db.execute(
                "INSERT INTO lease_history (epoch, lease_id, holder_id, kind, vram_bytes, description,"
                " granted_at_unix) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (epoch, lease_id, spec.holder_id, int(spec.kind), spec.vram_bytes, spec.description, granted_at_unix),
            )
            # Pruned here, on the rare write, so the table stays a day long without a timer.
            self._db.execute("DELETE FROM lease_history WHERE ended_at_unix < ?", (granted_at_unix - HISTORY_KEPT_S,))
        return epoch

    def delete(self, lease_id: str, *, ended_at_unix: float, end_reason: str) -> None:
        """The lease is no longer held; its history row gets its end (released or revoked)."""
        with self._transaction():
            self._db.execute("DELETE FROM held_leases WHERE lease_id = ?", (lease_id,))
            self._db.execute(
                "UPDATE lease_history SET ended_at_unix = ?, end_reason = ? WHERE lease_id = ? AND ended_at_unix"
                " IS NULL",
                (ended_at_unix, end_reason, lease_id),
            )

    def history(self, since_unix: float) -> list[HeldInterval]:
        """Leases held at any time since ``since_unix`` (still held, or ended after it), oldest grant first."""
        rows = self._db.execute(
            "SELECT holder_id, kind, epoch, granted_at_unix, ended_at_unix, end_reason, vram_bytes, description"
            " FROM lease_history WHERE ended_at_unix IS NULL OR ended_at_unix >= ? ORDER BY epoch",
            (since_unix,),
        ).fetchall()
        return [
            HeldInterval(
                holder_id=row[0],
                kind=LeaseKind(row[1]),
                epoch=row[2],
                granted_at_unix=row[3],
                ended_at_unix=row[4],
                end_reason=row[5],
                vram_bytes=row[6],
                description=row[7],
            )
            for row in rows
        ]

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
