"""The embedder's core: validation, tokenisation off the event loop, dynamic batching, normalisation, limits.

Both transports (gRPC in ``servicer``, TEI HTTP in ``http``) decode a request, call this, and encode the answer; so
both give the same vectors, limits and errors. Nothing here imports grpc or fastapi.

Validation follows TEI, all-or-nothing per request: no inputs or an empty input → ``EmptyInput`` (400); more inputs
than max_client_batch_size → ``InvalidArgument`` BATCH_TOO_LARGE (422); more text than max_request_bytes →
``PayloadTooLarge`` (413); an input over max_input_length without truncate → ``PayloadTooLarge`` INPUT_TOO_LONG
(413 over HTTP, INVALID_ARGUMENT over gRPC) — never a silent cut; a full queue → ``ResourceExhausted`` (429).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np

import baton
from baton.runtime.errors import EmptyInput, InvalidArgument, PayloadTooLarge, Unavailable
from services.embedder.batcher import BatchLimits, DynamicBatcher, Priority
from services.embedder.metrics import EmbedderMetrics
from services.embedder.model import EmbeddingModel, normalize_rows
from services.embedder.tokenization import Direction, InputType, TextEncoder, Tokenization

T = TypeVar("T")


@dataclass(frozen=True)
class ServiceLimits:
    max_batch_tokens: int = 16384
    max_batch_requests: int | None = None
    max_client_batch_size: int = 32
    max_concurrent_requests: int = 512
    max_request_bytes: int = 4_000_000


@dataclass(frozen=True)
class EmbedOptions:
    normalize: bool = True
    truncate: bool = False
    truncation_direction: Direction = "right"
    prompt_name: str | None = None  # a prompt of the model by name; wins over input_type
    input_type: InputType | None = None  # which side: None = query for embed(), passage for embed_bulk()
    dimensions: int | None = None  # None: the model's dim


@dataclass(frozen=True)
class Timings:
    tokenization_s: float
    queue_s: float
    inference_s: float
    total_s: float


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # float32, (inputs, dim), input order
    token_counts: list[int]
    truncated: list[bool]
    model_id: str
    timings: Timings

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)


@dataclass(frozen=True)
class EmbedderInfo:
    """The Info RPC / GET /info: the model and the service's limits."""

    model_id: str
    model_path: str
    model_sha: str
    dim: int
    supports_dimensions: bool
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    max_concurrent_requests: int
    languages: list[str]
    dtype: str
    device: str
    backend: str
    pooling: str
    similarity: str
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str = ""
    uses_gpu_lease: bool = False
    version: str = baton.__version__


class BulkGate(Protocol):
    """What bulk (EmbedStream) work must hold: an EMBEDDING_BULK GPU lease on a GPU, nothing on a CPU."""

    @property
    def uses_gpu_lease(self) -> bool: ...

    def hold(self) -> AbstractAsyncContextManager[None]:
        """Held for the life of one bulk stream."""
        ...

    def use(self) -> AbstractAsyncContextManager[None]:
        """Held around one bulk request: entering waits until the GPU is surely ours."""
        ...


@dataclass(frozen=True)
class _Loaded:
    """What exists once the model is loaded."""

    model: EmbeddingModel
    encoder: TextEncoder
    batcher: DynamicBatcher


class NoGate:
    """CPU inference needs no lease."""

    uses_gpu_lease = False

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        yield

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[None]:
        yield


class EmbedderCore:
    """Create, then ``await start(model, gate)`` once the model is loaded; until then every call is UNAVAILABLE."""

    def __init__(
        self,
        limits: ServiceLimits,
        metrics: EmbedderMetrics,
        *,
        supports_dimensions: bool = False,
        tokenizer_threads: int = 2,
    ) -> None:
        self.limits = limits
        self.metrics = metrics
        self._supports_dimensions = supports_dimensions
        self._tokenizer_pool = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="embedder-tokenizer")
        self._loaded: _Loaded | None = None
        self._gate: BulkGate = NoGate()

    # ---------------------------------------------------------------------------------------------- lifecycle

    async def start(self, model: EmbeddingModel, gate: BulkGate | None = None) -> None:
        card = model.card
        if self.limits.max_batch_tokens < card.max_input_length:
            raise InvalidArgument(
                f"max_batch_tokens ({self.limits.max_batch_tokens}) is below the model's max_input_length "
                f"({card.max_input_length}): one full input would not fit a batch; raise --max-batch-tokens"
            )
        encoder = TextEncoder(model.tokenizer, card.max_input_length, card.prompts)
        limits = BatchLimits(
            self.limits.max_batch_tokens, self.limits.max_batch_requests, self.limits.max_concurrent_requests
        )
        batcher = DynamicBatcher(model.embed_inputs, limits, self.metrics)
        batcher.start()
        self._gate = gate or NoGate()
        self._loaded = _Loaded(model, encoder, batcher)

    async def close(self) -> None:
        if self._loaded is not None:
            await self._loaded.batcher.close()
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return self._loaded is not None

    def info(self) -> EmbedderInfo:
        card = self._require_ready().model.card
        return EmbedderInfo(
            model_id=card.model_id,
            model_path=card.model_path,
            model_sha=card.model_sha,
            dim=card.dim,
            supports_dimensions=self._supports_dimensions,
            max_input_length=card.max_input_length,
            max_batch_tokens=self.limits.max_batch_tokens,
            max_batch_requests=self.limits.max_batch_requests,
            max_client_batch_size=self.limits.max_client_batch_size,
            max_concurrent_requests=self.limits.max_concurrent_requests,
            languages=list(card.languages),
            dtype=card.dtype,
            device=card.device,
            backend=card.backend,
            pooling=card.pooling,
            similarity=card.similarity,
            prompts=dict(card.prompts),
            default_prompt_name=card.default_prompt_name or "",
            uses_gpu_lease=self._gate.uses_gpu_lease,
        )

    # ---------------------------------------------------------------------------------------------- embedding

    async def embed(self, texts: Sequence[str], options: EmbedOptions = EmbedOptions()) -> Embeddings:
        """An interactive request (a search query, unless ``input_type`` says passage): ahead of bulk work."""
        self._validate_request(texts, options)
        return await self._embed(texts, options, Priority.INTERACTIVE, "query")

    async def embed_bulk(self, texts: Sequence[str], options: EmbedOptions = EmbedOptions()) -> Embeddings:
        """One request of a bulk stream (passages, unless ``input_type`` says query): behind interactive traffic,
        and only while the GPU is ours."""
        self._validate_request(texts, options)  # a bad request must not wait for the lease only to be refused
        async with self._gate.use():
            return await self._embed(texts, options, Priority.BULK, "passage")

    def prompt_for(self, prompt_name: str | None, input_type: InputType | None) -> str | None:
        """The prompt a request's prompt_name and input_type select (None: no prompt); UNKNOWN_PROMPT_NAME if named
        and missing."""
        loaded = self._require_ready()
        return loaded.encoder.resolve_prompt(prompt_name, input_type, loaded.model.card.default_prompt_name)

    async def _embed(
        self, texts: Sequence[str], options: EmbedOptions, priority: Priority, default_side: InputType
    ) -> Embeddings:
        started = time.monotonic()
        loaded = self._require_ready()
        card = loaded.model.card
        prompt_name = self.prompt_for(options.prompt_name, options.input_type or default_side)
        encode = functools.partial(
            loaded.encoder.encode,
            texts,
            prompt_name=prompt_name,
            truncate=options.truncate,
            direction=options.truncation_direction,
        )
        encoded = await self._off_loop(encode)
        tokenized_at = time.monotonic()
        result = await loaded.batcher.submit(encoded, priority)
        self.metrics.queue_seconds.observe(result.queue_s)
        vectors = _shape(result.vectors, options.dimensions, normalize=options.normalize)
        timings = Timings(
            tokenization_s=tokenized_at - started,
            queue_s=result.queue_s,
            inference_s=result.inference_s,
            total_s=time.monotonic() - started,
        )
        return Embeddings(
            vectors=vectors,
            token_counts=[item.token_count for item in encoded],
            truncated=[item.truncated for item in encoded],
            model_id=card.model_id,
            timings=timings,
        )

    @contextlib.asynccontextmanager
    async def bulk(self) -> AsyncIterator[None]:
        """Hold for the life of a bulk stream (the GPU lease, where one is needed)."""
        self._require_ready()
        self.metrics.bulk_streams.inc()
        try:
            async with self._gate.hold():
                yield
        finally:
            self.metrics.bulk_streams.dec()

    # ---------------------------------------------------------------------------------------------- tokens

    async def tokenize(
        self,
        texts: Sequence[str],
        *,
        add_special_tokens: bool = True,
        prompt_name: str | None = None,
        input_type: InputType | None = None,
        include_tokens: bool = False,
    ) -> list[Tokenization]:
        """Never prompted unless asked: by prompt_name, or by input_type (the prompt Embed would use for it)."""
        encoder = self._require_ready().encoder
        self._validate_texts(texts)
        tokenize = functools.partial(
            encoder.tokenize,
            texts,
            add_special_tokens=add_special_tokens,
            prompt_name=self._counted_prompt(prompt_name, input_type),
            include_tokens=include_tokens,
        )
        return await self._off_loop(tokenize)

    async def count_tokens(
        self,
        texts: Sequence[str],
        *,
        add_special_tokens: bool = True,
        prompt_name: str | None = None,
        input_type: InputType | None = None,
    ) -> list[int]:
        encoder = self._require_ready().encoder
        self._validate_texts(texts)
        prompt = self._counted_prompt(prompt_name, input_type)
        count = functools.partial(encoder.count, texts, add_special_tokens=add_special_tokens, prompt_name=prompt)
        return await self._off_loop(count)

    def _counted_prompt(self, prompt_name: str | None, input_type: InputType | None) -> str | None:
        return self.prompt_for(prompt_name, input_type) if prompt_name is not None or input_type else None

    # ---------------------------------------------------------------------------------------------- helpers

    def _require_ready(self) -> _Loaded:
        if self._loaded is None:
            raise Unavailable("the embedding model is still loading; retry shortly", reason="LOADING", retry_after_s=2)
        return self._loaded

    async def _off_loop(self, work: functools.partial[T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, work)

    def _validate_request(self, texts: Sequence[str], options: EmbedOptions) -> None:
        loaded = self._require_ready()
        self._validate_batch(texts)
        self._validate_dimensions(options.dimensions, loaded.model.card.dim)
        loaded.encoder.check_prompt(options.prompt_name)

    def _validate_texts(self, texts: Sequence[str]) -> None:
        if not texts:
            raise EmptyInput("no inputs: send at least one text", reason="EMPTY_INPUT")
        size = sum(len(text.encode("utf-8")) for text in texts)
        if size > self.limits.max_request_bytes:
            raise PayloadTooLarge(
                f"the request carries {size} bytes of text, more than the limit of {self.limits.max_request_bytes}; "
                "split it into several requests",
                metadata={"bytes": str(size), "max_request_bytes": str(self.limits.max_request_bytes)},
            )

    def _validate_batch(self, texts: Sequence[str]) -> None:
        if not texts:
            raise EmptyInput("no inputs: send at least one non-empty text", reason="EMPTY_INPUT")
        if len(texts) > self.limits.max_client_batch_size:
            raise InvalidArgument(
                f"{len(texts)} inputs in one request; the limit is max_client_batch_size="
                f"{self.limits.max_client_batch_size}: split the batch",
                reason="BATCH_TOO_LARGE",
                metadata={"inputs": str(len(texts)), "max_client_batch_size": str(self.limits.max_client_batch_size)},
            )
        for index, text in enumerate(texts):
            if not text:
                raise EmptyInput(
                    f"input {index} is an empty string; remove it or send some text",
                    reason="EMPTY_INPUT",
                    metadata={"index": str(index)},
                )
        self._validate_texts(texts)

    def _validate_dimensions(self, dimensions: int | None, dim: int) -> None:
        if dimensions is None or dimensions == dim:
            return
        if not self._supports_dimensions:
            raise InvalidArgument(
                f"this model does not support `dimensions` (it is not Matryoshka-trained); omit it or ask for {dim}",
                reason="DIMENSIONS_UNSUPPORTED",
            )
        if not 1 <= dimensions <= dim:
            raise InvalidArgument(
                f"dimensions must be between 1 and {dim}, got {dimensions}",
                reason="INVALID_DIMENSIONS",
                metadata={"dimensions": str(dimensions), "dim": str(dim)},
            )


def _shape(vectors: np.ndarray, dimensions: int | None, *, normalize: bool) -> np.ndarray:
    """Matryoshka cut first, then normalise: a cut vector is re-normalised, as the proto says."""
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    vectors = normalize_rows(vectors) if normalize else vectors
    return np.ascontiguousarray(vectors, dtype=np.float32)
