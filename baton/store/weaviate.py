"""The Weaviate vector store: the same ``VectorStore`` on a real, scale-out Weaviate server (weaviate-client v4).

Layout: two multi-tenant collections, one Weaviate tenant per baton tenant (created on its first write):

- ``<collection>``: one object per chunk, with a self-provided vector (HNSW, cosine) and the properties
  ``chunk_id``, ``document_id``, ``generation`` (filterable, tokenization ``field``), ``text`` (the raw text, not
  indexed), ``terms`` (the *analysed* text of ``baton.store.analysis`` — stemmed Russian and English, the same terms
  the embedded store indexes — BM25-searchable with ``whitespace`` tokenization, since Weaviate stems neither
  language), ``metadata`` (the citation metadata as JSON, so types round-trip exactly) and ``filters`` (one
  ``key=value`` token per metadata field, tokenization ``field``: equality and any-of filters on every field, with
  the embedded store's comparison rules — numbers and booleans compare as numbers). The collection has no stop
  words and BM25 k1 = 1.2, b = 0.75, as SQLite FTS5.
- ``<collection>State``: one object per tenant, the *visibility state*: a random token that changes on every
  state write, and the documents being written right now with the one generation of each that searches may see.

Hybrid search runs Weaviate's vector search and its BM25 search separately and fuses them with
``baton.store.fusion`` exactly as the embedded store does (the same candidate depth, the same weight choice, the
exact cosine of BM25-only candidates computed here from their stored vectors), so both backends rank alike; the
server's own hybrid would normalise differently and could not gate a blind dense side.

Atomic documents. Weaviate has no multi-object transactions, so ``replace_document`` writes a new *generation*:

1. the state marks the document as in flight, visible generation = the current one (or none, for a new document);
2. the new chunks go in with a fresh generation id (deterministic UUIDs from generation and chunk id, so a retried
   batch overwrites rather than duplicates); any per-object error deletes that generation and raises;
3. one state write makes the new generation the visible one — the commit point;
4. the other generations of the document are deleted, and the document leaves the state.

Every search, count and listing adds the state's exclusions to its filter (``document_id != d OR generation ==
visible``) and reads the state token before and after (a seqlock): if a writer changed the state in between, it
runs again. A reader therefore sees each document's old chunks or its new ones, never a mix, never a half-written
batch, and never a document that went missing during the swap. The cost: two small reads per query, and a read may
repeat while writes commit. A writer killed mid-write (or a server killed under it) leaves its document in the
state: still hidden correctly, and cleaned up by the next write to that tenant from any process (``recover``).
One writing process per collection (the gateway), as the embedded store's directory lock enforces for it; writes
within a process are serialised.

The server side — config, connection (with short retries), the collections' schema, tenant names, how its errors
read — is ``baton.store.weaviate_client``; the visibility state and the filters are ``baton.store.weaviate_visibility``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import weaviate.classes as wvc
from weaviate.collections import Collection
from weaviate.collections.classes.filters import _Filters
from weaviate.exceptions import (
    WeaviateBaseError,
    WeaviateClosedClientError,
    WeaviateConnectionError,
    WeaviateGRPCUnavailableError,
    WeaviateTimeoutError,
)

from baton.runtime.errors import BatonError, InvalidArgument, Unavailable, UpstreamFailed
from baton.store.analysis import detect_language, index_text, query_terms
from baton.store.base import ChunkRecord, Filters, Hit, LexicalCandidates, SearchMode, StoreQuery
from baton.store.fusion import HYBRID_CANDIDATE_DEPTH, FusionMethod, choose_vector_weight, fuse, language_covered
from baton.store.validation import (
    check_chunks,
    check_dimensions,
    check_name,
    check_query,
    metadata_json,
    query_vector,
    unit_vector,
)
from baton.store.weaviate_client import (
    CHUNKS_DESCRIPTION,
    MODEL_MARK,
    NAMESPACE,
    WeaviateConfig,
    about_vector_size,
    connect,
    create_chunk_collection,
    create_state_collection,
    first_line,
    insert_error,
    looks_unreachable,
    state_collection,
    unavailable,
    weaviate_tenant_name,
)
from baton.store.weaviate_visibility import (
    Candidate,
    State,
    View,
    all_of,
    filter_token,
    of_document,
    of_documents,
    of_generation,
    other_generation,
    read_state,
    user_filter,
    visibility,
    visible_generation,
    write_state,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_CHUNK_PROPERTIES = ["chunk_id", "document_id", "generation", "text", "metadata"]
_INSERT_BATCH = 500
_DELETE_PAGE = 10_000
# How often a read repeats when writers keep changing the state under it, and the pause between tries.
_READ_ATTEMPTS = 200
_READ_BACKOFF_S = 0.002


class WeaviateStore:
    """``VectorStore`` on a Weaviate server. See the module docstring for the data layout and the guarantees."""

    def __init__(self, config: WeaviateConfig) -> None:
        self.config = config
        self._client = connect(config)
        self._writer = threading.Lock()
        self._known_tenants: set[str] = set()
        self._recovered: set[str] = set()
        self._closed = False
        # Set when the server stopped answering: until its readiness probe answers again, calls fail at once
        # instead of each waiting out the client's retries (an ingest would wait per document).
        self._unreachable = False
        try:
            self._chunks, self._states = self._ensure_collections()
        except BaseException:
            self._client.close()
            raise

    # --- VectorStore ---------------------------------------------------------------------------------------------

    def replace_document(self, tenant: str, document_id: str, chunks: Sequence[ChunkRecord]) -> None:
        self.replace_documents(tenant, {document_id: chunks})

    def replace_documents(self, tenant: str, documents: Mapping[str, Sequence[ChunkRecord]]) -> None:
        """``replace_document`` for several documents of a tenant in one round of state writes and batches (bulk
        loads: migration, benchmarks). Each document is replaced atomically, and all of them become visible at once."""
        prepared = {document_id: _prepare(tenant, document_id, chunks) for document_id, chunks in documents.items()}
        for document_id in [document_id for document_id, chunks in prepared.items() if not chunks]:
            self.delete_document(tenant, document_id)
            del prepared[document_id]
        if prepared:
            self._replace(tenant, prepared)

    def _replace(self, tenant: str, prepared: dict[str, list[dict[str, Any]]]) -> None:
        chunk_ids = [chunk["chunk_id"] for chunks in prepared.values() for chunk in chunks]
        if len(set(chunk_ids)) != len(chunk_ids):
            raise InvalidArgument("a chunk id appears in two of the documents written together", reason="DUPLICATE")
        with self._writer, self._errors("write"):
            self._check_open()
            name = self._tenant_for_write(tenant)
            chunks_of, states_of = self._chunks.with_tenant(name), self._states.with_tenant(name)
            state = read_state(states_of)
            documents = list(prepared)
            self._refuse_foreign_chunk_ids(chunks_of, state, documents, chunk_ids)
            generation = secrets.token_hex(8)
            state.in_flight.update(self._visible_generations(chunks_of, documents))
            write_state(states_of, state)
            try:
                _insert(chunks_of, generation, prepared)
            except BaseException:
                self._abandon(chunks_of, states_of, state, documents, generation)
                raise
            state.in_flight.update(dict.fromkeys(documents, generation))  # the commit point: one object write
            write_state(states_of, state)
            for part in _batches(documents, 1000):
                _delete_where(chunks_of, of_documents(part) & other_generation(generation))
            for document_id in documents:
                del state.in_flight[document_id]
            write_state(states_of, state)

    def delete_document(self, tenant: str, document_id: str) -> int:
        check_name("tenant", tenant)
        check_name("document_id", document_id)
        with self._writer, self._errors("delete"):
            self._check_open()
            name = self._existing_tenant(tenant)
            if name is None:
                return 0
            chunks_of, states_of = self._chunks.with_tenant(name), self._states.with_tenant(name)
            self._recover_once(name, chunks_of, states_of)
            state = read_state(states_of)
            removed = _count(chunks_of, of_document(document_id))
            if removed == 0:
                return 0
            state.in_flight[document_id] = None  # hidden at once, then deleted
            write_state(states_of, state)
            _delete_where(chunks_of, of_document(document_id))
            del state.in_flight[document_id]
            write_state(states_of, state)
        return removed

    def search(self, query: StoreQuery) -> list[Hit]:
        check_query(query)
        vector = query_vector(query)
        with self._errors("search"):
            self._check_open()
            name = self._existing_tenant(query.tenant)
            if name is None:
                return []
            wanted = user_filter(query.filters)
            if wanted is False:
                return []
            chunks_of = self._chunks.with_tenant(name)
            return self._consistent_read(name, lambda state: self._search(chunks_of, query, vector, state))

    def lexical_candidates(self, query: StoreQuery) -> LexicalCandidates | None:
        """None: both sides of a hybrid search run in ``search``, inside one consistent read of the tenant's
        generations (a BM25 list read ahead could straddle a write that the vector side does not see)."""
        return None

    def count(self, tenant: str | None = None, filters: Filters | None = None) -> int:
        wanted = user_filter(filters or {})
        with self._errors("count"):
            self._check_open()
            if tenant is None:
                names = list(self._chunks.tenants.get())
            else:
                name = self._existing_tenant(tenant)
                names = [] if name is None else [name]
            if wanted is False:
                return 0
            return sum(self._count_visible(name, wanted) for name in names)

    def _count_visible(self, name: str, wanted: _Filters | None) -> int:
        chunks_of = self._chunks.with_tenant(name)
        return self._consistent_read(name, lambda state: _count(chunks_of, all_of(wanted, visibility(state))))

    def document_ids(self, tenant: str) -> set[str]:
        with self._errors("list documents"):
            self._check_open()
            name = self._existing_tenant(tenant)
            if name is None:
                return set()
            chunks_of = self._chunks.with_tenant(name)
            return self._consistent_read(name, lambda state: _document_ids(chunks_of, visibility(state)))

    def health(self) -> bool:
        if self._closed:
            return False
        try:
            return bool(self._client.is_ready())
        except WeaviateBaseError:
            return False

    def close(self) -> None:
        with self._writer:
            if self._closed:
                return
            self._closed = True
            self._client.close()

    # --- beyond the protocol -------------------------------------------------------------------------------------

    def embedding_model(self) -> str | None:
        """Recorded in the chunk collection's description (collection-level metadata that Weaviate keeps)."""
        with self._errors("read the collection's embedding model"):
            description = self._chunks.config.get().description or ""
        return description.partition(MODEL_MARK)[2] or None

    def set_embedding_model(self, identity: str) -> None:
        with self._writer, self._errors("record the collection's embedding model"):
            self._chunks.config.update(description=f"{CHUNKS_DESCRIPTION}{MODEL_MARK}{identity}")

    def sample_chunks(self, limit: int) -> list[tuple[str, np.ndarray]]:
        sample: list[tuple[str, np.ndarray]] = []
        with self._errors("sample chunks"):
            for name in self.tenants():
                query = self._chunks.with_tenant(name).query
                found = query.fetch_objects(limit=limit - len(sample), include_vector=True)
                for item in found.objects:
                    vector = item.vector.get("default") if isinstance(item.vector, dict) else item.vector
                    sample.append((str(item.properties["text"]), np.asarray(vector, dtype=np.float32)))
                if len(sample) >= limit:
                    break
        return sample

    def tenants(self) -> list[str]:
        """The Weaviate tenant names in the collection (hashed for baton tenant names Weaviate cannot spell)."""
        with self._errors("list tenants"):
            return sorted(self._chunks.tenants.get())

    def recover(self, tenant: str) -> int:
        """Finish what killed writers left of the tenant's documents (their hidden generations); returns how many
        documents were cleaned. Runs by itself before a process's first write to a tenant."""
        with self._writer, self._errors("recover"):
            name = self._existing_tenant(tenant)
            if name is None:
                return 0
            self._recovered.discard(name)
            return self._recover_once(name, self._chunks.with_tenant(name), self._states.with_tenant(name))

    def drop_collections(self) -> None:
        """Delete both collections and everything in them (tests, and ``baton store migrate --fresh``)."""
        with self._writer, self._errors("drop the collections"):
            for name in (self.config.collection, state_collection(self.config.collection)):
                self._client.collections.delete(name)
            self._known_tenants.clear()
            self._recovered.clear()
            self._chunks, self._states = self._ensure_collections()

    # --- writing -------------------------------------------------------------------------------------------------

    def _tenant_for_write(self, tenant: str) -> str:
        name = weaviate_tenant_name(tenant)
        if name not in self._known_tenants:
            for collection in (self._chunks, self._states):
                if not collection.tenants.exists(name):
                    collection.tenants.create([wvc.tenants.Tenant(name=name)])
            self._known_tenants.add(name)
        self._recover_once(name, self._chunks.with_tenant(name), self._states.with_tenant(name))
        return name

    def _recover_once(self, name: str, chunks_of: Collection, states_of: Collection) -> int:
        if name in self._recovered:
            return 0
        state = read_state(states_of)
        interrupted = list(state.in_flight.items())
        for document_id, visible in interrupted:
            log.warning("tenant %s: cleaning up an interrupted write of document %r", name, document_id)
            where = of_document(document_id)
            _delete_where(chunks_of, where if visible is None else where & other_generation(visible))
            del state.in_flight[document_id]
        if interrupted:
            write_state(states_of, state)
        self._recovered.add(name)
        return len(interrupted)

    def _refuse_foreign_chunk_ids(
        self, chunks_of: Collection, state: State, documents: list[str], chunk_ids: list[str]
    ) -> None:
        """A chunk id is unique within a tenant: refuse ids another (visible) document owns, as the embedded store's
        UNIQUE constraint does."""
        for part in _batches(chunk_ids, 1000):
            where = wvc.query.Filter.by_property("chunk_id").contains_any(part) & wvc.query.Filter.by_property(
                "document_id"
            ).contains_none(documents)
            found = chunks_of.query.fetch_objects(
                filters=all_of(where, visibility(state)), limit=1, return_properties=["chunk_id", "document_id"]
            )
            if found.objects:
                owner = found.objects[0].properties
                raise InvalidArgument(
                    f"chunk id {owner['chunk_id']!r} belongs to document {owner['document_id']!r}; a chunk id must be "
                    "unique within a tenant",
                    reason="CHUNK_ID_CONFLICT",
                )

    def _abandon(
        self, chunks_of: Collection, states_of: Collection, state: State, documents: list[str], generation: str
    ) -> None:
        """Undo a failed write: delete the new generation, take the documents out of the state. If the server is
        gone this fails too; the state keeps the half-written generation hidden until ``recover``."""
        try:
            _delete_where(chunks_of, of_generation(generation))
            for document_id in documents:
                del state.in_flight[document_id]
            write_state(states_of, state)
        except WeaviateBaseError as error:
            log.warning("could not undo a failed write (%s); the next write to the tenant cleans it up", error)

    def _visible_generations(self, chunks_of: Collection, documents: list[str]) -> dict[str, str | None]:
        """The generation of each document's chunks (no write of them is in flight, so they share one each)."""
        visible: dict[str, str | None] = dict.fromkeys(documents)
        for part in _batches(documents, 1000):
            found = chunks_of.query.fetch_objects(
                filters=of_documents(part),
                limit=self.config.max_results,
                return_properties=["document_id", "generation"],
            )
            for obj in found.objects:
                visible[str(obj.properties["document_id"])] = str(obj.properties["generation"])
            if len(found.objects) >= self.config.max_results:  # more chunks than one page: ask per document
                for document_id in part:
                    visible[document_id] = visible_generation(chunks_of, document_id)
        return visible

    # --- reading -------------------------------------------------------------------------------------------------

    def _consistent_read(self, name: str, read: Callable[[State], T]) -> T:
        """Run ``read`` against the tenant's visibility state until no state write happened during it (a seqlock)."""
        states_of = self._states.with_tenant(name)
        for _ in range(_READ_ATTEMPTS):
            before = read_state(states_of)
            result = read(before)
            if read_state(states_of).token == before.token:
                return result
            time.sleep(_READ_BACKOFF_S)
        raise Unavailable(
            "the Weaviate store is being rewritten too fast to read consistently; retry shortly",
            reason="STORE_BUSY",
            retry_after_s=1.0,
        )

    def _search(self, chunks_of: Collection, query: StoreQuery, vector: np.ndarray | None, state: State) -> list[Hit]:
        view = View(state, query.filters)
        k = min(query.k, self.config.max_results)
        if query.mode is SearchMode.VECTOR:
            assert vector is not None
            scores, found = self._vector_top(chunks_of, vector, k, view)
            return [_hit(found[key], score, score, None) for key, score in scores.items()]
        if query.mode is SearchMode.BM25:
            scores, found = self._bm25_top(chunks_of, query.text, k, view, with_vectors=False)
            return [_hit(found[key], score, None, score) for key, score in scores.items()]
        assert vector is not None
        return self._hybrid(chunks_of, query, vector, k, view)

    def _hybrid(self, chunks_of: Collection, query: StoreQuery, vector: np.ndarray, k: int, view: View) -> list[Hit]:
        """The embedded store's hybrid, step for step (see ``EmbeddedStore._hybrid`` and fusion.py)."""
        depth = min(max(k, HYBRID_CANDIDATE_DEPTH), self.config.max_results)
        bm25, found = self._bm25_top(chunks_of, query.text, depth, view, with_vectors=True)
        weight = query.vector_weight
        if weight is None and language_covered(detect_language(query.text), query.embedder_languages) is False:
            weight = 0.0  # a blind dense side: skip the vector search altogether
        vectors: dict[str, float] = {}
        if weight is None or weight > 0:
            vectors, vector_found = self._vector_top(chunks_of, vector, depth, view)
            found = {**vector_found, **found}
        if weight is None:
            weight = choose_vector_weight(
                query.text, query.embedder_languages, list(vectors.values()), bm25_scores=list(bm25.values())
            )
        if query.fusion is FusionMethod.RELATIVE_SCORE and weight > 0:
            vectors.update(_cosines([key for key in bm25 if key not in vectors], found, vector))
            bm25 = {**dict.fromkeys(vectors, 0.0), **bm25}
        fused = fuse(vectors, bm25, weight, query.fusion)[:k]
        if weight == 0:
            vectors = _cosines([key for key, _ in fused], found, vector)
        return [_hit(found[key], score, vectors.get(key), bm25.get(key)) for key, score in fused]

    def _vector_top(
        self, chunks_of: Collection, vector: np.ndarray, limit: int, view: View
    ) -> tuple[dict[str, float], dict[str, Candidate]]:
        def run(fetch: int) -> Sequence[Any]:
            return chunks_of.query.near_vector(
                near_vector=vector.tolist(),
                limit=fetch,
                filters=view.where,
                return_metadata=wvc.query.MetadataQuery(distance=True),
                return_properties=_CHUNK_PROPERTIES,
            ).objects

        # Cosine distance → similarity.
        return self._top(run, limit, view, lambda obj: 1.0 - float(obj.metadata.distance or 0.0), with_vectors=False)

    def _bm25_top(
        self, chunks_of: Collection, text: str, limit: int, view: View, *, with_vectors: bool
    ) -> tuple[dict[str, float], dict[str, Candidate]]:
        terms = query_terms(text)
        if not terms:
            return {}, {}

        def run(fetch: int) -> Sequence[Any]:
            return chunks_of.query.bm25(
                query=" ".join(terms),
                query_properties=["terms"],
                limit=fetch,
                filters=view.where,
                include_vector=with_vectors,
                return_metadata=wvc.query.MetadataQuery(score=True),
                return_properties=_CHUNK_PROPERTIES,
            ).objects

        return self._top(run, limit, view, lambda obj: float(obj.metadata.score or 0.0), with_vectors=with_vectors)

    def _top(
        self,
        run: Callable[[int], Sequence[Any]],
        limit: int,
        view: View,
        score_of: Callable[[Any], float],
        *,
        with_vectors: bool,
    ) -> tuple[dict[str, float], dict[str, Candidate]]:
        """The best ``limit`` objects the view admits, best first. Weaviate applies the filter, but not as of one
        instant: an object written during a filtered search (BM25 especially) can slip through. So every object is
        checked here too, and when some were dropped the search runs again deeper, until ``limit`` are left or the
        tenant has no more."""
        fetch = limit
        while True:
            objects = run(fetch)
            scores: dict[str, float] = {}
            found: dict[str, Candidate] = {}
            for obj in objects:
                stored = obj.vector.get("default") if with_vectors else None
                candidate = _candidate(obj.properties, None if stored is None else np.asarray(stored, np.float32))
                if view.admits(candidate):
                    key = str(obj.uuid)
                    scores[key], found[key] = score_of(obj), candidate
            if len(scores) >= limit or len(objects) < fetch or fetch >= self.config.max_results:
                return dict(list(scores.items())[:limit]), found
            fetch = min(fetch * 2, self.config.max_results)

    # --- connection and bookkeeping ------------------------------------------------------------------------------

    def _ensure_collections(self) -> tuple[Collection, Collection]:
        name = self.config.collection
        if not self._client.collections.exists(name):
            create_chunk_collection(self._client, self.config)
        state_name = state_collection(name)
        if not self._client.collections.exists(state_name):
            create_state_collection(self._client, state_name)
        return self._client.collections.use(name), self._client.collections.use(state_name)

    def _existing_tenant(self, tenant: str) -> str | None:
        check_name("tenant", tenant)
        name = weaviate_tenant_name(tenant)
        if name in self._known_tenants:
            return name
        if not self._chunks.tenants.exists(name) or not self._states.tenants.exists(name):
            return None
        self._known_tenants.add(name)
        return name

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable(f"the Weaviate store ({self.config.url}) is closed", reason="STORE_CLOSED")

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Weaviate's exceptions as baton errors: a server that does not answer is 503 with what to do."""
        if self._unreachable and not self._closed:
            if not self.health():
                raise unavailable(self.config, action, ConnectionError("its readiness probe fails"))
            self._unreachable = False
        try:
            yield
        except BatonError:
            raise
        except (WeaviateConnectionError, WeaviateGRPCUnavailableError, WeaviateTimeoutError) as error:
            self._unreachable = True
            raise unavailable(self.config, action, error) from error
        except WeaviateClosedClientError as error:
            raise Unavailable(f"the Weaviate store ({self.config.url}) is closed", reason="STORE_CLOSED") from error
        except WeaviateBaseError as error:
            message = str(error)
            if looks_unreachable(message):
                self._unreachable = True
                raise unavailable(self.config, action, error) from error
            if about_vector_size(message):
                raise InvalidArgument(
                    f"the vector's size does not match the vectors stored in Weaviate: {first_line(message)}",
                    reason="DIMENSION_MISMATCH",
                ) from error
            raise UpstreamFailed(
                f"Weaviate failed to {action}: {first_line(message)}", reason="STORE_BACKEND_FAILED"
            ) from error


# --- helpers: writing and reading -----------------------------------------------------------------------------------


def _prepare(tenant: str, document_id: str, chunks: Sequence[ChunkRecord]) -> list[dict[str, Any]]:
    """Validate (the embedded store's rules) and analyse outside the lock; one dict per chunk."""
    check_chunks(tenant, document_id, chunks)
    prepared = []
    for chunk in chunks:
        prepared.append(
            {
                "chunk_id": chunk.chunk_id,
                "text": chunk.text,
                "terms": index_text(chunk.text),
                "metadata": metadata_json(chunk.chunk_id, chunk.metadata),
                "filters": [filter_token(key, value) for key, value in chunk.metadata.items()],
                "vector": unit_vector(chunk.vector, f"chunk {chunk.chunk_id!r}"),
            }
        )
    check_dimensions({chunk["vector"].size for chunk in prepared})
    return prepared


def _insert(chunks_of: Collection, generation: str, prepared: dict[str, list[dict[str, Any]]]) -> None:
    """Insert one generation of documents; the first per-object error raises (nothing of it becomes visible)."""
    chunks = [{**chunk, "document_id": document_id} for document_id, part in prepared.items() for chunk in part]
    for part in _batches(chunks, _INSERT_BATCH):
        objects = [
            wvc.data.DataObject(
                properties={
                    "chunk_id": chunk["chunk_id"],
                    "document_id": chunk["document_id"],
                    "generation": generation,
                    "text": chunk["text"],
                    "terms": chunk["terms"],
                    "metadata": chunk["metadata"],
                    "filters": chunk["filters"],
                },
                vector=chunk["vector"].tolist(),
                uuid=uuid.uuid5(NAMESPACE, f"{generation}\x00{chunk['chunk_id']}"),
            )
            for chunk in part
        ]
        result = chunks_of.data.insert_many(objects)
        if result.errors:
            index, error = min(result.errors.items())
            raise insert_error(part[index]["chunk_id"], error.message, len(result.errors))


def _delete_where(chunks_of: Collection, where: _Filters) -> None:
    """Delete every matching object; Weaviate deletes at most QUERY_MAXIMUM_RESULTS per call, so repeat."""
    while True:
        result = chunks_of.data.delete_many(where=where)
        if result.failed:
            raise UpstreamFailed(f"Weaviate failed to delete {result.failed} chunk(s)", reason="STORE_DELETE_FAILED")
        if result.matches < _DELETE_PAGE:
            return


def _count(chunks_of: Collection, where: _Filters | None) -> int:
    return int(chunks_of.aggregate.over_all(filters=where, total_count=True).total_count or 0)


def _document_ids(chunks_of: Collection, where: _Filters | None) -> set[str]:
    groups = chunks_of.aggregate.over_all(
        filters=where, group_by=wvc.aggregate.GroupByAggregate(prop="document_id", limit=2**31 - 1), total_count=True
    )
    return {str(group.grouped_by.value) for group in groups.groups}


def _candidate(properties: Mapping[str, Any], vector: np.ndarray | None) -> Candidate:
    return Candidate(
        chunk_id=str(properties["chunk_id"]),
        document_id=str(properties["document_id"]),
        generation=str(properties["generation"]),
        text=str(properties.get("text") or ""),
        metadata=json.loads(str(properties.get("metadata") or "{}")),
        vector=vector,
    )


def _cosines(keys: Sequence[str], found: Mapping[str, Candidate], vector: np.ndarray) -> dict[str, float]:
    """Exact cosines of candidates whose stored (unit) vectors came back with them."""
    return {
        key: float(np.dot(found[key].vector, vector)) for key in keys if key in found and found[key].vector is not None
    }


def _hit(candidate: Candidate, score: float, vector_score: float | None, bm25_score: float | None) -> Hit:
    return Hit(
        candidate.chunk_id, candidate.document_id, candidate.text, candidate.metadata, score, vector_score, bm25_score
    )


def _batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
