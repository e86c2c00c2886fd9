"""The catalog: SQLite (WAL) is the source of truth for what has been ingested.

One row per document (per tenant and source). A document's chunks live in the vector store and are swapped
atomically there; the catalog row is written after the store, so a crash in between leaves a row that is stale
(old hash) or missing — the next run sees the difference and does the document again. Nothing is ever
half-searchable, and re-running an interrupted ingest converges to the same state as an uninterrupted one.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from baton.runtime.errors import NotFound
from baton.runtime.sqlite import open_database, transaction

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    document_id   TEXT NOT NULL,
    tenant        TEXT NOT NULL,
    source        TEXT NOT NULL,
    collection    TEXT NOT NULL,
    title         TEXT NOT NULL,
    format        TEXT NOT NULL,
    language      TEXT NOT NULL,
    file_hash     TEXT NOT NULL,
    content_hash  TEXT NOT NULL,
    size_bytes    INTEGER NOT NULL,
    chunk_count   INTEGER NOT NULL,
    duplicate_of  TEXT,
    metadata      TEXT NOT NULL DEFAULT '{}',
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    PRIMARY KEY (tenant, document_id),
    UNIQUE (tenant, source)
);
CREATE INDEX IF NOT EXISTS documents_by_hash ON documents (tenant, content_hash);
CREATE TABLE IF NOT EXISTS ingest_jobs (
    job_id      TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    root        TEXT NOT NULL,
    collection  TEXT NOT NULL,
    state       TEXT NOT NULL,
    report      TEXT NOT NULL DEFAULT '{}',
    error       TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
"""


@dataclass(frozen=True)
class DocumentRow:
    document_id: str
    tenant: str
    source: str
    collection: str
    title: str
    format: str
    language: str
    file_hash: str
    content_hash: str
    size_bytes: int
    chunk_count: int
    duplicate_of: str | None
    metadata: dict[str, str]
    created_at: float
    updated_at: float

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.document_id,
            "source": self.source,
            "collection": self.collection,
            "title": self.title,
            "format": self.format,
            "language": self.language,
            "content_hash": self.content_hash,
            "size_bytes": self.size_bytes,
            "chunks": self.chunk_count,
            "duplicate_of": self.duplicate_of,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


_COLUMNS = (
    "document_id, tenant, source, collection, title, format, language, file_hash, content_hash, size_bytes,"
    " chunk_count, duplicate_of, metadata, created_at, updated_at"
)


class Catalog:
    """Thread-safe: one connection guarded by a lock (writes are small; the heavy work happens elsewhere)."""

    def __init__(self, path: Path) -> None:
        self._db = open_database(path, _SCHEMA, SCHEMA_VERSION)  # WAL + NORMAL: durable across process crashes
        self._lock = threading.RLock()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._db, self._lock)

    # ---------------------------------------------------------------------------------------------- documents

    def get(self, tenant: str, document_id: str) -> DocumentRow:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM documents WHERE tenant = ? AND document_id = ?", (tenant, document_id)
            ).fetchone()
        if row is None:
            raise NotFound(f"no document {document_id!r}; list them with GET /v1/documents", reason="NO_DOCUMENT")
        return _row(row)

    def by_source(self, tenant: str, source: str) -> DocumentRow | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM documents WHERE tenant = ? AND source = ?", (tenant, source)
            ).fetchone()
        return _row(row) if row else None

    def first_with_content(self, tenant: str, content_hash: str, excluding: str) -> DocumentRow | None:
        """An indexed document of the tenant with this exact content (for dedup), other than ``excluding``."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM documents WHERE tenant = ? AND content_hash = ? AND document_id != ?"
                " AND duplicate_of IS NULL ORDER BY created_at LIMIT 1",
                (tenant, content_hash, excluding),
            ).fetchone()
        return _row(row) if row else None

    def sources_under(self, tenant: str, prefix: str) -> dict[str, str]:
        """source → document_id for every document whose source starts with ``prefix``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT source, document_id FROM documents WHERE tenant = ? AND substr(source, 1, ?) = ?",
                (tenant, len(prefix), prefix),
            ).fetchall()
        return dict(rows)

    def list(self, tenant: str, *, limit: int = 100, offset: int = 0) -> tuple[list[DocumentRow], int]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM documents WHERE tenant = ? ORDER BY source LIMIT ? OFFSET ?",
                (tenant, limit, offset),
            ).fetchall()
            total = self._db.execute("SELECT count(*) FROM documents WHERE tenant = ?", (tenant,)).fetchone()[0]
        return [_row(r) for r in rows], int(total)

    def upsert(self, row: DocumentRow) -> None:
        with self._transaction() as db:
            db.execute(
                f"INSERT INTO documents ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (tenant, document_id) DO UPDATE SET source = excluded.source,"
                " collection = excluded.collection, title = excluded.title, format = excluded.format,"
                " language = excluded.language, file_hash = excluded.file_hash,"
                " content_hash = excluded.content_hash, size_bytes = excluded.size_bytes,"
                " chunk_count = excluded.chunk_count, duplicate_of = excluded.duplicate_of,"
                " metadata = excluded.metadata, updated_at = excluded.updated_at",
                (
                    row.document_id,
                    row.tenant,
                    row.source,
                    row.collection,
                    row.title,
                    row.format,
                    row.language,
                    row.file_hash,
                    row.content_hash,
                    row.size_bytes,
                    row.chunk_count,
                    row.duplicate_of,
                    json.dumps(row.metadata, ensure_ascii=False),
                    row.created_at,
                    row.updated_at,
                ),
            )

    def delete(self, tenant: str, document_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM documents WHERE tenant = ? AND document_id = ?", (tenant, document_id))

    def count(self, tenant: str) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM documents WHERE tenant = ?", (tenant,)).fetchone()[0])

    # ---------------------------------------------------------------------------------------------- ingest jobs

    def create_job(self, job_id: str, tenant: str, root: str, collection: str) -> None:
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO ingest_jobs (job_id, tenant, root, collection, state, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, 'running', ?, ?)",
                (job_id, tenant, root, collection, now, now),
            )

    def update_job(self, job_id: str, *, state: str, report: dict[str, object], error: str | None = None) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE ingest_jobs SET state = ?, report = ?, error = ?, updated_at = ? WHERE job_id = ?",
                (state, json.dumps(report, ensure_ascii=False), error, time.time(), job_id),
            )

    def get_job(self, tenant: str, job_id: str) -> dict[str, object]:
        with self._lock:
            row = self._db.execute(
                "SELECT job_id, root, collection, state, report, error, created_at, updated_at FROM ingest_jobs"
                " WHERE tenant = ? AND job_id = ?",
                (tenant, job_id),
            ).fetchone()
        if row is None:
            raise NotFound(f"no ingest job {job_id!r}", reason="NO_INGEST_JOB")
        keys = ("id", "root", "collection", "state", "report", "error", "created_at", "updated_at")
        job = dict(zip(keys, row, strict=True))
        job["report"] = json.loads(str(job["report"]))
        return job

    def interrupt_running_jobs(self) -> int:
        """At start-up: jobs left 'running' by a crashed gateway are marked interrupted (re-run to resume)."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE ingest_jobs SET state = 'interrupted', error = 'the gateway stopped during this ingest;"
                " run it again to resume', updated_at = ? WHERE state = 'running'",
                (time.time(),),
            )
            return cursor.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _row(row: tuple) -> DocumentRow:
    values = list(row)
    values[12] = json.loads(values[12])
    return DocumentRow(*values)
