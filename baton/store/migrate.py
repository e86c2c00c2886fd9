"""Copy an embedded store into Weaviate: vectors, texts and metadata as stored (no re-embedding), resumably.

The embedded store is opened first (its directory lock keeps a gateway from writing during the copy; its schema
version is checked), then read through a read-only SQLite connection: tenant by tenant, documents in document-id
order, ``documents_per_batch`` (200) at a time, each batch written with ``WeaviateStore.replace_documents`` — a replace,
so writing a document twice leaves it once. After each batch the cursor (tenant, last document id) goes to the
progress file; a re-run starts after it, and redoing the batch that was cut off is harmless. Finally every tenant is
verified: the same chunk count and the same document ids on both sides.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from baton.runtime.errors import FailedPrecondition, InvalidArgument
from baton.store.base import ChunkRecord
from baton.store.embedded import EmbeddedStore
from baton.store.weaviate import WeaviateStore

DOCUMENTS_PER_BATCH = 200


@dataclass
class Progress:
    """What is copied: finished tenants, and the last document copied of the current one."""

    finished: list[str] = field(default_factory=list)
    tenant: str | None = None
    after: str = ""
    chunks: int = 0

    @classmethod
    def load(cls, path: Path) -> Progress:
        return cls(**json.loads(path.read_text())) if path.exists() else cls()

    def save(self, path: Path) -> None:
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self)))
        temporary.replace(path)  # atomic: a kill leaves the old cursor or the new one


@dataclass(frozen=True)
class TenantCheck:
    tenant: str
    embedded_chunks: int
    weaviate_chunks: int
    missing_documents: int
    extra_documents: int

    @property
    def ok(self) -> bool:
        return self.embedded_chunks == self.weaviate_chunks and not self.missing_documents and not self.extra_documents


@dataclass(frozen=True)
class MigrationReport:
    chunks_copied: int
    checks: list[TenantCheck]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)


def migrate_to_weaviate(
    source: Path,
    target: WeaviateStore,
    progress_path: Path,
    *,
    on_batch: Callable[[str, int], None] | None = None,
    documents_per_batch: int = DOCUMENTS_PER_BATCH,
) -> MigrationReport:
    """Copy ``source`` (an embedded store directory) into ``target``; resumable through ``progress_path``."""
    if documents_per_batch < 1:
        raise InvalidArgument(f"documents per batch must be at least 1 (got {documents_per_batch})")
    if not (source / "store.sqlite").exists():
        raise FailedPrecondition(f"{source} holds no embedded store (no store.sqlite)", reason="NO_SOURCE_STORE")
    embedded = EmbeddedStore(source)  # the lock and the schema check
    try:
        with read_only(source / "store.sqlite") as conn:
            progress = Progress.load(progress_path)
            tenants = [name for (name,) in conn.execute("SELECT name FROM tenants ORDER BY name")]
            for tenant in tenants:
                if tenant in progress.finished:
                    continue
                if progress.tenant != tenant:
                    progress.tenant, progress.after = tenant, ""
                for documents in document_batches(conn, tenant, progress.after, documents_per_batch):
                    target.replace_documents(tenant, documents)
                    progress.after = max(documents)
                    progress.chunks += sum(len(chunks) for chunks in documents.values())
                    progress.save(progress_path)
                    if on_batch is not None:
                        on_batch(tenant, progress.chunks)
                progress.finished.append(tenant)
                progress.tenant, progress.after = None, ""
                progress.save(progress_path)
            checks = [_check(embedded, target, tenant) for tenant in tenants]
        return MigrationReport(progress.chunks, checks)
    finally:
        embedded.close()


def _check(embedded: EmbeddedStore, target: WeaviateStore, tenant: str) -> TenantCheck:
    source_documents, target_documents = embedded.document_ids(tenant), target.document_ids(tenant)
    return TenantCheck(
        tenant,
        embedded.count(tenant),
        target.count(tenant),
        len(source_documents - target_documents),
        len(target_documents - source_documents),
    )


class read_only:
    """A read-only SQLite connection to a store file, as a context manager: it takes no lock a running gateway
    holds (WAL readers go on beside its writes)."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def document_batches(
    conn: sqlite3.Connection, tenant: str, after: str, size: int
) -> Iterator[dict[str, list[ChunkRecord]]]:
    (tenant_id,) = conn.execute("SELECT id FROM tenants WHERE name = ?", (tenant,)).fetchone()
    while True:
        documents = [
            document_id
            for (document_id,) in conn.execute(
                "SELECT DISTINCT document_id FROM chunks WHERE tenant_id = ? AND document_id > ? "
                "ORDER BY document_id LIMIT ?",
                (tenant_id, after, size),
            )
        ]
        if not documents:
            return
        yield _chunks_of(conn, tenant_id, tenant, documents)
        after = documents[-1]


def _chunks_of(conn: sqlite3.Connection, tenant_id: int, tenant: str, documents: list[str]) -> dict[str, list]:
    marks = ",".join("?" * len(documents))
    rows = conn.execute(
        "SELECT c.document_id, c.chunk_id, c.metadata, b.text, b.vector "
        "FROM chunks c JOIN chunk_bodies b ON b.id = c.id "
        f"WHERE c.tenant_id = ? AND c.document_id IN ({marks}) ORDER BY c.id",
        [tenant_id, *documents],
    )
    chunks: dict[str, list[ChunkRecord]] = {document_id: [] for document_id in documents}
    for document_id, chunk_id, metadata, text, vector in rows:
        record = ChunkRecord(
            chunk_id, document_id, tenant, text, np.frombuffer(vector, dtype=np.float32), json.loads(metadata)
        )
        chunks[document_id].append(record)
    return chunks
