"""The SQLite side of ``baton.store.embedded``: its tables, and the row-level statements on them.

Every function here runs on a connection the store hands it, inside whatever transaction the store has open; none
takes a lock or touches the vector index. Row ids (``chunks.id``) are never reused (AUTOINCREMENT), which is what
lets the vector index catch up from SQLite by diffing ids (``baton.store.embedded_snapshots``).
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from baton.runtime.errors import InvalidArgument
from baton.store import fts_bm25
from baton.store.base import Filters, MetadataValue
from baton.store.validation import checked_filter_key

SCHEMA_VERSION = "1"
_METADATA_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tenants (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    generation INTEGER NOT NULL DEFAULT 0,
    stamp INTEGER NOT NULL DEFAULT 0,
    chunk_count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id INTEGER NOT NULL REFERENCES tenants (id),
    document_id TEXT NOT NULL,
    chunk_id TEXT NOT NULL,
    metadata TEXT NOT NULL,
    UNIQUE (tenant_id, chunk_id)
);
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks (tenant_id, document_id);
CREATE TABLE IF NOT EXISTS chunk_bodies (id INTEGER PRIMARY KEY, text TEXT NOT NULL, vector BLOB NOT NULL);
"""

NO_IDS = np.empty(0, dtype=np.int64)


@dataclass(frozen=True)
class PreparedChunk:
    chunk_id: str
    text: str
    terms: str  # analysed, space-separated: what FTS5 indexes
    metadata_json: str
    vector: np.ndarray


@dataclass(frozen=True)
class Version:
    """A tenant's write counter and the random stamp of its last write."""

    generation: int
    stamp: int


@dataclass(frozen=True)
class Row:
    chunk_id: str
    document_id: str
    text: str
    metadata: dict[str, MetadataValue]


def existing_tenant(conn: sqlite3.Connection, tenant: str) -> int | None:
    row = conn.execute("SELECT id FROM tenants WHERE name = ?", (tenant,)).fetchone()
    return None if row is None else int(row[0])


def create_tenant(conn: sqlite3.Connection, tenant: str) -> int:
    tenant_id = int(conn.execute("INSERT INTO tenants (name) VALUES (?) RETURNING id", (tenant,)).fetchone()[0])
    fts_bm25.create_tables(conn, tenant_id)
    return tenant_id


def delete_rows(conn: sqlite3.Connection, tenant_id: int, document_id: str) -> np.ndarray:
    """Delete the document's rows; returns their ids."""
    rows = conn.execute(
        "SELECT id FROM chunks WHERE tenant_id = ? AND document_id = ? ORDER BY id", (tenant_id, document_id)
    ).fetchall()
    ids = [rowid for (rowid,) in rows]
    for part in batches(ids, 500):
        marks = ",".join("?" * len(part))
        conn.execute(f"DELETE FROM chunks WHERE id IN ({marks})", part)
        conn.execute(f"DELETE FROM chunk_bodies WHERE id IN ({marks})", part)
        conn.execute(f"DELETE FROM {fts_bm25.table_name(tenant_id)} WHERE rowid IN ({marks})", part)
    return np.asarray(ids, dtype=np.int64)


def insert_rows(
    conn: sqlite3.Connection, tenant_id: int, document_id: str, chunks: Sequence[PreparedChunk]
) -> np.ndarray:
    ids = []
    for chunk in chunks:
        (rowid,) = conn.execute(
            "INSERT INTO chunks (tenant_id, document_id, chunk_id, metadata) VALUES (?, ?, ?, ?) RETURNING id",
            (tenant_id, document_id, chunk.chunk_id, chunk.metadata_json),
        ).fetchone()
        ids.append(rowid)
    conn.executemany(
        "INSERT INTO chunk_bodies (id, text, vector) VALUES (?, ?, ?)",
        [(rowid, chunk.text, chunk.vector.tobytes()) for rowid, chunk in zip(ids, chunks, strict=True)],
    )
    conn.executemany(
        f"INSERT INTO {fts_bm25.table_name(tenant_id)} (rowid, terms) VALUES (?, ?)",
        [(rowid, chunk.terms) for rowid, chunk in zip(ids, chunks, strict=True)],
    )
    return np.asarray(ids, dtype=np.int64)


def bump_generation(conn: sqlite3.Connection, tenant_id: int, chunk_change: int) -> Version:
    row = conn.execute(
        "UPDATE tenants SET generation = generation + 1, stamp = ?, chunk_count = chunk_count + ? WHERE id = ? "
        "RETURNING generation, stamp",
        (secrets.randbits(62), int(chunk_change), tenant_id),
    ).fetchone()
    return Version(int(row[0]), int(row[1]))


def tenant_version(conn: sqlite3.Connection, tenant: str) -> tuple[int, Version] | None:
    """The tenant's id and its current version, None for a tenant the store does not have."""
    row = conn.execute("SELECT id, generation, stamp FROM tenants WHERE name = ?", (tenant,)).fetchone()
    return None if row is None else (int(row[0]), Version(int(row[1]), int(row[2])))


def tenant_rowids(conn: sqlite3.Connection, tenant_id: int) -> np.ndarray:
    """Every row id of the tenant, ascending."""
    rows = conn.execute("SELECT id FROM chunks WHERE tenant_id = ? ORDER BY id", (tenant_id,))
    return np.fromiter((row[0] for row in rows), dtype=np.int64)


def load_vectors(conn: sqlite3.Connection, rowids: np.ndarray, dim: int) -> np.ndarray:
    """The stored vectors of ``rowids`` (ascending, all present), one row each."""
    rows = conn.execute(
        "SELECT id, vector FROM chunk_bodies WHERE id BETWEEN ? AND ? ORDER BY id",
        (int(rowids[0]), int(rowids[-1])),
    ).fetchall()
    wanted = set(rowids.tolist())
    blobs = [blob for rowid, blob in rows if rowid in wanted]
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim)


def fetch_rows(conn: sqlite3.Connection, rowids: Sequence[int]) -> dict[int, Row]:
    rows: dict[int, Row] = {}
    for part in batches(list(rowids), 500):
        marks = ",".join("?" * len(part))
        for rowid, chunk_id, document_id, metadata, text in conn.execute(
            "SELECT c.id, c.chunk_id, c.document_id, c.metadata, b.text FROM chunks c "
            f"JOIN chunk_bodies b ON b.id = c.id WHERE c.id IN ({marks})",
            part,
        ):
            rows[rowid] = Row(chunk_id, document_id, text, json.loads(metadata))
    return rows


def json_path_sql(key: str) -> str:
    """The SQL expression of an indexed key; spelled the same everywhere so SQLite uses the expression index."""
    return f"json_extract(metadata, '$.{key}')"


def filter_clauses(filters: Filters, indexed: Sequence[str]) -> tuple[list[str], list[object]]:
    """SQL conditions on ``chunks`` for equality / any-of filters on ``document_id``, ``chunk_id`` or metadata."""
    clauses: list[str] = []
    params: list[object] = []
    for key, wanted in filters.items():
        values = [wanted] if isinstance(wanted, str | bytes | int | float | bool) else list(wanted)
        if not values:
            clauses.append("0")  # any-of an empty list matches nothing
            continue
        for value in values:
            if not isinstance(value, str | int | float | bool):
                raise InvalidArgument(f"filter {key!r}: {value!r} is not a string, number or boolean")
        if key in ("document_id", "chunk_id"):
            column = key
        elif key in indexed:
            column = json_path_sql(key)
        else:
            column = "json_extract(metadata, ?)"
            params.append(f'$."{checked_filter_key(key)}"')
        clauses.append(f"{column} IN ({','.join('?' * len(values))})")
        params.extend(int(value) if isinstance(value, bool) else value for value in values)
    return clauses, params


def checked_key(key: str) -> str:
    """An indexed metadata key, checked to be safe to spell into SQL."""
    if not _METADATA_KEY.match(key):
        raise ValueError(f"indexed metadata key {key!r}: use letters, digits and underscores")
    return key


def batches(items: Sequence | np.ndarray, size: int) -> Iterator:
    for start in range(0, len(items), size):
        yield items[start : start + size]
