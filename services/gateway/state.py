"""Everything the gateway's routes use, built once from settings at start-up and closed at shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from baton.clients.embedder import EmbedderClient, RemoteTokenizer
from baton.runtime.errors import BatonError, Unavailable
from baton.runtime.logging import log_event
from baton.store.base import VectorStore
from baton.store.embedded import EmbeddedStore
from services.gateway.catalog import Catalog
from services.gateway.ingest.chunker import ChunkingConfig
from services.gateway.ingest.pipeline import IngestLimits, IngestPipeline
from services.gateway.jobs import IngestJobs
from services.gateway.retrieval import Retriever
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


@dataclass
class GatewayState:
    settings: GatewaySettings
    catalog: Catalog
    store: VectorStore
    embedder: EmbedderClient
    pipeline: IngestPipeline
    retriever: Retriever
    jobs: IngestJobs
    embedder_model: str

    @classmethod
    async def open(cls, settings: GatewaySettings, *, embedder_wait_s: float = 120.0) -> GatewayState:
        embedder = EmbedderClient(settings.embedder_addr)
        info = await _wait_for_embedder(embedder, embedder_wait_s)
        tokenizer = await RemoteTokenizer.create(embedder)
        # A chunk longer than the embedder's input is a configuration error here, at start-up, never a truncation.
        chunking = ChunkingConfig(settings.chunk_tokens, settings.chunk_overlap_tokens).resolve(
            tokenizer.max_input_length, tokenizer.special_tokens_count
        )
        catalog = Catalog(settings.resolved_catalog_path())
        store = EmbeddedStore(settings.resolved_store_path())
        limits = IngestLimits(settings.max_document_bytes, settings.ingest_concurrency)
        pipeline = IngestPipeline(catalog, store, embedder, tokenizer, chunking, limits)
        retriever = Retriever(store, embedder, list(info.languages), settings.max_search_k)
        log_event(
            log,
            "gateway.ready",
            embedder=info.model_id,
            languages=",".join(info.languages) or "-",
            chunk_tokens=chunking.chunk_tokens,
            store=settings.resolved_store_path(),
        )
        jobs = IngestJobs(catalog, pipeline)
        return cls(settings, catalog, store, embedder, pipeline, retriever, jobs, info.model_id)

    async def close(self) -> None:
        await self.jobs.close()
        await self.embedder.close()
        self.store.close()
        self.catalog.close()


async def _wait_for_embedder(embedder: EmbedderClient, wait_s: float):  # noqa: ANN202 (proto message type)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await embedder.info()
        except BatonError as error:
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"the embedder at {embedder.target} did not answer within {wait_s:g} s ({error.message}); "
                    "start it (baton serve embedder) or set BATON_GATEWAY_EMBEDDER_ADDR"
                ) from error
            await asyncio.sleep(0.5)
