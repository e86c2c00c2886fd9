"""Query side of memory: validate, embed the query, hybrid-retrieve from the store, shape citations."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from baton.runtime.errors import EmptyInput, InvalidArgument
from baton.store.base import Filters, Hit, LexicalCandidates, SearchMode, StoreQuery, VectorStore
from services.gateway import metrics
from services.gateway.ingest.pipeline import Embedder

MAX_QUERY_CHARS = 4000


@dataclass(frozen=True)
class SearchTimings:
    # The query's vector (the embedder's round trip, or a cache hit) and, on a hybrid search, BM25's candidates
    # computed meanwhile: until both are ready.
    embed_s: float
    store_s: float  # the store's search after that: the vector side, fusion, rows (and BM25 when not ahead)
    lexical_s: float = 0.0  # BM25 ahead, overlapped with the embedding (part of embed_s's wall time, not added)


@dataclass(frozen=True)
class SearchRequest:
    tenant: str
    query: str
    k: int = 10
    mode: SearchMode = SearchMode.HYBRID
    filters: Filters | None = None


class QueryVectorCache:
    """The vectors of recent queries, least recently used first out.

    A chat turn, a retry and the same search from a page ask for one query's vector again and again; embedding it
    is most of a search's time (a transformer forward on the embedder), a lookup here is a dict access. One cache
    serves one embedding model: the gateway builds it with the embedder it talks to, so a vector never outlives the
    model that made it. ``capacity`` 0 turns it off.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, query: str) -> np.ndarray | None:
        vector = self._vectors.get(query)
        if vector is not None:
            self._vectors.move_to_end(query)
        metrics.QUERY_CACHE.labels("hit" if vector is not None else "miss").inc()
        return vector

    def put(self, query: str, vector: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        vector.setflags(write=False)  # shared by every later search of the same query
        self._vectors[query] = vector
        self._vectors.move_to_end(query)
        while len(self._vectors) > self.capacity:
            self._vectors.popitem(last=False)

    def __len__(self) -> int:
        return len(self._vectors)


class Retriever:
    def __init__(
        self,
        store: VectorStore,
        embedder: Embedder,
        embedder_languages: Sequence[str],
        max_k: int,
        query_cache: QueryVectorCache | None = None,
    ) -> None:
        self._store = store
        self._embedder = embedder
        self._languages = tuple(embedder_languages)
        self._max_k = max_k
        self._cache = query_cache if query_cache is not None else QueryVectorCache(0)

    async def search(self, request: SearchRequest) -> list[Hit]:
        return (await self.search_timed(request))[0]

    async def search_timed(self, request: SearchRequest) -> tuple[list[Hit], SearchTimings]:
        """The hits and where the time went (chat reports it in ``baton.timings``; the benchmark reads it)."""
        query = request.query.strip()
        if not query:
            raise EmptyInput("the query is empty; ask something", reason="EMPTY_QUERY")
        if len(query) > MAX_QUERY_CHARS:
            raise InvalidArgument(f"the query is longer than {MAX_QUERY_CHARS} characters", reason="QUERY_TOO_LONG")
        if not 1 <= request.k <= self._max_k:
            raise InvalidArgument(f"k must be between 1 and {self._max_k} (got {request.k})", reason="BAD_K")
        with metrics.SEARCH_SECONDS.labels(request.mode.value).time():
            return await self._search(request, query)

    async def _search(self, request: SearchRequest, query: str) -> tuple[list[Hit], SearchTimings]:
        started = time.perf_counter()
        store_query = StoreQuery(
            tenant=request.tenant,
            text=query,
            k=request.k,
            mode=request.mode,
            filters=dict(request.filters or {}),
            embedder_languages=self._languages,
        )
        lexical_s = 0.0
        if request.mode is SearchMode.HYBRID and (vector := self._cache.get(query)) is None:
            # The two sides of a hybrid search, at once: the embedder computes the query's vector while the store
            # ranks BM25's candidates (most of a search's own time at 100k chunks).
            vector, (lexical, lexical_s) = await asyncio.gather(
                self._embed(query), asyncio.to_thread(self._timed_lexical, store_query)
            )
            store_query = replace(store_query, vector=vector, lexical=lexical)
        elif request.mode is not SearchMode.BM25:
            store_query = replace(store_query, vector=await self._query_vector(query))
        embedded = time.perf_counter()
        hits = await asyncio.to_thread(self._store.search, store_query)
        timings = SearchTimings(embed_s=embedded - started, store_s=time.perf_counter() - embedded, lexical_s=lexical_s)
        return hits, timings

    def _timed_lexical(self, query: StoreQuery) -> tuple[LexicalCandidates | None, float]:
        started = time.perf_counter()
        return self._store.lexical_candidates(query), time.perf_counter() - started

    async def _query_vector(self, query: str) -> np.ndarray:
        vector = self._cache.get(query)
        return vector if vector is not None else await self._embed(query)

    async def _embed(self, query: str) -> np.ndarray:
        vector = np.asarray((await self._embedder.embed([query], input_type="query"))[0], dtype=np.float32)
        self._cache.put(query, vector)
        return vector


def citation(rank: int, hit: Hit) -> dict[str, object]:
    """What a client needs to show and cite a hit."""
    meta = hit.metadata
    return {
        "rank": rank,
        "chunk_id": hit.chunk_id,
        "document_id": hit.document_id,
        "title": meta.get("title", ""),
        "heading": meta.get("heading", ""),
        "page": meta.get("page"),
        "source": meta.get("source", ""),
        "collection": meta.get("collection", ""),
        "score": hit.score,
        "vector_score": hit.vector_score,
        "bm25_score": hit.bm25_score,
        "text": hit.text,
    }
