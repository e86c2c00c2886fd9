"""The gateway's retriever: a repeated query is embedded once (the query-vector cache stays within its capacity),
and a hybrid search's BM25 side runs while the query is being embedded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np
import pytest

from baton.store.base import Hit, LexicalCandidates, SearchMode, StoreQuery
from services.gateway.retrieval import QueryVectorCache, Retriever, SearchRequest


class CountingEmbedder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    async def embed(self, texts: Sequence[str], *, input_type: str | None = None) -> np.ndarray:
        assert input_type == "query"
        self.calls.append(tuple(texts))
        return np.array([[float(len(text)), 1.0] for text in texts], dtype=np.float32)


class RecordingStore:
    def __init__(self, lexical_s: float = 0.0) -> None:
        self.vectors: list[np.ndarray | None] = []
        self.lexical: list[LexicalCandidates | None] = []
        self.lexical_s = lexical_s

    def lexical_candidates(self, query: StoreQuery) -> LexicalCandidates | None:
        assert query.vector is None and query.mode is SearchMode.HYBRID
        time.sleep(self.lexical_s)  # FTS5 in a worker thread
        return LexicalCandidates(key=(query.text,), scores={1: 2.0})

    def search(self, query: StoreQuery) -> list[Hit]:
        self.vectors.append(query.vector)
        self.lexical.append(query.lexical)
        return []


class SlowEmbedder(CountingEmbedder):
    async def embed(self, texts: Sequence[str], *, input_type: str | None = None) -> np.ndarray:
        await asyncio.sleep(0.3)  # the embedder's round trip
        return await super().embed(texts, input_type=input_type)


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


async def test_a_hybrid_search_ranks_bm25_while_the_query_is_embedded() -> None:
    store = RecordingStore(lexical_s=0.3)
    search = Retriever(store, SlowEmbedder(), ["en"], 100, QueryVectorCache(8))  # type: ignore[arg-type]
    started = time.perf_counter()
    _, timings = await search.search_timed(SearchRequest("t", "what is baton?"))
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"{elapsed:.2f} s: the two 0.3 s sides ran one after the other"
    assert timings.lexical_s >= 0.3 and timings.embed_s < 0.5
    assert store.lexical == [LexicalCandidates(key=("what is baton?",), scores={1: 2.0})]
    assert store.vectors[0] is not None
    # A cached vector needs no overlap: the store does both sides in its search.
    await search.search(SearchRequest("t", "what is baton?"))
    assert store.lexical[1] is None and len(store.vectors) == 2
