"""The embedder's gRPC client (``EmbedderClient``) and the tokenizer the ingest chunker uses (``RemoteTokenizer``).

    async with EmbedderClient("127.0.0.1:50061") as embedder:
        vectors = await embedder.embed(["first chunk", "second chunk"])   # float32, (2, dim), unit length
        answer = await embedder.embed_with_usage(["a question"])           # + total_tokens and model_id
        counts = await embedder.count_tokens(["does this fit?"])

Big lists are split into requests of the server's ``max_client_batch_size`` and sent concurrently, so the server's
dynamic batcher can pack them. Failures come back as the domain errors the server raised (``baton.runtime.errors``),
matched on status code and ``ErrorInfo.reason``, never on message text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import grpc
import numpy as np

from baton.runtime.errors import BatonError, PayloadTooLarge, from_rpc_error
from baton.v1 import embedder_pb2, embedder_pb2_grpc
from baton.v1.embedder_pb2 import EmbedderInfoResponse, EmbedderTokenization

__all__ = [
    "EmbedderClient",
    "EmbedderInfoResponse",
    "EmbedderTokenization",
    "Embeddings",
    "InputType",
    "RemoteTokenizer",
]

T = TypeVar("T")
# Which side of retrieval texts are (proto InputType): the embedder prepends the model's prompt for it.
InputType = Literal["query", "passage"]
_INPUT_TYPES: dict[str | None, int] = {
    None: embedder_pb2.INPUT_TYPE_UNSPECIFIED,
    "query": embedder_pb2.INPUT_TYPE_QUERY,
    "passage": embedder_pb2.INPUT_TYPE_PASSAGE,
}

# Reasons whose error class is more specific than the status code alone says (proto/baton/v1/embedder.proto):
# an over-long input is INVALID_ARGUMENT on the wire but "too large" (HTTP 413) to a caller that re-serves it.
_REASON_CLASSES: dict[str, type[BatonError]] = {"INPUT_TOO_LONG": PayloadTooLarge}
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # Tokenize answers for whole documents are large
_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
)
# Requests one embed() call keeps in flight: enough for the server to fill batches, few enough to stay well below
# its max_concurrent_requests when several callers share it.
_CONCURRENT_REQUESTS = 8
# Text per Tokenize request from RemoteTokenizer: well below the server's default 4 MB request limit.
_TOKENIZE_REQUEST_BYTES = 1_000_000


def embedder_error(error: grpc.RpcError) -> BatonError:
    """The domain error behind a failed call."""
    mapped = from_rpc_error(error)
    specific = _REASON_CLASSES.get(mapped.reason)
    if specific is None or isinstance(mapped, specific):
        return mapped
    return specific(mapped.message, reason=mapped.reason, metadata=mapped.metadata, retry_after_s=mapped.retry_after_s)


@dataclass(frozen=True)
class Embeddings:
    """One ``embed_with_usage`` answer."""

    vectors: np.ndarray  # float32 (len(texts), dim), in input order
    total_tokens: int  # tokens of every input, as the server counted them while embedding (OpenAI's usage)
    model_id: str  # the model that made the vectors


class EmbedderClient:
    """A connection to the Embedder service. Cheap to keep; share one per process."""

    def __init__(self, target: str, *, channel: grpc.aio.Channel | None = None, timeout_s: float = 120.0) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._channel = channel or grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self.stub = embedder_pb2_grpc.EmbedderStub(self._channel)
        self._batch_size: int | None = None

    async def __aenter__(self) -> EmbedderClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def info(self) -> EmbedderInfoResponse:
        """The model and the server's limits. UNAVAILABLE (``Unavailable``) while the model loads."""
        info = await self._call(self.stub.Info, embedder_pb2.EmbedderInfoRequest())
        self._batch_size = info.max_client_batch_size
        return info

    async def embed(
        self,
        texts: Sequence[str],
        *,
        normalize: bool = True,
        truncate: bool = False,
        prompt_name: str | None = None,
        input_type: InputType | None = None,
    ) -> np.ndarray:
        """Vectors of ``texts`` in order, float32 (len(texts), dim). Any number of texts (split into requests).
        ``input_type``: "query" (the server's default for Embed) or "passage" (chunks to be found).

        An input over the model's max_input_length raises ``PayloadTooLarge`` (reason INPUT_TOO_LONG, metadata
        ``index`` into ``texts``) unless ``truncate``.
        """
        answer = await self.embed_with_usage(
            texts, normalize=normalize, truncate=truncate, prompt_name=prompt_name, input_type=input_type
        )
        return answer.vectors

    async def embed_with_usage(
        self,
        texts: Sequence[str],
        *,
        normalize: bool = True,
        truncate: bool = False,
        prompt_name: str | None = None,
        input_type: InputType | None = None,
    ) -> Embeddings:
        """``embed``, plus the tokens the server counted and its model id: no second round trip to count them."""
        size = await self._max_batch()
        requests = [
            embedder_pb2.EmbedRequest(
                inputs=texts[start : start + size],
                normalize=normalize,
                truncate=truncate,
                prompt_name=prompt_name,
                input_type=_INPUT_TYPES[input_type],
            )
            for start in range(0, max(len(texts), 1), size)
        ]
        limit = asyncio.Semaphore(_CONCURRENT_REQUESTS)

        async def send(index: int, request: embedder_pb2.EmbedRequest) -> embedder_pb2.EmbedResponse:
            async with limit:
                try:
                    return await self._call(self.stub.Embed, request)
                except BatonError as error:
                    raise _shift_index(error, index * size) from None

        responses = await asyncio.gather(*(send(index, request) for index, request in enumerate(requests)))
        return Embeddings(
            vectors=np.vstack([_vectors(response) for response in responses]),
            total_tokens=sum(response.total_tokens for response in responses),
            model_id=responses[0].model_id,
        )

    async def tokenize(
        self,
        texts: Sequence[str],
        *,
        add_special_tokens: bool = True,
        prompt_name: str | None = None,
        input_type: InputType | None = None,
        include_tokens: bool = False,
    ) -> list[EmbedderTokenization]:
        """Token ids with code-point offsets (``text[start:end]`` is the token's source), never truncated. The
        prompt of ``prompt_name`` or of ``input_type``'s side is counted as Embed would prepend it."""
        request = embedder_pb2.EmbedderTokenizeRequest(
            inputs=list(texts),
            add_special_tokens=add_special_tokens,
            prompt_name=prompt_name,
            input_type=_INPUT_TYPES[input_type],
            include_tokens=include_tokens,
        )
        return list((await self._call(self.stub.Tokenize, request)).tokenizations)

    async def count_tokens(
        self,
        texts: Sequence[str],
        *,
        add_special_tokens: bool = True,
        prompt_name: str | None = None,
        input_type: InputType | None = None,
    ) -> list[int]:
        """Tokens per text as Embed would see them (untruncated: above max_input_length means too long)."""
        request = embedder_pb2.EmbedderCountTokensRequest(
            inputs=list(texts),
            add_special_tokens=add_special_tokens,
            prompt_name=prompt_name,
            input_type=_INPUT_TYPES[input_type],
        )
        return list((await self._call(self.stub.CountTokens, request)).token_counts)

    async def _max_batch(self) -> int:
        if self._batch_size is None:
            await self.info()
        assert self._batch_size is not None
        return self._batch_size

    async def _call(self, method: Callable[..., Awaitable[T]], request: object) -> T:
        try:
            return await method(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            raise embedder_error(error) from None


def _vectors(response: embedder_pb2.EmbedResponse) -> np.ndarray:
    vectors = np.empty((len(response.embeddings), response.dim), dtype=np.float32)
    for row, embedding in enumerate(response.embeddings):
        vectors[row] = embedding.values
    return vectors


def _shift_index(error: BatonError, offset: int) -> BatonError:
    """Make an input index in the error refer to the caller's list, not to one request of it."""
    if offset and "index" in error.metadata:
        error.metadata["index"] = str(int(error.metadata["index"]) + offset)
    return error


class RemoteTokenizer:
    """The embedder's tokenizer over gRPC, as the ingest chunker wants it (``services.gateway.ingest.types``)."""

    def __init__(self, client: EmbedderClient, *, max_input_length: int, special_tokens_count: int) -> None:
        self._client = client
        self._max_input_length = max_input_length
        self._special_tokens_count = special_tokens_count

    @classmethod
    async def create(cls, client: EmbedderClient) -> RemoteTokenizer:
        info = await client.info()
        # Chunks are embedded as passages: the passage prompt's tokens (e5's "passage:") take room like the
        # special tokens do, so they count with them.
        (probe,) = await client.tokenize(["a"], input_type="passage")
        return cls(client, max_input_length=info.max_input_length, special_tokens_count=sum(probe.special))

    @property
    def max_input_length(self) -> int:
        return self._max_input_length

    @property
    def special_tokens_count(self) -> int:
        return self._special_tokens_count

    async def token_spans(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """For each text, the (start, end) code-point span of every token, without special tokens."""
        spans: list[list[tuple[int, int]]] = []
        for group in _groups_by_bytes(texts, _TOKENIZE_REQUEST_BYTES):
            for tokenization in await self._client.tokenize(group, add_special_tokens=False):
                spans.append(list(zip(tokenization.starts, tokenization.ends, strict=True)))
        return spans


def _groups_by_bytes(texts: Sequence[str], limit: int) -> list[list[str]]:
    groups: list[list[str]] = []
    current: list[str] = []
    size = 0
    for text in texts:
        length = len(text.encode("utf-8"))
        if current and size + length > limit:
            groups.append(current)
            current, size = [], 0
        current.append(text)
        size += length
    if current:
        groups.append(current)
    return groups
