"""The embedder's core in the calling process, for batch jobs (``baton store reembed``).

It loads the model as the service would (``EmbedderSettings``: the same model, backend and id, so the same
identity) and embeds through the same core (prompts, limits, batching), so its vectors are the ones the service
gives — without a second service to start while the first one keeps serving.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
from prometheus_client import CollectorRegistry

from services.embedder.backends import load_model
from services.embedder.core import EmbedderCore, EmbedOptions, ServiceLimits
from services.embedder.metrics import EmbedderMetrics
from services.embedder.model import ModelCard
from services.embedder.server import load_options
from services.embedder.settings import EmbedderSettings

# Inputs per core request: the core's batcher packs them by tokens anyway.
REQUEST_INPUTS = 64


class LocalEmbedder:
    def __init__(self, settings: EmbedderSettings) -> None:
        model = load_model(load_options(settings))
        self.card: ModelCard = model.card
        limits = ServiceLimits(
            max_batch_tokens=settings.max_batch_tokens,
            max_client_batch_size=REQUEST_INPUTS,
            max_request_bytes=settings.max_request_bytes,
        )
        self._core = EmbedderCore(limits, EmbedderMetrics(CollectorRegistry()))
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._core.start(model))

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors of chunks (the passage side), in order. An input over the model's limit is refused
        (INPUT_TOO_LONG), never cut."""
        return self._loop.run_until_complete(self._embed(texts))

    async def _embed(self, texts: Sequence[str]) -> np.ndarray:
        options = EmbedOptions(input_type="passage")
        parts = [
            self._core.embed_bulk(texts[start : start + REQUEST_INPUTS], options)
            for start in range(0, len(texts), REQUEST_INPUTS)
        ]
        answers = await asyncio.gather(*parts)
        return np.vstack([answer.vectors for answer in answers]) if answers else np.zeros((0, self.card.dim))

    def close(self) -> None:
        self._loop.run_until_complete(self._core.close())
        self._loop.close()
