"""The embedded vector store: SQLite (WAL) as the source of truth, FTS5 for BM25, FAISS for vectors.

Layout of ``path/``:

- ``store.sqlite``: ``tenants`` (a write counter and the random stamp of the last write each), ``chunks`` (narrow
  rows: ids and metadata JSON, so filters scan little), ``chunk_bodies`` (text and the float32 vector), and one FTS5
  table per tenant over the *analysed* text (``baton.store.analysis``: stemmed Russian and English; FTS5's own
  tokenizers do not stem Russian), so BM25 statistics are per tenant and a query never touches another's postings.
- ``vectors/<tenant id>/``: a snapshot of the tenant's vector index (``baton.store.vector_index``), a derived
  cache. On first use it is checked against SQLite: same generation and stamp → used as is; older → caught up by
  diffing row ids (ids are never reused, so "ids in SQLite, not in the index" are exactly the rows to add, and the
  reverse the rows to tombstone); unreadable, or not from SQLite's history → rebuilt from SQLite.
- ``LOCK``: one process at a time (``flock``; the kernel drops it when the process dies, even by kill -9).

Writes are per document and atomic: ``replace_document`` deletes the old chunks and inserts the new ones in one
SQLite transaction, and the loaded vector index is updated under the same exclusive lock as the COMMIT, so a reader
sees the old or the new document, never a mix, and never a deleted chunk. One writer at a time (a mutex); readers
run concurrently (a readers-writer lock; one SQLite connection per reading thread).

Why this design (benchmarks/bench_retrieval.py, 1 M chunks × 384-d, this 2-core machine): SQLite gives crash-safe
atomic multi-table writes and SQL filters for free; FTS5 gives BM25 over pre-stemmed terms; FAISS HNSW (M 32,
efConstruction 200, efSearch 128) answers a vector query in p50 0.7 ms / p99 1.4 ms at recall@10 0.997 against
exact search (p50 309 ms), where LanceDB's IVF_HNSW_SQ measured p99 11–16 ms at recall 0.84 (../shared/FACTS.md).
The cost is BM25 at that size: p50 28 ms, p99 0.54 s (FTS5 scores every row holding a query term).

This module is the store itself: its locks and transactions, keeping the loaded index in step with each COMMIT, and
search. The SQLite tables and row statements are ``baton.store.embedded_sql``; restoring a tenant's index from its
snapshot and SQLite is ``baton.store.embedded_snapshots``; the two locks are ``baton.store.locks``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from baton.runtime.errors import FailedPrecondition, InvalidArgument, Unavailable
from baton.store import fts_bm25
from baton.store.analysis import detect_language, index_text, query_terms
from baton.store.base import ChunkRecord, Filters, Hit, LexicalCandidates, SearchMode, StoreQuery
from baton.store.embedded_snapshots import drop_foreign_snapshots, restore_index
from baton.store.embedded_sql import (
    NO_IDS,
    SCHEMA,
    SCHEMA_VERSION,
    PreparedChunk,
    Version,
    bump_generation,
    checked_key,
    create_tenant,
    delete_rows,
    existing_tenant,
    fetch_rows,
    filter_clauses,
    insert_rows,
    json_path_sql,
    tenant_version,
)
from baton.store.fusion import HYBRID_CANDIDATE_DEPTH, FusionMethod, choose_vector_weight, fuse, language_covered
from baton.store.locks import ReadWriteLock, acquire_directory_lock
from baton.store.validation import (
    check_chunks,
    check_dimensions,
    check_name,
    check_query,
    metadata_json,
    query_vector,
    unit_vector,
)
from baton.store.vector_index import IndexParams, TenantIndex, VectorHits

log = logging.getLogger(__name__)

DEFAULT_INDEXED_METADATA = ("collection", "source", "language")
# A snapshot is written after this many index changes (or a quarter of the index, if more), and on close.
SNAPSHOT_MIN_CHANGES = 20_000


@dataclass(frozen=True)
class _Filter:
    """A resolved metadata filter: the rows it allows (sorted), and the SQL that selects them, for FTS5."""

    rowids: np.ndarray
    rows: fts_bm25.RowFilter


class EmbeddedStore:
    """``VectorStore`` in one directory, no server. See the module docstring for the layout and guarantees.

    ``index_params`` tunes the vector index (exact below ``hnsw_threshold`` live vectors per tenant, HNSW above);
    ``indexed_metadata`` names metadata keys that get an SQLite index for fast filters (any key can be filtered);
    ``durable=False`` trades the fsync per write (``synchronous=FULL``) for ``NORMAL``, which still survives a
    killed process but may lose the last writes on power loss.
    """

    def __init__(
        self,
        path: Path,
        *,
        index_params: IndexParams | None = None,
        indexed_metadata: Sequence[str] = DEFAULT_INDEXED_METADATA,
        durable: bool = True,
    ) -> None:
        self.path = Path(path)
        self.params = index_params or IndexParams()
        self._durable = durable
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_file = acquire_directory_lock(self.path / "LOCK")
        self._writer = threading.Lock()
        self._rw = ReadWriteLock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._indexes: dict[str, TenantIndex] = {}
        self._tenant_ids: dict[str, int] = {}
        self._frequencies = fts_bm25.FrequencyCache()
        self._closed = False
        self._indexed_metadata = tuple(checked_key(key) for key in indexed_metadata)
        self._conn = self._connect()
        self._create_schema()
        self._dim = self._stored_dim()
        drop_foreign_snapshots(self._conn, self.path / "vectors")

    # --- VectorStore ---------------------------------------------------------------------------------------------

    def replace_document(self, tenant: str, document_id: str, chunks: Sequence[ChunkRecord]) -> None:
        self._check_open()
        prepared = self._prepare(tenant, document_id, chunks)
        if not prepared:
            self.delete_document(tenant, document_id)
            return
        with self._writer:
            self._check_open()
            with self._transaction() as conn:
                tenant_id = self._tenant_for_write(conn, tenant)
                self._ensure_dim(conn, prepared[0].vector.size)
                removed = delete_rows(conn, tenant_id, document_id)
                added = insert_rows(conn, tenant_id, document_id, prepared)
                version = bump_generation(conn, tenant_id, added.size - removed.size)
                vectors = np.stack([chunk.vector for chunk in prepared])
                self._commit_and_apply(conn, tenant, removed, added, vectors, version)
            self._tenant_ids[tenant] = tenant_id
            self._maintain(tenant)

    def delete_document(self, tenant: str, document_id: str) -> int:
        self._check_open()
        check_name("tenant", tenant)
        check_name("document_id", document_id)
        with self._writer:
            self._check_open()
            with self._transaction() as conn:
                tenant_id = existing_tenant(conn, tenant)
                removed = delete_rows(conn, tenant_id, document_id) if tenant_id is not None else NO_IDS
                if removed.size == 0:
                    conn.execute("ROLLBACK")
                    return 0
                version = bump_generation(conn, tenant_id, -removed.size)
                self._commit_and_apply(conn, tenant, removed, NO_IDS, None, version)
            self._maintain(tenant)
        return int(removed.size)

    def search(self, query: StoreQuery) -> list[Hit]:
        self._check_open()
        check_query(query)
        tenant_id = self._tenant_for_read(query.tenant)
        if tenant_id is None:
            return []
        vector = self._query_vector(query)
        if vector is not None:
            self._ensure_loaded(query.tenant)
        conn = self._reader()
        with self._rw.read():
            allowed = self._resolve_filter(conn, tenant_id, query.filters)
            if allowed is not None and allowed.rowids.size == 0:
                return []
            index = self._indexes.get(query.tenant)
            if query.mode is SearchMode.VECTOR:
                scored = self._vector_only(index, vector, query.k, allowed)
            elif query.mode is SearchMode.BM25:
                scored = self._bm25_only(conn, tenant_id, query, allowed)
            else:
                scored = self._hybrid(conn, tenant_id, index, vector, query, allowed)
            rows = fetch_rows(conn, [rowid for rowid, *_ in scored])
        return [
            Hit(rows[rowid].chunk_id, rows[rowid].document_id, rows[rowid].text, rows[rowid].metadata, *scores)
            for rowid, *scores in scored
            if rowid in rows
        ]

    def lexical_candidates(self, query: StoreQuery) -> LexicalCandidates | None:
        """BM25's top candidates of a hybrid query, while its vector is being embedded (the gateway overlaps the two:
        FTS5 is most of a hybrid search's time at 100k chunks, the embedding most of a chat's retrieval)."""
        self._check_open()
        check_query(query)
        tenant_id = self._tenant_for_read(query.tenant)
        if query.mode is not SearchMode.HYBRID or tenant_id is None:
            return None
        conn = self._reader()
        with self._rw.read():
            allowed = self._resolve_filter(conn, tenant_id, query.filters)
            if allowed is not None and allowed.rowids.size == 0:
                return None
            generation = self._tenant_stats(conn, tenant_id).generation
            scores = self._bm25_top(conn, tenant_id, query_terms(query.text), _hybrid_depth(query), allowed)
        return LexicalCandidates(key=self._lexical_key(query, generation), scores=scores)

    def count(self, tenant: str | None = None, filters: Filters | None = None) -> int:
        self._check_open()
        clauses, params = filter_clauses(filters or {}, self._indexed_metadata)
        if tenant is not None:
            tenant_id = self._tenant_for_read(tenant)
            if tenant_id is None:
                return 0
            clauses.insert(0, "tenant_id = ?")
            params.insert(0, tenant_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        return int(self._reader().execute(f"SELECT count(*) FROM chunks {where}", params).fetchone()[0])

    def document_ids(self, tenant: str) -> set[str]:
        self._check_open()
        tenant_id = self._tenant_for_read(tenant)
        if tenant_id is None:
            return set()
        rows = self._reader().execute("SELECT DISTINCT document_id FROM chunks WHERE tenant_id = ?", (tenant_id,))
        return {document_id for (document_id,) in rows}

    def health(self) -> bool:
        if self._closed:
            return False
        try:
            return self._reader().execute("SELECT 1").fetchone() == (1,)
        except sqlite3.Error:
            return False

    def close(self) -> None:
        """Snapshot the loaded vector indexes and release the directory; idempotent."""
        with self._writer:
            if self._closed:
                return
            for tenant, index in list(self._indexes.items()):
                if index.changes_since_save or index.saved_generation != index.generation:
                    self._save(tenant, index)
            self._closed = True
            self._indexes.clear()  # the memory goes now, not when the last reference to the store does
            with self._readers_lock:
                for conn in self._readers:
                    conn.close()
                self._readers.clear()
            self._conn.close()
            self._lock_file.close()

    # --- beyond the protocol -------------------------------------------------------------------------------------

    def warm(self, tenant: str) -> None:
        """Load (or build, or catch up) the tenant's vector index now rather than on its first vector search."""
        self._check_open()
        self._ensure_loaded(tenant)

    def index_info(self, tenant: str) -> dict[str, object]:
        """What the loaded index of a tenant looks like (kind, sizes); for benchmarks and diagnostics."""
        index = self._indexes.get(tenant)
        if index is None:
            return {"loaded": False}
        return {
            "loaded": True,
            "kind": "hnsw" if index.is_hnsw else "exact",
            "live": index.live_count,
            "tombstones": index.tombstones,
            "generation": index.generation,
        }

    # --- writing -------------------------------------------------------------------------------------------------

    def _prepare(self, tenant: str, document_id: str, chunks: Sequence[ChunkRecord]) -> list[PreparedChunk]:
        """Validate and analyse outside the locks: stemming is the slow part of a write."""
        check_chunks(tenant, document_id, chunks)
        prepared = []
        for chunk in chunks:
            prepared.append(
                PreparedChunk(
                    chunk.chunk_id,
                    chunk.text,
                    index_text(chunk.text),
                    metadata_json(chunk.chunk_id, chunk.metadata),
                    unit_vector(chunk.vector, f"chunk {chunk.chunk_id!r}"),
                )
            )
        check_dimensions({chunk.vector.size for chunk in prepared})
        return prepared

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … (the body commits); rolls back on any error and turns constraint failures into
        InvalidArgument, so a failed write leaves the store exactly as it was."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except sqlite3.IntegrityError as error:
            conn.execute("ROLLBACK")
            raise InvalidArgument(
                f"the write conflicts with stored chunks ({error}); a chunk id must be unique within a tenant",
                reason="CHUNK_ID_CONFLICT",
            ) from error
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _commit_and_apply(
        self,
        conn: sqlite3.Connection,
        tenant: str,
        removed: np.ndarray,
        added: np.ndarray,
        vectors: np.ndarray | None,
        version: Version,
    ) -> None:
        """COMMIT and update the loaded index under one exclusive lock: readers see both or neither."""
        with self._rw.write():
            conn.execute("COMMIT")
            index = self._indexes.get(tenant)
            if index is None:
                return  # not loaded: the first search catches up from SQLite
            try:
                if index.generation != version.generation - 1:
                    raise RuntimeError(f"index at generation {index.generation}, store at {version.generation - 1}")
                index.remove(removed)
                if vectors is not None:
                    index.add(added, vectors)
                index.generation, index.stamp = version.generation, version.stamp
            except Exception:
                log.exception("vector index of tenant %r out of step; it will be rebuilt from SQLite", tenant)
                del self._indexes[tenant]

    @staticmethod
    def _tenant_for_write(conn: sqlite3.Connection, tenant: str) -> int:
        tenant_id = existing_tenant(conn, tenant)
        return create_tenant(conn, tenant) if tenant_id is None else tenant_id

    def _ensure_dim(self, conn: sqlite3.Connection, dim: int) -> None:
        if self._dim is None:
            conn.execute("INSERT OR REPLACE INTO store_meta (key, value) VALUES ('dim', ?)", (str(dim),))
            self._dim = dim
        elif dim != self._dim:
            raise InvalidArgument(
                f"vectors have {dim} dimensions but this store holds {self._dim}-dimensional ones; use the same "
                "embedding model, or a new store for a new model",
                reason="DIMENSION_MISMATCH",
            )

    # --- the vector index: load, catch up, maintain --------------------------------------------------------------

    def _ensure_loaded(self, tenant: str) -> None:
        if tenant in self._indexes:
            return
        with self._writer:
            self._check_open()
            if tenant in self._indexes:
                return
            index = self._load_index(tenant)
            if index is not None:
                with self._rw.write():
                    self._indexes[tenant] = index

    def _load_index(self, tenant: str) -> TenantIndex | None:
        found = tenant_version(self._conn, tenant)
        if found is None or self._dim is None:
            return None
        tenant_id, version = found
        index = restore_index(self._conn, self._vectors_dir(tenant_id), tenant_id, version, self._dim, self.params)
        if index.changes_since_save >= SNAPSHOT_MIN_CHANGES:
            self._save(tenant, index, tenant_id)
        return index

    def _maintain(self, tenant: str) -> None:
        """After a write (holding the writer mutex): switch to HNSW, compact, or snapshot when due. The rebuild
        runs without the readers-writer lock (nothing else mutates the index meanwhile), so searches go on."""
        index = self._indexes.get(tenant)
        if index is None:
            return
        if index.wants_hnsw() or index.wants_compaction():
            rebuilt = index.rebuilt(hnsw=index.is_hnsw or index.wants_hnsw())
            with self._rw.write():
                self._indexes[tenant] = index = rebuilt
        if index.changes_since_save >= max(SNAPSHOT_MIN_CHANGES, index.size // 4):
            self._save(tenant, index)

    def _save(self, tenant: str, index: TenantIndex, tenant_id: int | None = None) -> None:
        tenant_id = tenant_id if tenant_id is not None else self._tenant_ids.get(tenant)
        if tenant_id is None:
            tenant_id = existing_tenant(self._conn, tenant)
        if tenant_id is None:
            return
        try:
            index.save(self._vectors_dir(tenant_id))
        except OSError:
            log.exception("could not write the vector snapshot of tenant %r; SQLite stays the source of truth", tenant)

    def _vectors_dir(self, tenant_id: int) -> Path:
        return self.path / "vectors" / str(tenant_id)

    # --- searching -----------------------------------------------------------------------------------------------

    def _query_vector(self, query: StoreQuery) -> np.ndarray | None:
        vector = query_vector(query)
        if vector is not None and self._dim is not None and vector.size != self._dim:
            raise InvalidArgument(
                f"the query vector has {vector.size} dimensions; this store holds {self._dim}-dimensional vectors",
                reason="DIMENSION_MISMATCH",
            )
        return vector

    @staticmethod
    def _vector_only(
        index: TenantIndex | None, vector: np.ndarray, k: int, allowed: _Filter | None
    ) -> list[tuple[int, float, float, None]]:
        hits = _vector_hits(index, vector, k, allowed)
        pairs = zip(hits.rowids.tolist(), hits.scores.tolist(), strict=True)
        return [(rowid, score, score, None) for rowid, score in pairs]

    def _bm25_only(
        self, conn: sqlite3.Connection, tenant_id: int, query: StoreQuery, allowed: _Filter | None
    ) -> list[tuple[int, float, None, float]]:
        scores = self._bm25_top(conn, tenant_id, query_terms(query.text), query.k, allowed)
        return [(rowid, score, None, score) for rowid, score in scores.items()]

    def _hybrid(
        self,
        conn: sqlite3.Connection,
        tenant_id: int,
        index: TenantIndex | None,
        vector: np.ndarray,
        query: StoreQuery,
        allowed: _Filter | None,
    ) -> list[tuple[int, float, float | None, float | None]]:
        depth = _hybrid_depth(query)
        bm25 = self._prefetched_bm25(conn, tenant_id, query)
        if bm25 is None:
            bm25 = self._bm25_top(conn, tenant_id, query_terms(query.text), depth, allowed)
        weight = query.vector_weight
        if weight is None and language_covered(detect_language(query.text), query.embedder_languages) is False:
            weight = 0.0  # a blind dense side: skip the vector search altogether
        vectors: dict[int, float] = {}
        if weight is None or weight > 0:
            hits = _vector_hits(index, vector, depth, allowed)
            vectors = dict(zip(hits.rowids.tolist(), hits.scores.tolist(), strict=True))
        if weight is None:
            weight = choose_vector_weight(
                query.text, query.embedder_languages, list(vectors.values()), bm25_scores=list(bm25.values())
            )
        if query.fusion is FusionMethod.RELATIVE_SCORE and weight > 0:
            # Every candidate gets both scores: its exact cosine, and BM25's floor (0) outside BM25's list.
            # (Fetching the true BM25 of vector-only candidates changed SciFact nDCG@10 by 0.0002 and cost more
            # than the rest of the query: FTS5 evaluates a MATCH per row id.)
            bm25_only = np.asarray(sorted(set(bm25) - set(vectors)), dtype=np.int64)
            if index is not None and bm25_only.size:
                vectors.update(index.scores_for(bm25_only, vector))
            bm25 = {**dict.fromkeys(vectors, 0.0), **bm25}
        fused = fuse(vectors, bm25, weight, query.fusion)[: query.k]
        if weight == 0 and index is not None and fused:
            vectors = index.scores_for(np.asarray(sorted(rowid for rowid, _ in fused), dtype=np.int64), vector)
        return [(rowid, score, vectors.get(rowid), bm25.get(rowid)) for rowid, score in fused]

    def _bm25_top(
        self, conn: sqlite3.Connection, tenant_id: int, terms: Sequence[str], limit: int, allowed: _Filter | None
    ) -> dict[int, float]:
        """Top ``limit`` rows by BM25 (FTS5's k1 = 1.2, b = 0.75), best first; scores positive, higher better."""
        if not terms:
            return {}
        stats = self._tenant_stats(conn, tenant_id)
        row_filter = None if allowed is None else allowed.rows
        return fts_bm25.top(conn, tenant_id, stats, terms, limit, row_filter, cache=self._frequencies)

    def _prefetched_bm25(self, conn: sqlite3.Connection, tenant_id: int, query: StoreQuery) -> dict[int, float] | None:
        """``query.lexical``'s scores if this store made them for this very query at the tenant's current generation
        (no write since); else None, and the search computes them itself."""
        if query.lexical is None:
            return None
        generation = self._tenant_stats(conn, tenant_id).generation
        if query.lexical.key != self._lexical_key(query, generation):
            return None
        return dict(query.lexical.scores)

    def _lexical_key(self, query: StoreQuery, generation: int) -> tuple[object, ...]:
        filters = json.dumps(query.filters, sort_keys=True, default=list)
        return (str(self.path), query.tenant, query.text, filters, _hybrid_depth(query), generation)

    @staticmethod
    def _tenant_stats(conn: sqlite3.Connection, tenant_id: int) -> fts_bm25.TenantStats:
        row = conn.execute("SELECT chunk_count, generation FROM tenants WHERE id = ?", (tenant_id,)).fetchone()
        return fts_bm25.TenantStats(rows=int(row[0]), generation=int(row[1]))

    def _resolve_filter(self, conn: sqlite3.Connection, tenant_id: int, filters: Filters) -> _Filter | None:
        """The rows the filters allow within the tenant, or None for no filter."""
        if not filters:
            return None
        clauses, params = filter_clauses(filters, self._indexed_metadata)
        sql = f"SELECT id FROM chunks WHERE tenant_id = ? AND {' AND '.join(clauses)}"
        params = [tenant_id, *params]
        rowids = np.fromiter((row[0] for row in conn.execute(f"{sql} ORDER BY id", params)), dtype=np.int64)
        return _Filter(rowids, fts_bm25.RowFilter(sql, params))

    # --- connections and bookkeeping -----------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path / "store.sqlite", isolation_level=None, check_same_thread=False, timeout=60)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {'FULL' if self._durable else 'NORMAL'}")
        conn.execute("PRAGMA cache_size = -65536")  # 64 MiB per connection
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only = ON")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def _create_schema(self) -> None:
        with self._writer:
            self._conn.executescript(SCHEMA)
            for key in self._indexed_metadata:
                self._conn.execute(
                    f"CREATE INDEX IF NOT EXISTS chunks_meta_{key} ON chunks (tenant_id, {json_path_sql(key)})"
                )
            row = self._conn.execute("SELECT value FROM store_meta WHERE key = 'schema'").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO store_meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise FailedPrecondition(
                    f"{self.path} holds store schema {row[0]}; this version reads {SCHEMA_VERSION}: re-ingest into a "
                    "new store path",
                    reason="STORE_SCHEMA_MISMATCH",
                )

    def embedding_model(self) -> str | None:
        """The embedding model whose vectors this store holds (``baton.store.reembed.model_identity``), None for a
        store written before models were recorded."""
        row = self._conn.execute("SELECT value FROM store_meta WHERE key = 'embedding_model'").fetchone()
        return None if row is None else str(row[0])

    def sample_chunks(self, limit: int) -> list[tuple[str, np.ndarray]]:
        """Up to ``limit`` (text, vector) pairs, spread over the store (to check which model made the vectors)."""
        rows = self._reader().execute(
            "SELECT text, vector FROM chunk_bodies WHERE id % (SELECT MAX(1, COUNT(*) / ?) FROM chunk_bodies) = 0 "
            "ORDER BY id LIMIT ?",
            (limit, limit),
        )
        return [(str(text), np.frombuffer(vector, dtype=np.float32)) for text, vector in rows]

    def set_embedding_model(self, identity: str) -> None:
        with self._writer:
            self._conn.execute(
                "INSERT OR REPLACE INTO store_meta (key, value) VALUES ('embedding_model', ?)", (identity,)
            )

    def _stored_dim(self) -> int | None:
        row = self._conn.execute("SELECT value FROM store_meta WHERE key = 'dim'").fetchone()
        return None if row is None else int(row[0])

    def _tenant_for_read(self, tenant: str) -> int | None:
        check_name("tenant", tenant)
        tenant_id = self._tenant_ids.get(tenant)
        if tenant_id is None:
            tenant_id = existing_tenant(self._reader(), tenant)
            if tenant_id is not None:
                self._tenant_ids[tenant] = tenant_id
        return tenant_id

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable(f"the vector store at {self.path} is closed", reason="STORE_CLOSED")


def _hybrid_depth(query: StoreQuery) -> int:
    """Candidates each side of a hybrid search brings to the fusion."""
    return max(query.k, HYBRID_CANDIDATE_DEPTH)


def _vector_hits(index: TenantIndex | None, vector: np.ndarray, k: int, allowed: _Filter | None) -> VectorHits:
    if index is None:
        return VectorHits(NO_IDS, np.empty(0, np.float32))
    return index.search(vector, k, None if allowed is None else allowed.rowids)
