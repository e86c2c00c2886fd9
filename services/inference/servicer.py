"""The Inference gRPC servicer: decode, call the core, encode. No validation or state logic lives here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from baton.runtime.errors import grpc_errors
from baton.v1 import inference_pb2, inference_pb2_grpc
from services.inference.core import (
    AdapterEntry,
    ContrastInput,
    GenerateCall,
    GenerationChunk,
    InferenceCore,
    SamplingInput,
)
from services.inference.lifecycle import ServiceState
from services.inference.prompts import chat_prompt

pb = inference_pb2

_FINISH = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "aborted": pb.FINISH_REASON_ABORTED,
}
STATE_TO_PROTO = {
    ServiceState.LOADING: pb.INFERENCE_STATE_LOADING,
    ServiceState.AWAKE: pb.INFERENCE_STATE_AWAKE,
    ServiceState.SLEEPING: pb.INFERENCE_STATE_SLEEPING,
    ServiceState.WAKING: pb.INFERENCE_STATE_WAKING,
    ServiceState.YIELDING: pb.INFERENCE_STATE_YIELDING,
    ServiceState.FAILED: pb.INFERENCE_STATE_FAILED,
}


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, core: InferenceCore, info: pb.InferenceInfoResponse) -> None:
        self._core = core
        self._info = info

    @grpc_errors
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        max_wait_s = request.max_wait_s if request.HasField("max_wait_s") else None
        remaining = context.time_remaining()
        if remaining is not None:  # a shorter gRPC deadline bounds the wait too
            max_wait_s = min(max_wait_s if max_wait_s is not None else remaining, remaining)
        call = generate_call(request, max_wait_s)
        async for chunk in self._core.generate(call):
            yield generate_response(chunk)

    @grpc_errors
    async def Tokenize(
        self, request: pb.InferenceTokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.InferenceTokenizeResponse:
        which = request.WhichOneof("input")
        result = await self._core.tokenize(
            text=request.text if which == "text" else None,
            chat=chat_prompt(request.chat) if which == "chat" else None,
            add_special_tokens=request.add_special_tokens if request.HasField("add_special_tokens") else None,
            include_tokens=request.include_tokens,
        )
        return pb.InferenceTokenizeResponse(
            ids=result.ids,
            token_count=len(result.ids),
            starts=result.starts,
            ends=result.ends,
            tokens=result.tokens,
            rendered_prompt=result.rendered_prompt,
            max_model_len=self._core.limits.max_model_len,
        )

    @grpc_errors
    async def CountTokens(
        self, request: pb.InferenceCountTokensRequest, context: grpc.aio.ServicerContext
    ) -> pb.InferenceCountTokensResponse:
        counts, chat_tokens = await self._core.count_tokens(
            list(request.texts),
            add_special_tokens=request.add_special_tokens if request.HasField("add_special_tokens") else False,
            chat=chat_prompt(request.chat) if request.HasField("chat") else None,
        )
        response = pb.InferenceCountTokensResponse(token_counts=counts, max_model_len=self._core.limits.max_model_len)
        if chat_tokens is not None:
            response.chat_tokens = chat_tokens
        return response

    @grpc_errors
    async def LoadAdapter(
        self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadAdapterResponse:
        outcome = await self._core.load_adapter(request.name, request.path, replace=request.replace)
        return pb.LoadAdapterResponse(
            adapter=self._adapter(outcome.adapter),
            replaced=outcome.replaced,
            unchanged=outcome.unchanged,
            load_s=outcome.load_s,
        )

    @grpc_errors
    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadAdapterResponse:
        entry = await self._core.unload_adapter(request.name, allow_missing=request.allow_missing)
        return pb.UnloadAdapterResponse(adapter=self._adapter(entry) if entry is not None else None)

    @grpc_errors
    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        entries = sorted(self._core.adapters.values(), key=lambda entry: entry.name)
        return pb.ListAdaptersResponse(adapters=[self._adapter(entry) for entry in entries])

    @grpc_errors
    async def Health(
        self, request: pb.InferenceHealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.InferenceHealthResponse:
        life = self._core.lifecycle
        lease = life.lease
        waking = life.state == ServiceState.WAKING
        return pb.InferenceHealthResponse(
            state=STATE_TO_PROTO[life.state],
            state_since_unix_s=life.state_since_unix_s,
            message=life.message,
            holds_lease=lease is not None and life.leases.uses_gpu_lease,
            lease_id=lease.lease_id if lease is not None else "",
            lease_epoch=lease.epoch if lease is not None else 0,
            lease_queue_position=life.queue_position if waking else 0,
            lease_eta_s=life.queue_eta_s if waking else 0.0,
            stay_asleep=life.stay_asleep,
            running_requests=len(life.running),
            queued_requests=life.queued,
            queue_capacity=life.queue_capacity,
            idle_s=life.idle_s,
            adapters_loaded=len(self._core.adapters),
            kv_cache_usage=self._core.engine.kv_cache_usage() if life.state == ServiceState.AWAKE else 0.0,
            vram_used_bytes=self._core.engine.device_memory_bytes(),
        )

    @grpc_errors
    async def Info(
        self, request: pb.InferenceInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.InferenceInfoResponse:
        self._core.lifecycle.check_accepting()
        return self._info

    @grpc_errors
    async def Sleep(self, request: pb.SleepRequest, context: grpc.aio.ServicerContext) -> pb.SleepResponse:
        outcome = await self._core.lifecycle.sleep(
            drain_timeout_s=request.drain_timeout_s if request.HasField("drain_timeout_s") else None,
            stay_asleep=request.stay_asleep,
            level=request.level if request.HasField("level") else 1,
            lease_epoch=request.lease_epoch if request.HasField("lease_epoch") else None,
            why="Sleep requested by an admin",
        )
        return pb.SleepResponse(
            state=STATE_TO_PROTO[self._core.lifecycle.state],
            released_epoch=outcome.released_epoch,
            drain_s=outcome.drain_s,
            sleep_s=outcome.sleep_s,
            aborted_requests=outcome.aborted_requests,
        )

    @grpc_errors
    async def Wake(self, request: pb.WakeRequest, context: grpc.aio.ServicerContext) -> pb.WakeResponse:
        default_wait = self._core.limits.max_wait_s
        outcome = await self._core.lifecycle.wake(
            max_wait_s=request.max_wait_s if request.HasField("max_wait_s") else default_wait,
            return_immediately=request.return_immediately,
        )
        response = pb.WakeResponse(state=STATE_TO_PROTO[self._core.lifecycle.state])
        if outcome is not None:
            response.lease_epoch = outcome.lease_epoch
            response.lease_wait_s = outcome.lease_wait_s
            response.wake_s = outcome.wake_s
        return response

    def _adapter(self, entry: AdapterEntry) -> pb.LoadedAdapter:
        files = entry.files
        return pb.LoadedAdapter(
            name=entry.name,
            path=str(files.path),
            version=files.version,
            rank=files.rank,
            alpha=files.alpha,
            target_modules=list(files.target_modules),
            base_model=files.base_model,
            loaded_unix_s=entry.loaded_unix_s,
            size_bytes=files.size_bytes,
            resident=self._core.adapter_resident() and not entry.retired,
            in_flight_requests=entry.in_flight,
        )


def generate_call(request: pb.GenerateRequest, max_wait_s: float | None) -> GenerateCall:
    return GenerateCall(
        request_id=request.request_id,
        **input_fields(request),
        sampling=sampling_input(request.sampling),
        adapter_name=request.adapter_name,
        max_wait_s=max_wait_s,
        contrast=ContrastInput(request.contrast.weight, **input_fields(request.contrast))
        if request.HasField("contrast")
        else None,
    )


def input_fields(message: pb.GenerateRequest | pb.GenerateContrast) -> dict[str, Any]:
    """The one input a request or its contrast sets (the ``input`` oneof both have) as GenerateCall's fields."""
    which = message.WhichOneof("input")
    return {
        "prompt": message.prompt if which == "prompt" else None,
        "chat": chat_prompt(message.chat) if which == "chat" else None,
        "token_ids": tuple(message.prompt_token_ids.ids) if which == "prompt_token_ids" else None,
    }


def sampling_input(sampling: pb.SamplingParams) -> SamplingInput:
    def optional(name: str) -> float | int | bool | None:
        return getattr(sampling, name) if sampling.HasField(name) else None

    return SamplingInput(
        temperature=optional("temperature"),
        top_p=optional("top_p"),
        top_k=optional("top_k"),
        min_p=optional("min_p"),
        repetition_penalty=optional("repetition_penalty"),
        presence_penalty=optional("presence_penalty"),
        frequency_penalty=optional("frequency_penalty"),
        seed=optional("seed"),
        max_tokens=optional("max_tokens"),
        min_tokens=sampling.min_tokens,
        stop=tuple(sampling.stop),
        stop_token_ids=tuple(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
        logprobs=optional("logprobs"),
        skip_special_tokens=optional("skip_special_tokens"),
    )  # type: ignore[arg-type]


def generate_response(chunk: GenerationChunk) -> pb.GenerateResponse:
    response = pb.GenerateResponse(
        request_id=chunk.request_id,
        text=chunk.text,
        token_ids=chunk.token_ids,
        finish_reason=_FINISH[chunk.finish_reason],
        matched_stop=chunk.matched_stop,
        adapter_name=chunk.adapter_name,
    )
    for logprob in chunk.logprobs:
        entry = response.logprobs.add(token_id=logprob.token_id, token=logprob.token, logprob=logprob.logprob)
        for top in logprob.top:
            entry.top_logprobs.add(token_id=top.token_id, token=top.token, logprob=top.logprob)
    if chunk.usage is not None:
        usage = chunk.usage
        response.usage.CopyFrom(
            pb.GenerateUsage(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_prompt_tokens=usage.cached_prompt_tokens,
            )
        )
    if chunk.timings is not None:
        t = chunk.timings
        response.timings.CopyFrom(
            pb.GenerateTimings(
                queue_s=t.queue_s,
                wake_s=t.wake_s,
                time_to_first_token_s=t.time_to_first_token_s,
                decode_s=t.decode_s,
                total_s=t.total_s,
            )
        )
    return response
