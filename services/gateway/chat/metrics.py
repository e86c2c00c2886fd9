"""Chat metrics on the gateway's /metrics (the default registry).

Gateway overhead per request is ``baton_gateway_chat_overhead_seconds`` (the request's whole time in the gateway
minus the inference service's own ``total_s``), split by whether memory was used; time to first token is measured
from the request's arrival, so it includes retrieval and packing.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)

REQUESTS = Counter(
    "baton_gateway_chat_requests",
    "Chat completions answered, by outcome (ok or the error's reason), streaming or not, and memory on or off.",
    ["outcome", "stream", "rag"],
)
REQUEST_SECONDS = Histogram(
    "baton_gateway_chat_request_seconds",
    "Arrival to the last byte of a chat completion.",
    ["stream", "rag"],
    buckets=_LATENCY_BUCKETS,
)
OVERHEAD_SECONDS = Histogram(
    "baton_gateway_chat_overhead_seconds",
    "A chat completion's time in the gateway minus the inference service's own time.",
    ["rag"],
    buckets=_LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN_SECONDS = Histogram(
    "baton_gateway_chat_time_to_first_token_seconds",
    "Arrival to the first generated text, retrieval and packing included.",
    ["rag"],
    buckets=_LATENCY_BUCKETS,
)
RETRIEVAL_SECONDS = Histogram(
    "baton_gateway_chat_retrieval_seconds",
    "Embedding the question and searching memory for a chat.",
    buckets=_LATENCY_BUCKETS,
)
PACKING_SECONDS = Histogram(
    "baton_gateway_chat_packing_seconds",
    "Fitting the retrieved chunks into the context budget (token counting included).",
    buckets=_LATENCY_BUCKETS,
)
CONTEXT_TOKENS = Histogram(
    "baton_gateway_chat_prompt_tokens",
    "Prompt tokens of a chat with sources (history, question and packed sources).",
    buckets=_TOKEN_BUCKETS,
)
