"""The inference service's gRPC client.

    async with InferenceClient("127.0.0.1:50062") as inference:
        await inference.load_adapter("views", "alice/3")
        async for part in inference.generate(chat=[("user", "Привет!")], adapter="views", max_tokens=64):
            print(part.text, end="")
        answer = await inference.complete(prompt="Hello", temperature=0)     # the whole text and the last message

Failures come back as the domain errors the server raised (``baton.runtime.errors``), matched on status code and
``ErrorInfo.reason``, never on message text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import struct_pb2

from baton.runtime.errors import from_rpc_error
from baton.v1 import inference_pb2, inference_pb2_grpc

T = TypeVar("T")
pb = inference_pb2

ROLES = {"system": pb.CHAT_ROLE_SYSTEM, "developer": pb.CHAT_ROLE_SYSTEM, "user": pb.CHAT_ROLE_USER}
ROLES["assistant"] = pb.CHAT_ROLE_ASSISTANT
FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORTED: "aborted"}
SAMPLING_FIELDS = frozenset(pb.SamplingParams.DESCRIPTOR.fields_by_name)


@dataclass(frozen=True)
class Completion:
    """A whole generation: the text and the stream's last message (finish reason, usage, timings)."""

    text: str
    token_ids: list[int]
    last: inference_pb2.GenerateResponse

    @property
    def finish_reason(self) -> str:
        return FINISH_REASONS.get(self.last.finish_reason, "")


def chat_input(
    messages: Sequence[tuple[str, str]], *, add_generation_prompt: bool = True, template_kwargs: dict[str, Any] | None
) -> inference_pb2.ChatInput:
    chat = pb.ChatInput(add_generation_prompt=add_generation_prompt)
    for role, content in messages:
        chat.messages.add(role=ROLES[role], content=content)
    if template_kwargs:
        kwargs = struct_pb2.Struct()
        kwargs.update(template_kwargs)
        chat.chat_template_kwargs.CopyFrom(kwargs)
    return chat


class InferenceClient:
    """A connection to the Inference service. Cheap to keep; share one per process."""

    def __init__(self, target: str, *, channel: grpc.aio.Channel | None = None, timeout_s: float = 600.0) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._channel = channel or grpc.aio.insecure_channel(target)
        self.stub = inference_pb2_grpc.InferenceStub(self._channel)

    async def __aenter__(self) -> InferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def request(
        self,
        *,
        prompt: str | None = None,
        chat: Sequence[tuple[str, str]] | None = None,
        token_ids: Sequence[int] | None = None,
        adapter: str = "",
        request_id: str = "",
        max_wait_s: float | None = None,
        template_kwargs: dict[str, Any] | None = None,
        contrast: str | Sequence[tuple[str, str]] | None = None,
        contrast_weight: float = 0.0,
        **sampling: Any,
    ) -> inference_pb2.GenerateRequest:
        """A GenerateRequest; ``sampling`` takes SamplingParams' fields (temperature=0, max_tokens=32, stop=[...]).

        ``contrast``: context-aware decoding against this prompt (a text, or a chat rendered like ``chat``), weighted
        by ``contrast_weight``."""
        unknown = set(sampling) - SAMPLING_FIELDS
        if unknown:
            raise TypeError(f"unknown sampling parameters: {', '.join(sorted(unknown))}")
        request = pb.GenerateRequest(
            request_id=request_id, adapter_name=adapter, sampling=pb.SamplingParams(**sampling)
        )
        if prompt is not None:
            request.prompt = prompt
        if chat is not None:
            request.chat.CopyFrom(chat_input(chat, template_kwargs=template_kwargs))
        if token_ids is not None:
            request.prompt_token_ids.ids.extend(token_ids)
        if max_wait_s is not None:
            request.max_wait_s = max_wait_s
        if contrast is not None:
            request.contrast.weight = contrast_weight
            if isinstance(contrast, str):
                request.contrast.prompt = contrast
            else:
                request.contrast.chat.CopyFrom(chat_input(contrast, template_kwargs=template_kwargs))
        return request

    async def generate(self, **kwargs: Any) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Stream a generation (see ``request`` for the arguments)."""
        async for message in self.stream(self.request(**kwargs)):
            yield message

    async def stream(self, request: inference_pb2.GenerateRequest) -> AsyncIterator[inference_pb2.GenerateResponse]:
        call = self.stub.Generate(request, timeout=self.timeout_s)
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()  # a consumer that stops early aborts the request on the server

    async def complete(self, **kwargs: Any) -> Completion:
        """Generate to the end and return the whole text."""
        texts: list[str] = []
        ids: list[int] = []
        last = pb.GenerateResponse()
        async for message in self.generate(**kwargs):
            texts.append(message.text)
            ids.extend(message.token_ids)
            last = message
        return Completion("".join(texts), ids, last)

    async def load_adapter(self, name: str, path: str, *, replace: bool = False) -> pb.LoadAdapterResponse:
        return await self._call(self.stub.LoadAdapter, pb.LoadAdapterRequest(name=name, path=path, replace=replace))

    async def unload_adapter(self, name: str, *, allow_missing: bool = False) -> pb.UnloadAdapterResponse:
        request = pb.UnloadAdapterRequest(name=name, allow_missing=allow_missing)
        return await self._call(self.stub.UnloadAdapter, request)

    async def list_adapters(self) -> list[pb.LoadedAdapter]:
        return list((await self._call(self.stub.ListAdapters, pb.ListAdaptersRequest())).adapters)

    async def health(self) -> pb.InferenceHealthResponse:
        return await self._call(self.stub.Health, pb.InferenceHealthRequest())

    async def info(self) -> pb.InferenceInfoResponse:
        return await self._call(self.stub.Info, pb.InferenceInfoRequest())

    async def sleep(self, *, drain_timeout_s: float | None = None, stay_asleep: bool = False) -> pb.SleepResponse:
        request = pb.SleepRequest(stay_asleep=stay_asleep)
        if drain_timeout_s is not None:
            request.drain_timeout_s = drain_timeout_s
        return await self._call(self.stub.Sleep, request)

    async def wake(self, *, max_wait_s: float | None = None, return_immediately: bool = False) -> pb.WakeResponse:
        request = pb.WakeRequest(return_immediately=return_immediately)
        if max_wait_s is not None:
            request.max_wait_s = max_wait_s
        return await self._call(self.stub.Wake, request)

    async def tokenize(self, text: str, *, include_tokens: bool = False) -> pb.InferenceTokenizeResponse:
        request = pb.InferenceTokenizeRequest(text=text, include_tokens=include_tokens)
        return await self._call(self.stub.Tokenize, request)

    async def tokenize_chat(self, messages: Sequence[tuple[str, str]]) -> pb.InferenceTokenizeResponse:
        request = pb.InferenceTokenizeRequest(chat=chat_input(messages, template_kwargs=None))
        return await self._call(self.stub.Tokenize, request)

    async def count_tokens(
        self,
        texts: Sequence[str],
        *,
        chat: Sequence[tuple[str, str]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
        add_special_tokens: bool | None = None,
    ) -> pb.InferenceCountTokensResponse:
        """Token counts of ``texts`` (as fragments of a prompt; ``add_special_tokens=True``: as whole prompts, the way
        Generate tokenizes a text prompt) and of ``chat`` rendered as Generate would render it — pass the same
        ``template_kwargs`` as to Generate (e.g. Qwen3's enable_thinking changes the prompt)."""
        request = pb.InferenceCountTokensRequest(texts=list(texts))
        if add_special_tokens is not None:
            request.add_special_tokens = add_special_tokens
        if chat is not None:
            request.chat.CopyFrom(chat_input(chat, template_kwargs=template_kwargs))
        return await self._call(self.stub.CountTokens, request)

    async def _call(self, method: Callable[..., Awaitable[T]], request: object) -> T:
        try:
            return await method(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
