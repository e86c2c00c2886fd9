"""The ingest pipeline: files → parse → clean → dedup → chunk by tokens → embed → store, incrementally.

Per document, in this order: (1) skip it if its bytes are unchanged since the catalog saw them; (2) parse and
clean; (3) if another document of the tenant has the same cleaned content, record it as a duplicate and index
nothing; (4) chunk with the embedder's tokenizer, embed, and swap the document's chunks in the store atomically;
(5) write the catalog row. A crash between (4) and (5) only means the next run redoes the document. Documents are
processed a few at a time so that the embedder's dynamic batcher can merge their chunks into full batches.

With a ``texts_dir`` (BATON_HOME/texts), each document's cleaned text is also kept there as ``<content_hash>.txt``
before its catalog row is written, so the trainer can train on exactly the text that was indexed. The files are
content-addressed (written once, atomically; duplicates share one) and are never rewritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from baton.clients.embedder import InputType
from baton.runtime.errors import BatonError, PayloadTooLarge
from baton.runtime.logging import log_event
from baton.store.analysis import detect_language
from baton.store.base import ChunkRecord, MetadataValue, VectorStore
from services.gateway import metrics
from services.gateway.catalog import Catalog, DocumentRow
from services.gateway.ingest.chunker import ResolvedChunking, chunk_document
from services.gateway.ingest.clean import clean_text, content_hash
from services.gateway.ingest.parsers import SUPPORTED_FORMATS, parse_document
from services.gateway.ingest.types import Chunk, ParsedDocument, Section, Tokenizer

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = frozenset(SUPPORTED_FORMATS)


class Embedder(Protocol):
    async def embed(self, texts: Sequence[str], *, input_type: InputType | None = None) -> np.ndarray:
        """Vectors of ``texts``; ``input_type`` says which side of retrieval they are (chunks: "passage")."""
        ...


@dataclass(frozen=True)
class IngestItem:
    """One file to ingest: an upload (``data`` given) or a file on the server (``path`` given)."""

    source: str
    filename: str
    data: bytes | None = None
    path: Path | None = None


@dataclass
class DocumentOutcome:
    source: str
    status: str  # added | updated | unchanged | duplicate | deleted | failed
    document_id: str | None = None
    chunks: int = 0
    error: BatonError | None = None

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"source": self.source, "status": self.status, "chunks": self.chunks}
        if self.document_id:
            body["id"] = self.document_id
        if self.error is not None:
            body["error"] = self.error.to_json()
        return body


@dataclass
class IngestReport:
    outcomes: list[DocumentOutcome] = field(default_factory=list)
    started_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    embed_s: float = 0.0
    total: int = 0

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def chunks(self) -> int:
        return sum(o.chunks for o in self.outcomes if o.status in ("added", "updated"))

    def to_json(self) -> dict[str, object]:
        elapsed = (self.finished_at or time.monotonic()) - self.started_at
        statuses = ("added", "updated", "unchanged", "duplicate", "deleted", "failed")
        return {
            "total": self.total,
            "done": len(self.outcomes),
            **{status: self.count(status) for status in statuses},
            "chunks": self.chunks,
            "elapsed_s": round(elapsed, 3),
            "embed_s": round(self.embed_s, 3),
            "documents": [o.to_json() for o in self.outcomes],
        }


ProgressCallback = Callable[[IngestReport], None]


@dataclass(frozen=True)
class IngestLimits:
    max_document_bytes: int = 100 * 1024 * 1024
    concurrency: int = 4


class IngestPipeline:
    def __init__(
        self,
        catalog: Catalog,
        store: VectorStore,
        embedder: Embedder,
        tokenizer: Tokenizer,
        chunking: ResolvedChunking,
        limits: IngestLimits = IngestLimits(),
        texts_dir: Path | None = None,
    ) -> None:
        self._catalog = catalog
        self._store = store
        self._embedder = embedder
        self._tokenizer = tokenizer
        self._chunking = chunking
        self._limits = limits
        self._texts_dir = texts_dir
        self._content_locks = KeyedLocks()

    async def ingest(
        self, tenant: str, collection: str, items: Sequence[IngestItem], progress: ProgressCallback | None = None
    ) -> IngestReport:
        """Ingest ``items``; documents not among them are left alone."""
        report = IngestReport(total=len(items))
        gate = asyncio.Semaphore(self._limits.concurrency)
        metrics.INGEST_PENDING.inc(len(items))

        async def one(item: IngestItem) -> None:
            try:
                async with gate:
                    outcome = await self._ingest_one(tenant, collection, item, report)
            finally:
                metrics.INGEST_PENDING.dec()
            report.outcomes.append(outcome)
            metrics.count_ingested(outcome.status, outcome.chunks if outcome.status in ("added", "updated") else 0)
            if progress is not None:
                progress(report)

        await asyncio.gather(*(one(item) for item in items))
        report.finished_at = time.monotonic()
        return report

    async def ingest_folder(
        self, tenant: str, collection: str, root: Path, progress: ProgressCallback | None = None
    ) -> IngestReport:
        """Make the tenant's documents under ``root`` match the folder: add, update, and delete removed files."""
        files = await asyncio.to_thread(list_supported_files, root)
        items = [IngestItem(source=str(path), filename=path.name, path=path) for path in files]
        report = await self.ingest(tenant, collection, items, progress)
        present = {item.source for item in items}
        prefix = str(root) + os.sep
        for source, document_id in self._catalog.sources_under(tenant, prefix).items():
            if source not in present:
                await self.delete_document(tenant, document_id)
                report.outcomes.append(DocumentOutcome(source, "deleted", document_id))
                metrics.count_ingested("deleted", 0)
        report.finished_at = time.monotonic()
        log_event(log, "ingest.folder_done", tenant=tenant, root=root, **_counts(report))
        return report

    async def delete_document(self, tenant: str, document_id: str) -> None:
        self._catalog.get(tenant, document_id)  # NotFound for unknown (or another tenant's) documents
        await asyncio.to_thread(self._store.delete_document, tenant, document_id)
        self._catalog.delete(tenant, document_id)
        log_event(log, "ingest.deleted", tenant=tenant, document_id=document_id)

    # ------------------------------------------------------------------------------------------------ one document

    async def _ingest_one(
        self, tenant: str, collection: str, item: IngestItem, report: IngestReport
    ) -> DocumentOutcome:
        try:
            return await self._index(tenant, collection, item, report)
        except BatonError as error:
            log_event(log, "ingest.failed", level=logging.WARNING, source=item.source, reason=error.reason)
            return DocumentOutcome(item.source, "failed", error=error)

    async def _index(self, tenant: str, collection: str, item: IngestItem, report: IngestReport) -> DocumentOutcome:
        data = item.data if item.data is not None else await asyncio.to_thread(self._read, item)
        file_hash = hashlib.sha256(data).hexdigest()
        existing = self._catalog.by_source(tenant, item.source)
        if existing is not None and existing.file_hash == file_hash and existing.collection == collection:
            if self._texts_dir is not None and not text_path(self._texts_dir, existing.content_hash).is_file():
                # Indexed before texts were kept: parse once more for the trainer, without indexing again.
                parsed = await asyncio.to_thread(self._parse, data, item.filename)
                await asyncio.to_thread(keep_text, self._texts_dir, parsed.text)
            return DocumentOutcome(item.source, "unchanged", existing.document_id, existing.chunk_count)
        document = await asyncio.to_thread(self._parse, data, item.filename)
        text_hash = content_hash(document.text)
        if self._texts_dir is not None:
            await asyncio.to_thread(keep_text, self._texts_dir, document.text)
        # Two copies of one text in the same run must not both pass the duplicate check: one at a time per hash.
        async with self._content_locks.hold((tenant, text_hash)):
            return await self._index_parsed(tenant, collection, item, report, existing, document, file_hash, text_hash)

    async def _index_parsed(
        self,
        tenant: str,
        collection: str,
        item: IngestItem,
        report: IngestReport,
        existing: DocumentRow | None,
        document: ParsedDocument,
        file_hash: str,
        text_hash: str,
    ) -> DocumentOutcome:
        document_id = existing.document_id if existing else stable_document_id(tenant, item.source)
        original = self._catalog.first_with_content(tenant, text_hash, excluding=document_id)
        row = _catalog_row(tenant, document_id, item, collection, document, file_hash, text_hash, existing)
        if original is not None:
            await asyncio.to_thread(self._store.delete_document, tenant, document_id)
            self._catalog.upsert(_as_duplicate(row, original.document_id))
            return DocumentOutcome(item.source, "duplicate", document_id)
        chunks = await chunk_document(document, self._tokenizer, self._chunking)
        started = time.monotonic()
        texts = [chunk.text for chunk in chunks]
        vectors = await self._embedder.embed(texts, input_type="passage") if chunks else np.zeros((0, 0))
        report.embed_s += time.monotonic() - started
        records = [
            _record(tenant, document_id, row, chunk, vector) for chunk, vector in zip(chunks, vectors, strict=True)
        ]
        await asyncio.to_thread(self._store.replace_document, tenant, document_id, records)
        self._catalog.upsert(_with_chunks(row, len(records)))
        status = "updated" if existing else "added"
        log_event(log, f"ingest.{status}", source=item.source, document_id=document_id, chunks=len(records))
        return DocumentOutcome(item.source, status, document_id, len(records))

    def _read(self, item: IngestItem) -> bytes:
        assert item.path is not None
        size = item.path.stat().st_size
        if size > self._limits.max_document_bytes:
            raise _too_large(item.filename, size, self._limits.max_document_bytes)
        return item.path.read_bytes()

    def _parse(self, data: bytes, filename: str) -> ParsedDocument:
        if len(data) > self._limits.max_document_bytes:
            raise _too_large(filename, len(data), self._limits.max_document_bytes)
        parsed = parse_document(data, filename, max_bytes=self._limits.max_document_bytes)
        sections = [Section(clean_text(s.text), s.heading_path, s.page) for s in parsed.sections]
        sections = [s for s in sections if s.text.strip()]
        return ParsedDocument(parsed.title, sections, parsed.format, parsed.metadata)


class KeyedLocks:
    """One asyncio lock per key, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[object, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: object) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


def list_supported_files(root: Path) -> list[Path]:
    """Supported files under ``root``, sorted, skipping hidden entries and links that lead outside ``root``."""
    found: list[Path] = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(directory) / name
            if name.startswith(".") or path.suffix.lower() not in SUPPORTED_SUFFIXES:
                continue
            resolved = path.resolve()
            if not resolved.is_file() or not resolved.is_relative_to(root):
                continue
            found.append(path)
    return found


def text_path(texts_dir: Path, text_hash: str) -> Path:
    return texts_dir / f"{text_hash}.txt"


def keep_text(texts_dir: Path, text: str) -> Path:
    """Store cleaned ``text`` as ``<content_hash>.txt`` (written aside, then renamed); an existing file is kept,
    since the same name means the same content."""
    path = text_path(texts_dir, content_hash(text))
    if path.is_file():
        return path
    texts_dir.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        staging.write_bytes(text.encode("utf-8"))
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path


def stable_document_id(tenant: str, source: str) -> str:
    """Same tenant and source → same id, so re-ingests replace rather than duplicate."""
    return hashlib.sha256(f"{tenant}\0{source}".encode()).hexdigest()[:24]


def _too_large(filename: str, size: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"{filename} is {size / 1e6:.1f} MB, over the {limit / 1e6:.0f} MB limit per document; split it or raise "
        "BATON_GATEWAY_MAX_DOCUMENT_BYTES",
        reason="DOCUMENT_TOO_LARGE",
        metadata={"size_bytes": str(size), "limit_bytes": str(limit)},
    )


def _catalog_row(
    tenant: str,
    document_id: str,
    item: IngestItem,
    collection: str,
    document: ParsedDocument,
    file_hash: str,
    text_hash: str,
    existing: DocumentRow | None,
) -> DocumentRow:
    now = time.time()
    return DocumentRow(
        document_id=document_id,
        tenant=tenant,
        source=item.source,
        collection=collection,
        title=document.title,
        format=document.format,
        language=detect_language(document.text[:20_000]),
        file_hash=file_hash,
        content_hash=text_hash,
        size_bytes=len(document.text.encode()),
        chunk_count=0,
        duplicate_of=None,
        metadata={"filename": item.filename},
        created_at=existing.created_at if existing else now,
        updated_at=now,
    )


def _with_chunks(row: DocumentRow, chunks: int) -> DocumentRow:
    return dataclasses.replace(row, chunk_count=chunks)


def _as_duplicate(row: DocumentRow, original_id: str) -> DocumentRow:
    return dataclasses.replace(row, duplicate_of=original_id, chunk_count=0)


def _record(tenant: str, document_id: str, row: DocumentRow, chunk: Chunk, vector: np.ndarray) -> ChunkRecord:
    metadata: dict[str, MetadataValue] = {
        "title": row.title,
        "heading": " > ".join(_below_title(chunk.heading_path, row.title)),
        "source": row.source,
        "filename": row.metadata.get("filename", ""),
        "collection": row.collection,
        "language": row.language,
        "format": row.format,
        "chunk_index": chunk.index,
        "token_count": chunk.token_count,
        "section_index": chunk.section_index,
        "start": chunk.start,
        "end": chunk.end,
    }
    if chunk.page is not None:
        metadata["page"] = chunk.page
    return ChunkRecord(
        chunk_id=f"{document_id}:{chunk.index}",
        document_id=document_id,
        tenant=tenant,
        text=chunk.text,
        vector=np.asarray(vector, dtype=np.float32),
        metadata=metadata,
    )


def _below_title(path: tuple[str, ...], title: str) -> tuple[str, ...]:
    """The heading path without a leading heading that is the title itself (a markdown '# Title')."""
    return path[1:] if path and path[0].strip() == title.strip() else path


def _counts(report: IngestReport) -> dict[str, int]:
    return {s: report.count(s) for s in ("added", "updated", "unchanged", "duplicate", "deleted", "failed")}
