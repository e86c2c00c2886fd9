"""Everything the gateway's routes use, built once from settings at start-up and closed at shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from baton.clients.embedder import EmbedderClient, RemoteTokenizer
from baton.clients.inference import InferenceClient
from baton.clients.trainer import TrainerClient
from baton.lease.client import LeaseClient
from baton.runtime.errors import BatonError, Unavailable
from baton.runtime.logging import log_event
from baton.store.base import VectorStore
from baton.store.embedded import EmbeddedStore
from baton.store.reembed import (
    REEMBED_REMEDY,
    WEAVIATE_REMEDY,
    check_store_model,
    model_identity,
    swap_in_reembedded,
)
from services.gateway.auth import KeyStore, load_admin_key
from services.gateway.catalog import Catalog
from services.gateway.chat.service import ChatService
from services.gateway.gpu import GpuArbiter, GpuView
from services.gateway.ingest.chunker import ChunkingConfig
from services.gateway.ingest.pipeline import IngestLimits, IngestPipeline
from services.gateway.jobs import IngestJobs
from services.gateway.retrieval import QueryVectorCache, Retriever
from services.gateway.settings import GatewaySettings
from services.gateway.training import TrainingService

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
    auth: KeyStore
    inference: InferenceClient
    chat: ChatService
    training: TrainingService | None = None
    gpu: GpuView | None = None
    arbiter: GpuArbiter | None = None

    @classmethod
    async def open(cls, settings: GatewaySettings, *, embedder_wait_s: float = 120.0) -> GatewayState:
        auth = open_key_store(settings)  # first: a bad admin key is a configuration error, reported at once
        embedder = EmbedderClient(settings.embedder_addr)
        info = await _wait_for_embedder(embedder, embedder_wait_s)
        tokenizer = await RemoteTokenizer.create(embedder)
        # A chunk longer than the embedder's input is a configuration error here, at start-up, never a truncation.
        chunking = ChunkingConfig(settings.chunk_tokens, settings.chunk_overlap_tokens).resolve(
            tokenizer.max_input_length, tokenizer.special_tokens_count
        )
        catalog = Catalog(settings.resolved_catalog_path())
        store = await open_checked_store(settings, embedder, model_identity(info.model_id, info.model_sha))
        limits = IngestLimits(settings.max_document_bytes, settings.ingest_concurrency)
        # Cleaned texts for the trainer (documents datasets): BATON_HOME/texts/<content_hash>.txt.
        pipeline = IngestPipeline(catalog, store, embedder, tokenizer, chunking, limits, settings.home / "texts")
        query_cache = QueryVectorCache(settings.query_cache_size)
        retriever = Retriever(store, embedder, list(info.languages), settings.max_search_k, query_cache)
        log_event(
            log,
            "gateway.ready",
            embedder=info.model_id,
            languages=",".join(info.languages) or "-",
            chunk_tokens=chunking.chunk_tokens,
            store=settings.resolved_store_path() if settings.store == "embedded" else settings.weaviate_url,
        )
        jobs = IngestJobs(catalog, pipeline)
        # Not awaited here: the gateway serves memory without the inference service; chat says 503 until it answers.
        inference = InferenceClient(settings.inference_addr)
        chat = ChatService(
            inference,
            retriever,
            answer_tokens=settings.chat_answer_tokens,
            local_token_counts=settings.local_token_counts,
        )
        state = cls(settings, catalog, store, embedder, pipeline, retriever, jobs, info.model_id, auth, inference, chat)
        state.open_training()
        return state

    def open_training(self) -> None:
        """Trainer and scheduler clients (not awaited: training and /v1/gpu say 503 until those services answer)."""
        settings = self.settings
        trainer, leases = TrainerClient(settings.trainer_addr), LeaseClient(settings.scheduler_addr)
        self.training = TrainingService(
            trainer,
            self.inference,
            data_dir=settings.home / "training-data",
            base_model_path=settings.train_base_model_path,
        )
        self.gpu = GpuView(leases, trainer, policy=settings.gpu_policy, queue_max_wait_s=settings.queue_max_wait_s)
        self.arbiter = GpuArbiter(leases, self.inference, idle_s=settings.serving_idle_s)
        self.arbiter.start()

    async def close(self) -> None:
        if self.arbiter is not None:
            await self.arbiter.close()
        if self.gpu is not None:
            await self.gpu.trainer.close()
            await self.gpu.leases.close()
        await self.jobs.close()
        await self.embedder.close()
        await self.inference.close()
        self.store.close()
        self.catalog.close()
        self.auth.close()


def open_key_store(settings: GatewaySettings) -> KeyStore:
    """Users and keys live beside the documents in the catalog's SQLite file (their own tables)."""
    secret = settings.admin_key.get_secret_value() if settings.admin_key else None
    key_file = settings.resolved_admin_key_file()
    admin_key = load_admin_key(secret, key_file, file_required=settings.admin_key_file is not None)
    if admin_key is None:
        log_event(log, "auth.no_admin_key", level=logging.WARNING, looked_in=key_file,
                  hint="users and keys cannot be managed; set BATON_GATEWAY_ADMIN_KEY or write that file")  # fmt: skip
    return KeyStore(settings.resolved_catalog_path(), admin_key)


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


async def open_checked_store(settings: GatewaySettings, embedder: EmbedderClient, identity: str) -> VectorStore:
    """The store, holding vectors of the embedder's model only: a finished re-embedding for this model is swapped
    in first; a store of another model is refused (EMBEDDING_MODEL_MISMATCH, naming `baton store reembed`)."""
    if settings.store == "embedded":
        retired = swap_in_reembedded(settings.resolved_store_path(), identity)
        if retired is not None:
            log_event(log, "gateway.store_swapped", model=identity, previous=str(retired))
    store = open_store(settings)
    if settings.store == "weaviate":
        where, remedy = f"{settings.weaviate_url} (collection {settings.weaviate_collection})", WEAVIATE_REMEDY
    else:
        where, remedy = str(settings.resolved_store_path()), REEMBED_REMEDY
    try:
        await check_store_model(
            store, identity, lambda texts: embedder.embed(texts, input_type="passage"), where=where, remedy=remedy
        )
    except BaseException:
        store.close()
        raise
    return store


def open_store(settings: GatewaySettings) -> VectorStore:
    """The vector store the settings name: the embedded one in a directory, or a Weaviate server."""
    if settings.store == "weaviate":
        from baton.store.weaviate import WeaviateStore

        return WeaviateStore(settings.weaviate_config())
    return EmbeddedStore(settings.resolved_store_path())
