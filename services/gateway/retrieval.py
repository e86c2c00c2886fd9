"""Query side of memory: validate, embed the query, hybrid-retrieve from the store, shape citations."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from baton.runtime.errors import EmptyInput, InvalidArgument
from baton.store.base import Filters, Hit, SearchMode, StoreQuery, VectorStore
from services.gateway import metrics
from services.gateway.ingest.pipeline import Embedder

MAX_QUERY_CHARS = 4000


@dataclass(frozen=True)
class SearchRequest:
    tenant: str
    query: str
    k: int = 10
    mode: SearchMode = SearchMode.HYBRID
    filters: Filters | None = None


class Retriever:
    def __init__(self, store: VectorStore, embedder: Embedder, embedder_languages: Sequence[str], max_k: int) -> None:
        self._store = store
        self._embedder = embedder
        self._languages = tuple(embedder_languages)
        self._max_k = max_k

    async def search(self, request: SearchRequest) -> list[Hit]:
        query = request.query.strip()
        if not query:
            raise EmptyInput("the query is empty; ask something", reason="EMPTY_QUERY")
        if len(query) > MAX_QUERY_CHARS:
            raise InvalidArgument(f"the query is longer than {MAX_QUERY_CHARS} characters", reason="QUERY_TOO_LONG")
        if not 1 <= request.k <= self._max_k:
            raise InvalidArgument(f"k must be between 1 and {self._max_k} (got {request.k})", reason="BAD_K")
        with metrics.SEARCH_SECONDS.labels(request.mode.value).time():
            return await self._search(request, query)

    async def _search(self, request: SearchRequest, query: str) -> list[Hit]:
        vector = None
        if request.mode is not SearchMode.BM25:
            vector = np.asarray((await self._embedder.embed([query], input_type="query"))[0], dtype=np.float32)
        store_query = StoreQuery(
            tenant=request.tenant,
            text=query,
            vector=vector,
            k=request.k,
            mode=request.mode,
            filters=dict(request.filters or {}),
            embedder_languages=self._languages,
        )
        return await asyncio.to_thread(self._store.search, store_query)


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
