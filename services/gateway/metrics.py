"""Memory metrics on the gateway's /metrics (the default registry): ingest progress and search latency.

The Grafana "Memory" dashboard draws ingest progress from the documents counter (by outcome) and the pending gauge,
stored chunks from the chunk counter, and search latency from the histogram (chat retrieval has its own, in
``chat/metrics.py``). Embedding throughput comes from the embedder's own ``baton_embedder_*`` metrics.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

INGEST_DOCUMENTS = Counter(
    "baton_gateway_ingest_documents",
    "Documents ingested, by outcome (added, updated, unchanged, duplicate, deleted, failed).",
    ["status"],
)
INGEST_CHUNKS = Counter("baton_gateway_ingest_chunks", "Chunks written to the store by ingests.")
INGEST_PENDING = Gauge("baton_gateway_ingest_documents_pending", "Documents of running ingests not processed yet.")
QUERY_CACHE = Counter(
    "baton_gateway_query_cache", "Query-vector cache lookups of memory searches, by result (hit or miss).", ["result"]
)
SEARCH_SECONDS = Histogram(
    "baton_gateway_search_seconds",
    "One memory search (query embedding and store search), by mode.",
    ["mode"],
    buckets=_LATENCY_BUCKETS,
)


def count_ingested(status: str, chunks: int) -> None:
    INGEST_DOCUMENTS.labels(status).inc()
    INGEST_CHUNKS.inc(chunks)
