"""Input checks shared by every ``VectorStore`` backend, so that both refuse the same bad input the same way:
ids, queries, vectors (normalised here), metadata (serialised here), filter keys, and the chunks of one write."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import numpy as np

from baton.runtime.errors import InvalidArgument
from baton.store.base import ChunkRecord, MetadataValue, SearchMode, StoreQuery


def check_chunks(tenant: str, document_id: str, chunks: Sequence[ChunkRecord]) -> None:
    """Every chunk of a ``replace_document`` call: owned by that tenant and document, a unique non-empty id, text."""
    check_name("tenant", tenant)
    check_name("document_id", document_id)
    seen: set[str] = set()
    for chunk in chunks:
        if chunk.tenant != tenant or chunk.document_id != document_id:
            raise InvalidArgument(
                f"chunk {chunk.chunk_id!r} belongs to tenant {chunk.tenant!r}, document {chunk.document_id!r}; "
                f"this call replaces tenant {tenant!r}, document {document_id!r}",
                reason="CHUNK_OWNER_MISMATCH",
            )
        check_name("chunk_id", chunk.chunk_id)
        if chunk.chunk_id in seen:
            raise InvalidArgument(f"chunk id {chunk.chunk_id!r} appears twice in one document", reason="DUPLICATE")
        seen.add(chunk.chunk_id)
        if not isinstance(chunk.text, str):
            raise InvalidArgument(f"chunk {chunk.chunk_id!r}: text must be a string", reason="BAD_TEXT")


def check_dimensions(sizes: set[int]) -> None:
    if len(sizes) > 1:
        raise InvalidArgument(f"the chunks' vectors differ in size: {sorted(sizes)}", reason="DIMENSION_MISMATCH")


def checked_filter_key(key: str) -> str:
    if not isinstance(key, str) or not key or '"' in key or "\\" in key or len(key) > 256:
        raise InvalidArgument(f"filter key {key!r} is not a usable metadata key", reason="BAD_FILTER")
    return key


def check_name(what: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(f"{what} must be a non-empty string (got {value!r})", reason="BAD_ID")


def check_query(query: StoreQuery) -> None:
    if query.k < 1:
        raise InvalidArgument(f"k must be at least 1 (got {query.k})", reason="BAD_K")
    if query.vector_weight is not None and not 0.0 <= query.vector_weight <= 1.0:
        raise InvalidArgument(f"vector_weight must be within 0..1 (got {query.vector_weight})", reason="BAD_WEIGHT")
    if not isinstance(query.text, str):
        raise InvalidArgument("the query text must be a string", reason="BAD_QUERY")


def unit_vector(vector: object, what: str) -> np.ndarray:
    array = np.asarray(vector, dtype=np.float32)
    if array.ndim != 1 or array.size == 0:
        raise InvalidArgument(f"{what}: a vector must be one-dimensional and non-empty", reason="BAD_VECTOR")
    norm = float(np.linalg.norm(array))
    if not math.isfinite(norm) or norm == 0.0:
        raise InvalidArgument(f"{what}: the vector is zero or not finite", reason="BAD_VECTOR")
    return (array / norm).astype(np.float32)


def query_vector(query: StoreQuery) -> np.ndarray | None:
    """The query's unit vector; None for a BM25 search, which needs none."""
    if query.mode is SearchMode.BM25:
        return None
    if query.vector is None:
        raise InvalidArgument(
            f"{query.mode.value} search needs the query's vector; embed the query, or use mode=bm25",
            reason="VECTOR_REQUIRED",
        )
    return unit_vector(query.vector, "the query vector")


def metadata_json(chunk_id: str, metadata: Mapping[str, MetadataValue]) -> str:
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str | int | float | bool):
            raise InvalidArgument(
                f"chunk {chunk_id!r}: metadata {key!r} must map to a string, number or boolean (got {value!r})",
                reason="BAD_METADATA",
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument(f"chunk {chunk_id!r}: metadata {key!r} is not finite", reason="BAD_METADATA")
    return json.dumps(dict(metadata), ensure_ascii=False, separators=(",", ":"))
