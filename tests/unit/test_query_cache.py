"""The gateway's query-vector cache: a repeated query is embedded once; the cache stays within its capacity."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from baton.store.base import Hit, SearchMode, StoreQuery
from services.gateway.retrieval import QueryVectorCache, Retriever, SearchRequest


class CountingEmbedder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    async def embed(self, texts: Sequence[str], *, input_type: str | None = None) -> np.ndarray:
        assert input_type == "query"
        self.calls.append(tuple(texts))
        return np.array([[float(len(text)), 1.0] for text in texts], dtype=np.float32)


class RecordingStore:
    def __init__(self) -> None:
        self.vectors: list[np.ndarray | None] = []

    def search(self, query: StoreQuery) -> list[Hit]:
        self.vectors.append(query.vector)
        return []


def retriever(capacity: int) -> tuple[Retriever, CountingEmbedder, RecordingStore]:
    embedder, store = CountingEmbedder(), RecordingStore()
    return Retriever(store, embedder, ["en"], 100, QueryVectorCache(capacity)), embedder, store  # type: ignore[arg-type]


async def test_a_repeated_query_is_embedded_once_and_gets_the_same_vector() -> None:
    search, embedder, store = retriever(8)
    for mode in (SearchMode.VECTOR, SearchMode.HYBRID, SearchMode.HYBRID):
        await search.search(SearchRequest("t", "  what is baton?  ", mode=mode))
    assert embedder.calls == [("what is baton?",)]
    first, *others = store.vectors
    assert first is not None and all(np.array_equal(first, other) for other in others)
    assert not first.flags.writeable  # shared between searches: nobody may change it in place


async def test_bm25_needs_no_vector() -> None:
    search, embedder, store = retriever(8)
    await search.search(SearchRequest("t", "words", mode=SearchMode.BM25))
    assert embedder.calls == [] and store.vectors == [None]


async def test_the_least_recently_used_query_leaves_first() -> None:
    search, embedder, _ = retriever(2)
    for query in ("a", "b", "a", "c", "a", "b"):  # "b" left when "c" came (after "a" was used again)
        await search.search(SearchRequest("t", query))
    assert embedder.calls == [("a",), ("b",), ("c",), ("b",)]


@pytest.mark.parametrize("capacity", [0])
async def test_capacity_zero_turns_it_off(capacity: int) -> None:
    search, embedder, _ = retriever(capacity)
    await search.search(SearchRequest("t", "same"))
    await search.search(SearchRequest("t", "same"))
    assert len(embedder.calls) == 2


def test_the_cache_holds_at_most_its_capacity() -> None:
    cache = QueryVectorCache(3)
    for index in range(10):
        cache.put(str(index), np.zeros(2, dtype=np.float32))
    assert len(cache) == 3 and cache.get("9") is not None and cache.get("0") is None
