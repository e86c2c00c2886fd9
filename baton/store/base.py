"""The ``VectorStore`` protocol and the data it speaks. Both backends (embedded, Weaviate) implement it and pass
the same conformance suite (tests/conformance/).

A store holds chunks: text + vector + metadata, owned by one tenant and one document. Writes are per document and
atomic: ``replace_document`` swaps all chunks of a document in one step, so a search never sees half a document.
Search is vector, BM25 or hybrid; hybrid fuses the two rankings with ``baton.store.fusion`` so that both backends
rank alike.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from baton.store.fusion import FusionMethod

MetadataValue = str | int | float | bool
# Equality filters: {"document_id": "d1"} or any-of: {"collection": ["a", "b"]}.
Filters = Mapping[str, MetadataValue | Sequence[MetadataValue]]


class SearchMode(enum.StrEnum):
    VECTOR = "vector"
    BM25 = "bm25"
    HYBRID = "hybrid"


@dataclass(frozen=True)
class ChunkRecord:
    """One chunk as stored. ``chunk_id`` is unique within the tenant and stable across re-ingests of the same
    content (e.g. ``f"{document_id}:{index}"``); ``metadata`` carries the citation and filter fields (title,
    heading, page, source, collection, language, start/end offsets, ...)."""

    chunk_id: str
    document_id: str
    tenant: str
    text: str
    vector: np.ndarray  # float32, shape (dim,), L2-normalised by the embedder
    metadata: Mapping[str, MetadataValue] = field(default_factory=dict)


@dataclass(frozen=True)
class LexicalCandidates:
    """BM25's candidates for a hybrid search, computed ahead by ``VectorStore.lexical_candidates`` while the query's
    vector is still being embedded (the two sides of a hybrid search need not wait for each other).

    Only the store that made them reads them. ``key`` says what they were computed for — tenant, query text,
    filters, depth and the tenant's write generation — and a store that finds it no longer matches (a write landed
    in between) computes them again, so a prefetch can make a search faster, never different.
    """

    key: tuple[object, ...]
    scores: Mapping[int, float]  # the store's row -> BM25 score, best first


@dataclass(frozen=True)
class StoreQuery:
    tenant: str
    text: str = ""
    vector: np.ndarray | None = None
    k: int = 10
    mode: SearchMode = SearchMode.HYBRID
    filters: Filters = field(default_factory=dict)
    # Weight of the vector side in hybrid fusion, 0..1. None: decided by fusion.choose_vector_weight
    # from the query and the embedder's languages (see ``languages``).
    vector_weight: float | None = None
    # Languages the embedding model covers (ISO 639-1, "*" = all); lets fusion gate a blind dense side.
    embedder_languages: Sequence[str] = ()
    # How hybrid mode fuses the two rankings (fusion.py); relative-score fusion ranked best on SciFact and XQuAD.
    fusion: FusionMethod = FusionMethod.RELATIVE_SCORE
    # BM25's side of a hybrid search, computed ahead (``VectorStore.lexical_candidates``); None: computed in search.
    lexical: LexicalCandidates | None = None


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    document_id: str
    text: str
    metadata: Mapping[str, MetadataValue]
    score: float  # the fused (or single-mode) score; higher is better
    vector_score: float | None = None  # cosine similarity, when the vector side ranked it
    bm25_score: float | None = None  # BM25, when the text side ranked it


@runtime_checkable
class VectorStore(Protocol):
    """Synchronous on purpose: the embedded store is CPU-bound; async callers use ``asyncio.to_thread``."""

    def replace_document(self, tenant: str, document_id: str, chunks: Sequence[ChunkRecord]) -> None:
        """Atomically make ``chunks`` the only chunks of the document (insert, re-upsert or shrink)."""
        ...

    def delete_document(self, tenant: str, document_id: str) -> int:
        """Remove every chunk of the document; returns how many were removed (0 if none)."""
        ...

    def search(self, query: StoreQuery) -> list[Hit]:
        """Top ``query.k`` hits for the tenant, best first. An empty store or tenant returns []."""
        ...

    def lexical_candidates(self, query: StoreQuery) -> LexicalCandidates | None:
        """BM25's side of the hybrid ``query`` (its vector not needed yet), to pass back in ``query.lexical``; None
        where the store does not split a hybrid search (it then does both sides in ``search``)."""
        ...

    def count(self, tenant: str | None = None, filters: Filters | None = None) -> int: ...

    def document_ids(self, tenant: str) -> set[str]: ...

    def health(self) -> bool: ...

    def embedding_model(self) -> str | None:
        """The embedding model whose vectors the store holds (``baton.store.reembed.model_identity``); None for a
        store written before models were recorded. Two models' vectors are never mixed in one store."""
        ...

    def set_embedding_model(self, identity: str) -> None: ...

    def sample_chunks(self, limit: int) -> list[tuple[str, np.ndarray]]:
        """Up to ``limit`` (text, vector) pairs from anywhere in the store: to tell which model made the vectors."""
        ...

    def close(self) -> None: ...
