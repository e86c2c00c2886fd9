"""The inference service's Prometheus metrics (served on metrics_port's /metrics).

Tokens/s is ``rate(baton_inference_generated_tokens_total[1m])``; time to first token and per-request decode speed
are histograms; the queue, running requests, adapters and the lease are gauges; every sleep and wake is timed, so the
Grafana GPU timeline can show what a handover cost.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
_STATES = ("loading", "awake", "sleeping", "waking", "yielding", "failed")


class InferenceMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.requests = Counter(
            "baton_inference_requests",
            "Generate requests answered, by outcome (ok, aborted, or the error reason) and adapter ('' = base).",
            ["outcome", "adapter"],
            registry=registry,
        )
        self.prompt_tokens = Counter("baton_inference_prompt_tokens", "Prompt tokens processed.", registry=registry)
        self.generated_tokens = Counter(
            "baton_inference_generated_tokens", "Tokens generated (rate() of it is tokens/s).", registry=registry
        )
        self.time_to_first_token = Histogram(
            "baton_inference_time_to_first_token_seconds",
            "Arrival to the first generated token (queue and wake included).",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "baton_inference_queue_seconds",
            "Time a request waited for a slot, the lease and the wake.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.decode_tokens_per_second = Histogram(
            "baton_inference_decode_tokens_per_second",
            "Per request: generated tokens after the first, divided by the time they took.",
            buckets=_RATE_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge("baton_inference_queue_depth", "Requests waiting now.", registry=registry)
        self.running = Gauge("baton_inference_running_requests", "Requests generating now.", registry=registry)
        self.adapters_loaded = Gauge("baton_inference_adapters_loaded", "Adapters served now.", registry=registry)
        self.adapter_load_seconds = Histogram(
            "baton_inference_adapter_load_seconds",
            "LoadAdapter: validation plus loading into the engine.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.sleep_seconds = Histogram(
            "baton_inference_sleep_seconds",
            "Yielding the GPU: drain, engine sleep (or stop) and lease release.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.wake_seconds = Histogram(
            "baton_inference_wake_seconds",
            "Waking: lease wait plus engine wake (or restart) and adapters re-added.",
            ["phase"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.lease_held = Gauge(
            "baton_inference_lease_held", "1 while the service holds the SERVING lease.", registry=registry
        )
        self.state = Gauge(
            "baton_inference_state",
            "1 for the service's current state, 0 for the others.",
            ["state"],
            registry=registry,
        )

    def set_state(self, state: str) -> None:
        for name in _STATES:
            self.state.labels(name).set(1 if name == state else 0)
