"""The Embedder gRPC servicer: decode, call the core, encode. No batching or validation logic lives here."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc

from baton.runtime.errors import BatonError, InvalidArgument, grpc_errors
from baton.v1 import embedder_pb2, embedder_pb2_grpc
from services.embedder.core import EmbedderCore, EmbedderInfo, Embeddings, EmbedOptions
from services.embedder.metrics import EmbedderMetrics
from services.embedder.tokenization import InputType, Tokenization

# Requests of one bulk stream being embedded at once: enough to fill several batches, bounded so that one stream
# cannot take the whole queue (max_concurrent_requests) from the others.
STREAM_WINDOW = 16

_StreamEntry = tuple[int, str, "asyncio.Task[Embeddings]"]  # sequence, request_id, the work


class EmbedderServicer(embedder_pb2_grpc.EmbedderServicer):
    def __init__(self, core: EmbedderCore, metrics: EmbedderMetrics) -> None:
        self._core = core
        self._metrics = metrics

    @grpc_errors
    async def Embed(
        self, request: embedder_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> embedder_pb2.EmbedResponse:
        with observed(self._metrics, "grpc/Embed"):
            embeddings = await self._core.embed(list(request.inputs), options_from_proto(request))
            return embed_response(embeddings, request.request_id)

    @grpc_errors
    async def EmbedStream(
        self, requests: AsyncIterator[embedder_pb2.EmbedStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[embedder_pb2.EmbedStreamResponse]:
        with observed(self._metrics, "grpc/EmbedStream"):
            async with self._core.bulk():
                # Requests are embedded concurrently (so the batcher can merge them) and answered in order.
                pending: asyncio.Queue[_StreamEntry | None] = asyncio.Queue(maxsize=STREAM_WINDOW)
                reader = asyncio.create_task(self._read_stream(requests, pending))
                try:
                    while (entry := await pending.get()) is not None:
                        yield await stream_answer(*entry)
                    await reader  # a broken request stream ends the call with its error
                finally:
                    await _cancel_all(reader, pending)

    async def _read_stream(
        self, requests: AsyncIterator[embedder_pb2.EmbedStreamRequest], pending: asyncio.Queue[_StreamEntry | None]
    ) -> None:
        try:
            async for message in requests:
                request = message.request
                task = asyncio.create_task(self._core.embed_bulk(list(request.inputs), options_from_proto(request)))
                await pending.put((message.sequence, request.request_id, task))
        finally:
            await pending.put(None)

    @grpc_errors
    async def Tokenize(
        self, request: embedder_pb2.EmbedderTokenizeRequest, context: grpc.aio.ServicerContext
    ) -> embedder_pb2.EmbedderTokenizeResponse:
        with observed(self._metrics, "grpc/Tokenize"):
            tokenizations = await self._core.tokenize(
                list(request.inputs),
                add_special_tokens=request.add_special_tokens if request.HasField("add_special_tokens") else True,
                prompt_name=request.prompt_name if request.HasField("prompt_name") else None,
                input_type=input_type_from_proto(request.input_type),
                include_tokens=request.include_tokens,
            )
            return embedder_pb2.EmbedderTokenizeResponse(
                tokenizations=[tokenization_to_proto(t) for t in tokenizations],
                max_input_length=self._core.info().max_input_length,
            )

    @grpc_errors
    async def CountTokens(
        self, request: embedder_pb2.EmbedderCountTokensRequest, context: grpc.aio.ServicerContext
    ) -> embedder_pb2.EmbedderCountTokensResponse:
        with observed(self._metrics, "grpc/CountTokens"):
            counts = await self._core.count_tokens(
                list(request.inputs),
                add_special_tokens=request.add_special_tokens if request.HasField("add_special_tokens") else True,
                prompt_name=request.prompt_name if request.HasField("prompt_name") else None,
                input_type=input_type_from_proto(request.input_type),
            )
            return embedder_pb2.EmbedderCountTokensResponse(
                token_counts=counts, total_tokens=sum(counts), max_input_length=self._core.info().max_input_length
            )

    @grpc_errors
    async def Info(
        self, request: embedder_pb2.EmbedderInfoRequest, context: grpc.aio.ServicerContext
    ) -> embedder_pb2.EmbedderInfoResponse:
        with observed(self._metrics, "grpc/Info"):
            return info_to_proto(self._core.info())


# ---------------------------------------------------------------------------------------------------- encoding


def options_from_proto(request: embedder_pb2.EmbedRequest) -> EmbedOptions:
    left = request.truncation_direction == embedder_pb2.TRUNCATION_DIRECTION_LEFT
    return EmbedOptions(
        normalize=request.normalize if request.HasField("normalize") else True,
        truncate=request.truncate,
        truncation_direction="left" if left else "right",
        prompt_name=request.prompt_name if request.HasField("prompt_name") else None,
        input_type=input_type_from_proto(request.input_type),
        dimensions=request.dimensions if request.HasField("dimensions") else None,
    )


_INPUT_TYPES: dict[int, InputType] = {
    embedder_pb2.INPUT_TYPE_QUERY: "query",
    embedder_pb2.INPUT_TYPE_PASSAGE: "passage",
}


def input_type_from_proto(value: int) -> InputType | None:
    """None for UNSPECIFIED; an unknown number (a newer client) is INVALID_ARGUMENT, not a silent default."""
    if value == embedder_pb2.INPUT_TYPE_UNSPECIFIED:
        return None
    if value not in _INPUT_TYPES:
        raise InvalidArgument(f"unknown input_type {value}; use INPUT_TYPE_QUERY or INPUT_TYPE_PASSAGE")
    return _INPUT_TYPES[value]


def embed_response(embeddings: Embeddings, request_id: str) -> embedder_pb2.EmbedResponse:
    timings = embeddings.timings
    return embedder_pb2.EmbedResponse(
        embeddings=[
            embedder_pb2.EmbedVector(values=vector.tolist(), token_count=count, truncated=truncated)
            for vector, count, truncated in zip(
                embeddings.vectors, embeddings.token_counts, embeddings.truncated, strict=True
            )
        ],
        dim=embeddings.dim,
        total_tokens=embeddings.total_tokens,
        model_id=embeddings.model_id,
        request_id=request_id or uuid.uuid4().hex,
        timings=embedder_pb2.EmbedTimings(
            tokenization_s=timings.tokenization_s,
            queue_s=timings.queue_s,
            inference_s=timings.inference_s,
            total_s=timings.total_s,
        ),
    )


async def stream_answer(
    sequence: int, request_id: str, task: asyncio.Task[Embeddings]
) -> embedder_pb2.EmbedStreamResponse:
    """One stream response: the vectors, or the validation error (other failures end the stream)."""
    try:
        embeddings = await task
    except InvalidArgument as error:
        return embedder_pb2.EmbedStreamResponse(
            sequence=sequence,
            error=embedder_pb2.EmbedStreamError(
                code=error.grpc_code.value[0], reason=error.reason, message=error.message, metadata=error.metadata
            ),
        )
    return embedder_pb2.EmbedStreamResponse(sequence=sequence, response=embed_response(embeddings, request_id))


async def _cancel_all(reader: asyncio.Task[None], pending: asyncio.Queue[_StreamEntry | None]) -> None:
    """The stream is over (done, failed or abandoned): stop reading and drop the work nobody will receive."""
    tasks: list[asyncio.Task] = [reader]
    while not pending.empty():
        entry = pending.get_nowait()
        if entry is not None:
            tasks.append(entry[2])
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def tokenization_to_proto(tokenization: Tokenization) -> embedder_pb2.EmbedderTokenization:
    return embedder_pb2.EmbedderTokenization(
        ids=tokenization.ids,
        starts=tokenization.starts,
        ends=tokenization.ends,
        special=tokenization.special,
        tokens=tokenization.tokens or [],
        token_count=len(tokenization.ids),
    )


def info_to_proto(info: EmbedderInfo) -> embedder_pb2.EmbedderInfoResponse:
    return embedder_pb2.EmbedderInfoResponse(
        model_id=info.model_id,
        model_path=info.model_path,
        model_sha=info.model_sha,
        dim=info.dim,
        supports_dimensions=info.supports_dimensions,
        max_input_length=info.max_input_length,
        max_batch_tokens=info.max_batch_tokens,
        max_client_batch_size=info.max_client_batch_size,
        max_concurrent_requests=info.max_concurrent_requests,
        languages=info.languages,
        dtype=info.dtype,
        device=info.device,
        backend=info.backend,
        pooling=info.pooling,
        similarity=info.similarity,
        prompts=info.prompts,
        default_prompt_name=info.default_prompt_name,
        uses_gpu_lease=info.uses_gpu_lease,
        version=info.version,
    )


@contextlib.contextmanager
def observed(metrics: EmbedderMetrics, route: str) -> Iterator[None]:
    """Count the call by route and final status (the gRPC code name), and time it."""
    started = time.monotonic()
    status = "OK"
    try:
        yield
    except BatonError as error:
        status = error.grpc_code.name
        raise
    except (asyncio.CancelledError, GeneratorExit):
        status = "CANCELLED"
        raise
    except Exception:
        status = "INTERNAL"
        raise
    finally:
        metrics.observe_request(route, status, time.monotonic() - started)
