"""The embedder's Prometheus metrics (served on the HTTP port's /metrics and, if set, on metrics_port).

Throughput is ``rate(baton_embedder_inputs_total[1m])`` and ``rate(baton_embedder_tokens_total[1m])``; padding
waste is ``1 - tokens_total / padded_tokens_total``; the latency histograms split a request's time into the wait
for a batch and the forward pass.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class EmbedderMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.requests = Counter(
            "baton_embedder_requests", "Requests answered, by route and status.", ["route", "status"], registry=registry
        )
        self.request_seconds = Histogram(
            "baton_embedder_request_seconds",
            "Arrival to answer, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "baton_embedder_queue_seconds",
            "Time a request's inputs waited for a batch.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_seconds = Histogram(
            "baton_embedder_inference_seconds", "One forward batch.", buckets=_LATENCY_BUCKETS, registry=registry
        )
        self.batch_size = Histogram(
            "baton_embedder_batch_size", "Inputs per forward batch.", buckets=_SIZE_BUCKETS, registry=registry
        )
        self.batch_tokens = Histogram(
            "baton_embedder_batch_tokens",
            "Padded tokens per forward batch (count x longest).",
            buckets=_TOKEN_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge("baton_embedder_queue_depth", "Inputs waiting for a batch.", registry=registry)
        self.inputs = Counter("baton_embedder_inputs", "Inputs embedded.", registry=registry)
        self.tokens = Counter("baton_embedder_tokens", "Tokens embedded (without padding).", registry=registry)
        self.padded_tokens = Counter(
            "baton_embedder_padded_tokens", "Tokens computed, padding included.", registry=registry
        )
        self.bulk_streams = Gauge("baton_embedder_bulk_streams", "EmbedStream calls open now.", registry=registry)
        self.lease_held = Gauge(
            "baton_embedder_lease_held", "1 while the embedder holds an EMBEDDING_BULK lease.", registry=registry
        )

    def observe_batch(self, *, size: int, padded_tokens: int, tokens: int, inference_s: float) -> None:
        self.batch_size.observe(size)
        self.batch_tokens.observe(padded_tokens)
        self.inference_seconds.observe(inference_s)
        self.inputs.inc(size)
        self.tokens.inc(tokens)
        self.padded_tokens.inc(padded_tokens)

    def observe_request(self, route: str, status: str, seconds: float) -> None:
        self.requests.labels(route=route, status=status).inc()
        self.request_seconds.labels(route=route).observe(seconds)
