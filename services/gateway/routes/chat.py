"""POST /v1/chat/completions: OpenAI's chat API (streaming SSE and not), answered from the tenant's memory with
numbered citations. The work is in services/gateway/chat/; this module decodes and encodes."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from baton.runtime.errors import BatonError, Internal, Unavailable
from baton.store.base import SearchMode
from services.gateway.chat import metrics
from services.gateway.chat.protocol import ChatCompletion, ChatCompletionRequest
from services.gateway.chat.service import ChatCall, Generation, RagOptions
from services.gateway.routes.deps import gateway_state
from services.gateway.routes.openai_errors import ERROR_RESPONSES, OpenAIRoute, error_body
from services.gateway.settings import GatewaySettings
from services.gateway.state import GatewayState
from services.gateway.tenancy import current_tenant

log = logging.getLogger(__name__)
router = APIRouter(tags=["openai"], route_class=OpenAIRoute)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": ChatCompletion,
        "description": "A chat completion, or with stream=true an SSE stream of `chat.completion.chunk` events "
        "ending with `data: [DONE]`; the last chunk before it carries `baton` (citations)",
        # Before OpenAPI 3.2 the schema of an event stream describes one event: its `data` is the JSON of a
        # chat.completion.chunk (or of an error), or `[DONE]` at the end.
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {
                        "data": {"type": "string", "description": "a chat.completion.chunk as JSON, or [DONE]"},
                        "event": {"type": "string"},
                    },
                }
            }
        },
    },
    **ERROR_RESPONSES,
}


@router.post(
    "/v1/chat/completions",
    summary="Chat (OpenAI-compatible), answered from memory with citations in `baton.citations`",
    response_model=None,
    responses=_RESPONSES,
)
async def chat_completions(
    body: ChatCompletionRequest,
    tenant: Annotated[str, Depends(current_tenant)],
    state: Annotated[GatewayState, Depends(gateway_state)],
) -> Response:
    call = decode(body, tenant, state.settings)
    rag = "on" if call.rag.enabled else "off"
    stream = "yes" if body.stream else "no"
    try:
        if state.gpu is not None:
            await state.gpu.admit_chat()  # gpu_policy=queue: wait for training, or 503 + Retry-After + ETA
        generation = await state.chat.start(await state.chat.prepare(call))
    except BatonError as error:
        metrics.REQUESTS.labels(error.reason.lower(), stream, rag).inc()
        raise
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return _SSEResponse(sse_events(generation, include_usage), media_type="text/event-stream", headers=SSE_HEADERS)
    return await complete(generation)


def decode(body: ChatCompletionRequest, tenant: str, settings: GatewaySettings) -> ChatCall:
    options = body.baton
    rag = RagOptions(
        enabled=settings.chat_rag if options is None or options.rag is None else options.rag,
        collection=options.collection if options else None,
        k=(options.k if options and options.k else settings.chat_k),
        mode=options.mode if options else SearchMode.HYBRID,
        history_turns=options.history_turns if options else 0,
        max_sources=options.sources if options else None,
        min_relative_score=options.min_relative_score if options else None,
        sentences=options.sentences if options else None,
        labels=options.labels if options else None,
        grounding=settings.chat_grounding if options is None or options.grounding is None else options.grounding,
    )
    conversation = tuple(("system" if m.role == "developer" else m.role, m.text()) for m in body.messages)
    return ChatCall(tenant, body.model or "", conversation, body.sampling(), rag, body.chat_template_kwargs)


async def complete(generation: Generation) -> JSONResponse:
    prepared = generation.prepared
    parts: list[str] = []
    try:
        async for message in generation.messages():
            parts.append(message.text)
        if generation.finish_reason == "abort":
            raise _aborted()
    except BatonError as error:
        _observe(generation, "no", error.reason.lower())
        raise
    finally:
        await generation.aclose()
    answer = "".join(parts)
    body = {
        **_head(generation, "chat.completion"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer},
                "logprobs": None,
                "finish_reason": generation.finish_reason or None,
            }
        ],
        "usage": _usage(generation),
        "system_fingerprint": None,
        "baton": prepared.extension(answer, generation.last),
    }
    _observe(generation, "no", "ok")
    return JSONResponse(body)


async def sse_events(generation: Generation, include_usage: bool) -> AsyncIterator[str]:
    """role chunk, content chunks, the finish chunk (+ a usage chunk), ``baton`` on the last one, ``[DONE]``."""
    head = _head(generation, "chat.completion.chunk")
    parts: list[str] = []
    outcome = "client_gone"
    try:
        yield _event(_chunk(head, {"role": "assistant", "content": ""}, None))
        async for message in generation.messages():
            if message.text:
                parts.append(message.text)
                yield _event(_chunk(head, {"content": message.text}, None))
        if generation.finish_reason == "abort":
            raise _aborted()
        final = _chunk(head, {}, generation.finish_reason or None)
        if include_usage:
            yield _event(final)
            final = {**head, "choices": [], "usage": _usage(generation)}
        final["baton"] = generation.prepared.extension("".join(parts), generation.last)
        yield _event(final)
        outcome = "ok"
    except BatonError as error:
        outcome = error.reason.lower()
        yield _event(error_body(error))  # OpenAI clients raise APIError on an event with "error"
    except Exception:
        outcome = "internal"
        log.exception("chat stream %s failed", generation.prepared.call.request_id)
        yield _event(error_body(Internal("internal error; see the gateway's log")))
    finally:
        await generation.aclose()
        _observe(generation, "yes", outcome)
    yield "data: [DONE]\n\n"


class _SSEResponse(StreamingResponse):
    """Closes the event generator however the response ends, so a client that leaves aborts the generation."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def _head(generation: Generation, kind: str) -> dict[str, Any]:
    prepared = generation.prepared
    return {"id": prepared.call.request_id, "object": kind, "created": int(time.time()), "model": prepared.model}


def _chunk(head: dict[str, Any], delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(generation: Generation) -> dict[str, int]:
    usage = generation.last.usage
    total = usage.prompt_tokens + usage.completion_tokens
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens, "total_tokens": total}


def _aborted() -> Unavailable:
    return Unavailable(
        "the answer was interrupted: the inference service had to stop (GPU handed over or shutting down); retry",
        reason="GENERATION_ABORTED",
        retry_after_s=1.0,
    )


def _observe(generation: Generation, stream: str, outcome: str) -> None:
    prepared = generation.prepared
    rag = "on" if prepared.call.rag.enabled else "off"
    metrics.REQUESTS.labels(outcome, stream, rag).inc()
    total = time.perf_counter() - prepared.call.arrived
    metrics.REQUEST_SECONDS.labels(stream, rag).observe(total)
    if generation.first_text_s is not None:
        metrics.TIME_TO_FIRST_TOKEN_SECONDS.labels(rag).observe(generation.first_text_s)
    last = generation.last
    if last.HasField("timings") and last.timings.total_s > 0:
        metrics.OVERHEAD_SECONDS.labels(rag).observe(max(0.0, total - last.timings.total_s))
