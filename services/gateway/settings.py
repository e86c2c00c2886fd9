"""Gateway settings (env prefix BATON_GATEWAY_)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator

from baton.runtime.settings import CommonSettings, service_config
from services.gateway.auth import check_admin_key

if TYPE_CHECKING:
    from baton.store.weaviate import WeaviateConfig


class GatewaySettings(CommonSettings):
    model_config = service_config("gateway")

    port: int = Field(8000, ge=0, le=65535, description="HTTP port of the public API.")
    embedder_addr: str = Field("127.0.0.1:50061", description="gRPC address of the embedder service.")
    store: Literal["embedded", "weaviate"] = Field(
        "embedded", description="Vector store backend: embedded (one directory) or weaviate (a Weaviate server)."
    )
    store_path: Path | None = Field(None, description="Embedded store directory [home/store].")
    weaviate_url: str = Field("http://127.0.0.1:8080", description="store=weaviate: the server's REST URL.")
    weaviate_grpc_port: int = Field(50051, ge=1, le=65535, description="store=weaviate: the server's gRPC port.")
    weaviate_api_key: SecretStr | None = Field(
        None, description="store=weaviate: API key, when the server requires one (empty = anonymous)."
    )
    weaviate_collection: str = Field(
        "BatonChunks",
        pattern=r"^[A-Z][A-Za-z0-9_]*$",
        description="store=weaviate: the collection of chunks (<name>State is created beside it).",
    )
    catalog_path: Path | None = Field(None, description="Catalog SQLite file [home/catalog.sqlite].")
    allowed_roots: list[Path] = Field(
        default_factory=list,
        description="Server-side folders that POST /v1/documents may ingest by path (comma-separated; "
        "empty = ingest by path is off, uploads only).",
    )
    max_document_bytes: int = Field(100 * 1024 * 1024, gt=0, description="Largest document accepted, in bytes.")
    max_upload_bytes: int = Field(512 * 1024 * 1024, gt=0, description="Largest upload request, in bytes.")
    chunk_tokens: int | None = Field(
        None,
        gt=0,
        description="Tokens per chunk (default: min(512, the embedder's max input)); above the "
        "embedder's max input is a configuration error.",
    )
    chunk_overlap_tokens: int = Field(64, ge=0, description="Tokens shared by neighbouring chunks.")
    ingest_concurrency: int = Field(4, ge=1, le=64, description="Documents processed at once during ingest.")
    max_search_k: int = Field(1000, ge=1, description="Largest k a search may ask for.")
    query_cache_size: int = Field(
        4096,
        ge=0,
        description="Query vectors kept for repeated searches (least recently used out; 0 = off). "
        "About 1.5 KB each at 384 dimensions.",
    )
    inference_addr: str = Field(
        "127.0.0.1:50062", description="gRPC address of the inference service (chat and /v1/models)."
    )
    chat_rag: bool = Field(
        True, description="Chat answers from the tenant's memory unless a request sets baton.rag=false."
    )
    chat_k: int = Field(8, ge=1, le=1000, description="Chunks retrieved per chat question (a request's baton.k wins).")
    chat_grounding: float = Field(
        0.5,
        ge=0,
        le=10,
        description="Context-aware decoding with memory: each token is chosen by (1 + w) x what the model says with "
        "the sources - w x what it says without them, so the sources' facts win over what it would say anyway "
        "(measured: more answers right on XQuAD-en with SmolLM2). 0 = off; only on engines that run it (hf); a "
        "request's baton.grounding wins.",
    )
    chat_answer_tokens: int = Field(
        512,
        ge=1,
        description="Tokens kept free for the answer when packing sources and a request sets no max_tokens "
        "(at most half the context).",
    )
    local_token_counts: bool = Field(
        True,
        description="Count tokens for packing with the served model's tokenizer loaded here, when the inference "
        "service's model folder is readable on this machine and its tokenizer files hash alike (else, or when off, "
        "ask the service: one or two RPCs per chat).",
    )
    trainer_addr: str = Field(
        "127.0.0.1:50063", description="gRPC address of the trainer service (/v1/training/jobs, /v1/adapters)."
    )
    scheduler_addr: str = Field("127.0.0.1:50060", description="gRPC address of the GPU-lease scheduler (/v1/gpu).")
    train_base_model_path: Path | None = Field(
        None, description="Base model folder new training jobs use [the folder the inference service serves]."
    )
    gpu_policy: Literal["preempt", "queue"] = Field(
        "preempt",
        description="A chat while training holds the GPU: preempt = the chat takes the GPU (training checkpoints and "
        "resumes later); queue = the chat waits for training, 503 + Retry-After past queue_max_wait_s.",
    )
    queue_max_wait_s: float = Field(
        30.0, ge=0, description="queue policy: longest a chat waits for the GPU (a longer ETA is refused at once)."
    )
    serving_idle_s: float = Field(
        30.0,
        ge=0,
        description="Put the inference service to sleep (releasing the GPU) when it has been idle this long and "
        "training waits for the GPU; 0 = never.",
    )
    admin_key: SecretStr | None = Field(
        None,
        description="The admin API key (creates users and keys; at least 32 random characters). Overrides "
        "admin_key_file.",
    )
    admin_key_file: Path | None = Field(
        None,
        description="File holding the admin key [home/admin.key, written by `baton up`]; with neither a key nor "
        "the file, users and keys cannot be managed.",
    )

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for part in value.split(",") if part.strip()]
        return value

    @field_validator("admin_key", mode="before")
    @classmethod
    def _refuse_weak_admin_key(cls, value: object) -> object:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if raw is None or raw == "":
            return None  # an empty variable means unset
        return check_admin_key(str(raw))

    def resolved_admin_key_file(self) -> Path:
        return self.admin_key_file or self.home / "admin.key"

    def resolved_store_path(self) -> Path:
        return self.store_path or self.home / "store"

    def resolved_catalog_path(self) -> Path:
        return self.catalog_path or self.home / "catalog.sqlite"

    def weaviate_config(self) -> WeaviateConfig:
        """store=weaviate: the server and collection these settings name (for the gateway and ``baton store``)."""
        from baton.store.weaviate import WeaviateConfig  # the Weaviate client loads only where it is used

        key = self.weaviate_api_key.get_secret_value() if self.weaviate_api_key else None
        return WeaviateConfig(
            url=self.weaviate_url,
            grpc_port=self.weaviate_grpc_port,
            api_key=key or None,
            collection=self.weaviate_collection,
        )
