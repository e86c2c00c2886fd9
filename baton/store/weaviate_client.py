"""Talking to a Weaviate server for ``baton.store.weaviate``: where it is, the connection (with short retries), the
two collections' schema, tenant names, and how the server's errors read as baton errors.

Split from the store so that ``weaviate.py`` holds what the store *does* (atomic generations, consistent reads,
fused search) and this module what the server *is* (config, schema, client quirks).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import urlparse

import grpc
import weaviate
import weaviate.classes as wvc
import weaviate.connect.v4 as weaviate_connection
from weaviate.exceptions import WeaviateBaseError

from baton.runtime.errors import BatonError, InvalidArgument, Unavailable, UpstreamFailed

T = TypeVar("T")

# Object and tenant ids derive from this namespace (uuid5), so a retried write lands on the same objects.
NAMESPACE = uuid.UUID("6f1c1a52-0b7e-4d5e-9a39-5bb5f0a4c1d3")
# Weaviate tenant names: letters, digits, '-' and '_', 1–64 characters. Others are hashed (with this prefix,
# which a literal name is never allowed to start with, so the two forms cannot collide).
_HASHED_TENANT_PREFIX = "h--"

CHUNKS_DESCRIPTION = "baton chunks (baton.store.weaviate)"
MODEL_MARK = "; embedding model: "


# weaviate-client repeats a gRPC call the server refused (UNAVAILABLE) five times, sleeping 1+2+4+8+16+32 s in
# between: with the server down, every search waited 63 s for its 503, and a folder ingest 63 s per document (writes
# are serialised) — hours for a folder. The pauses are hard-coded (weaviate/connect/v4.py, ``_Retry(4)``), so the
# store replaces them with short ones: a blip of the connection is still ridden out, a dead server is a 503 in ~3 s.
_RETRY_PAUSES_S = (0.2, 0.4, 0.8, 1.6)


class _ShortRetry(weaviate_connection._Retry):
    def with_exponential_backoff(self, count: int, error: str, f: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        for pause in _RETRY_PAUSES_S:
            try:
                return f(*args, **kwargs)
            except grpc.RpcError as rpc_error:
                if cast(grpc.Call, rpc_error).code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            time.sleep(pause)
        return f(*args, **kwargs)  # the last try: its error reaches the client's own handling, then ``_errors``


weaviate_connection._Retry = _ShortRetry  # type: ignore[misc]


@dataclass(frozen=True)
class WeaviateConfig:
    """Where the server is and which collection holds the chunks (``<collection>State`` is created beside it)."""

    url: str = "http://127.0.0.1:8080"
    grpc_port: int = 50051
    api_key: str | None = None
    collection: str = "BatonChunks"
    timeout_s: float = 60.0
    # Weaviate's QUERY_MAXIMUM_RESULTS (default 10,000): the largest k and page this store asks for.
    max_results: int = 10_000
    hnsw_ef: int = 128
    hnsw_ef_construction: int = 200
    hnsw_max_connections: int = 32


def weaviate_tenant_name(tenant: str) -> str:
    """The Weaviate tenant for a baton tenant: the name itself when Weaviate allows it, else a stable hash."""
    allowed = 0 < len(tenant) <= 64 and all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in tenant)
    if allowed and not tenant.startswith(_HASHED_TENANT_PREFIX):
        return tenant
    return _HASHED_TENANT_PREFIX + uuid.uuid5(NAMESPACE, tenant).hex


def state_collection(collection: str) -> str:
    return f"{collection}State"


def connect(config: WeaviateConfig) -> weaviate.WeaviateClient:
    parsed = urlparse(config.url)
    if parsed.scheme not in {"http", "https"} or not parsed.hostname:
        raise InvalidArgument(f"the Weaviate URL {config.url!r} must look like http://host:port", reason="BAD_URL")
    secure = parsed.scheme == "https"
    timeout = int(config.timeout_s)
    try:
        return weaviate.connect_to_custom(
            http_host=parsed.hostname,
            http_port=parsed.port or (443 if secure else 80),
            http_secure=secure,
            grpc_host=parsed.hostname,
            grpc_port=config.grpc_port,
            grpc_secure=secure,
            auth_credentials=wvc.init.Auth.api_key(config.api_key) if config.api_key else None,
            additional_config=wvc.init.AdditionalConfig(
                timeout=wvc.init.Timeout(init=min(timeout, 30), query=timeout, insert=timeout)
            ),
        )
    except WeaviateBaseError as error:
        raise unavailable(config, "connect", error) from error


def create_chunk_collection(client: weaviate.WeaviateClient, config: WeaviateConfig) -> None:
    text, array = wvc.config.DataType.TEXT, wvc.config.DataType.TEXT_ARRAY
    field_token = wvc.config.Tokenization.FIELD

    def keyword(name: str) -> wvc.config.Property:
        return wvc.config.Property(
            name=name, data_type=text, tokenization=field_token, index_filterable=True, index_searchable=False
        )

    client.collections.create(
        config.collection,
        description=CHUNKS_DESCRIPTION,
        properties=[
            keyword("chunk_id"),
            keyword("document_id"),
            keyword("generation"),
            wvc.config.Property(name="text", data_type=text, index_filterable=False, index_searchable=False),
            wvc.config.Property(
                name="terms",
                data_type=text,
                tokenization=wvc.config.Tokenization.WHITESPACE,
                index_filterable=False,
                index_searchable=True,
            ),
            wvc.config.Property(name="metadata", data_type=text, index_filterable=False, index_searchable=False),
            wvc.config.Property(
                name="filters",
                data_type=array,
                tokenization=field_token,
                index_filterable=True,
                index_searchable=False,
            ),
        ],
        vector_config=wvc.config.Configure.Vectors.self_provided(
            vector_index_config=wvc.config.Configure.VectorIndex.hnsw(
                distance_metric=wvc.config.VectorDistances.COSINE,
                ef=config.hnsw_ef,
                ef_construction=config.hnsw_ef_construction,
                max_connections=config.hnsw_max_connections,
            )
        ),
        inverted_index_config=wvc.config.Configure.inverted_index(
            bm25_k1=1.2, bm25_b=0.75, stopwords_preset=wvc.config.StopwordsPreset.NONE
        ),
        multi_tenancy_config=wvc.config.Configure.multi_tenancy(enabled=True),
    )


def create_state_collection(client: weaviate.WeaviateClient, name: str) -> None:
    client.collections.create(
        name,
        description="baton: per-tenant visibility state of the chunk collection (baton.store.weaviate)",
        properties=[
            wvc.config.Property(
                name="state", data_type=wvc.config.DataType.TEXT, index_filterable=False, index_searchable=False
            )
        ],
        vector_config=wvc.config.Configure.Vectors.self_provided(),
        multi_tenancy_config=wvc.config.Configure.multi_tenancy(enabled=True),
    )


# --- the server's errors as baton errors -----------------------------------------------------------------------------


def unavailable(config: WeaviateConfig, action: str, error: BaseException) -> Unavailable:
    return Unavailable(
        f"the Weaviate server at {config.url} (gRPC port {config.grpc_port}) did not answer while trying to {action} "
        f"({first_line(str(error))}). Check that it is running and reachable; nothing half-written is visible, "
        "and repeating the request after it is back completes it without duplicates.",
        reason="STORE_UNAVAILABLE",
        retry_after_s=5.0,
    )


def looks_unreachable(message: str) -> bool:
    lowered = message.lower()
    return any(
        cue in lowered
        for cue in ("connection refused", "unavailable", "failed to connect", "connect error", "deadline exceeded")
    )


def about_vector_size(message: str) -> bool:
    lowered = message.lower()
    return "vector" in lowered and ("length" in lowered or "dimension" in lowered)


def first_line(message: str) -> str:
    line = message.strip().splitlines()[0] if message.strip() else "no message"
    return line[:400]


def insert_error(chunk_id: str, message: str, failed: int) -> BatonError:
    """A batch insert's per-object error, as the baton error the caller sees."""
    if about_vector_size(message):
        return InvalidArgument(
            f"chunk {chunk_id!r}: its vector's size does not match the vectors stored in Weaviate ({message})",
            reason="DIMENSION_MISMATCH",
        )
    if looks_unreachable(message):
        return Unavailable(f"Weaviate could not store chunk {chunk_id!r}: {message}", reason="STORE_UNAVAILABLE")
    return UpstreamFailed(
        f"Weaviate refused {failed} chunk(s) of the document, first {chunk_id!r}: {message}; nothing of this write "
        "is visible",
        reason="STORE_WRITE_FAILED",
    )
