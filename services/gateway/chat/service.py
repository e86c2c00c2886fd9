"""One chat completion, start to finish, without HTTP: resolve the model, retrieve for the latest question, pack the
hits into the context budget, and start the generation on the inference service.

``start`` returns only once the first message of the generation has arrived, so that everything that can fail
before an answer begins (unknown adapter, a prompt over the context, a full queue, the GPU held by training) fails
as an error status, never as a broken stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baton.clients.inference import FINISH_REASONS, InferenceClient
from baton.runtime.errors import BatonError, Internal, NotFound, ResourceExhausted, Unavailable
from baton.store.base import SearchMode
from baton.v1 import inference_pb2 as pb
from services.gateway.chat import metrics
from services.gateway.chat.citations import citations
from services.gateway.chat.local_tokens import TokenCounters
from services.gateway.chat.packing import PackedContext, SourcePolicy, pack_context
from services.gateway.chat.prompt import CHAT, COMPLETION, Prompt, PromptFormat, Turn, last_user_index, prompt_format
from services.gateway.chat.protocol import MAX_STOP_STRINGS
from services.gateway.retrieval import MAX_QUERY_CHARS, Retriever, SearchRequest, SearchTimings

# Info is static while the inference process lives; a short cache spares one RPC per chat yet notices a restart
# with another model within seconds.
INFO_TTL_S = 10.0
# Which retrieved chunks become sources and how they are shown, per prompt format, each tuned on XQuAD-en with the
# small model served that way (packing.py; benchmarks/eval_prompt.py and docs/evaluation.md for the measurements): a
# few best sources, each cut to its two sentences nearest the question (one sentence: as many right answers, fewer
# cited right); for SmolLM2-135M (chat) shown bare, as given "[1] Title" lines it copied markers and titles into its
# answers; Gemma 3 270M (a base model, completion) keeps the numbered sources its instruction asks it to cite. A
# large model may read more: SourcePolicy().
_SMALL_MODEL_POLICY = SourcePolicy(max_sources=3, min_relative_score=0.85, sentences=2, labels=True)
DEFAULT_POLICIES: Mapping[PromptFormat, SourcePolicy] = {
    CHAT: dataclasses.replace(_SMALL_MODEL_POLICY, labels=False),
    COMPLETION: _SMALL_MODEL_POLICY,
}


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class RagOptions:
    enabled: bool
    collection: str | None = None
    k: int = 8
    mode: SearchMode = SearchMode.HYBRID
    history_turns: int = 0  # earlier user turns added to the search query (0: the latest question alone)
    # A request's own source policy; None: the service's default for that field.
    max_sources: int | None = None
    min_relative_score: float | None = None
    sentences: int | None = None
    labels: bool | None = None
    grounding: float = 0.0  # context-aware decoding weight with sources (0: off)


@dataclass(frozen=True)
class ChatCall:
    """A decoded request. ``sampling`` holds SamplingParams fields (temperature, max_tokens, stop, ...)."""

    tenant: str
    model: str  # the base model's id or an adapter's name; "" = the base model
    conversation: tuple[Turn, ...]
    sampling: dict[str, Any]
    rag: RagOptions
    template_kwargs: dict[str, Any] | None = None
    request_id: str = field(default_factory=new_completion_id)
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class PreparedChat:
    call: ChatCall
    model: str  # the id answered under
    adapter: str  # "" = the base model
    style: PromptFormat  # a chat for the model's template, or a completion text for a base model
    prompt: Prompt
    query: str = ""  # what memory was searched for (citations compare the answer with it)
    packed: PackedContext | None = None
    retrieve_s: float = 0.0
    search_timings: SearchTimings | None = None
    pack_s: float = 0.0
    token_counts: str = ""  # who counted the tokens for packing: "local" (this process) or "service" (CountTokens)
    # Context-aware decoding: the same prompt without the sources, and its weight (0: plain decoding).
    contrast: Prompt | None = None
    grounding: float = 0.0

    @property
    def rag_used(self) -> bool:
        return self.packed is not None

    def extension(self, answer: str | None, last: pb.GenerateResponse | None) -> dict[str, Any]:
        """The ``baton`` field of the response: citations, what packing did, where the time went."""
        timings: dict[str, float] = {
            "retrieve_s": round(self.retrieve_s, 6),
            "pack_s": round(self.pack_s, 6),
            **self._search_parts(),
            "gateway_total_s": round(time.perf_counter() - self.call.arrived, 6),
        }
        if last is not None and last.HasField("timings"):
            timings |= {"inference_total_s": round(last.timings.total_s, 6), "inference_queue_s": last.timings.queue_s}
        packed = self.packed
        return {
            "citations": citations(packed.passages, answer, self.query) if packed is not None else [],
            "rag": {**packed.stats(), "token_counts": self.token_counts, "grounding": self.grounding}
            if packed is not None
            else None,
            "timings": timings,
        }

    def _search_parts(self) -> dict[str, float]:
        parts = self.search_timings
        if parts is None:
            return {}
        return {name: round(getattr(parts, name), 6) for name in ("embed_s", "store_s", "lexical_s")}


class Generation:
    """A started generation: its first message has arrived; iterate ``messages`` for all of them."""

    def __init__(
        self, prepared: PreparedChat, stream: AsyncIterator[pb.GenerateResponse], first: pb.GenerateResponse
    ) -> None:
        self.prepared = prepared
        self._stream = stream
        self._first: pb.GenerateResponse | None = first
        self.last: pb.GenerateResponse = first
        self.first_text_s: float | None = None
        # A completion prompt ends with "Answer:", so the model's answer begins with a space: not part of the answer.
        self._strip_leading = isinstance(prepared.prompt, str)

    async def messages(self) -> AsyncIterator[pb.GenerateResponse]:
        if self._first is not None:
            first, self._first = self._first, None
            yield self._seen(first)
        async for message in self._stream:
            yield self._seen(message)

    def _seen(self, message: pb.GenerateResponse) -> pb.GenerateResponse:
        if self._strip_leading and message.text:
            message.text = message.text.lstrip()
            self._strip_leading = not message.text
        if self.first_text_s is None and message.text:
            self.first_text_s = time.perf_counter() - self.prepared.call.arrived
        self.last = message
        return message

    @property
    def finish_reason(self) -> str:
        """``stop``, ``length``, ``abort`` (the service had to stop: GPU handed over, shutdown), or "" mid-way."""
        reason = FINISH_REASONS.get(self.last.finish_reason, "")
        return "abort" if reason == "aborted" else reason

    async def aclose(self) -> None:
        await self._stream.aclose()  # type: ignore[attr-defined]  # cancels the RPC: the engine stops generating


class ChatService:
    def __init__(
        self,
        inference: InferenceClient,
        retriever: Retriever,
        *,
        answer_tokens: int,
        policies: Mapping[PromptFormat, SourcePolicy] = DEFAULT_POLICIES,
        local_token_counts: bool = True,
    ) -> None:
        self._inference = inference
        self._counters = TokenCounters(inference, local=local_token_counts)
        self._retriever = retriever
        self._answer_tokens = answer_tokens
        self._policies = policies
        self._info: pb.InferenceInfoResponse | None = None
        self._info_at = 0.0
        self._first_seen: dict[str, int] = {}

    async def info(self) -> pb.InferenceInfoResponse:
        if self._info is not None and time.monotonic() - self._info_at < INFO_TTL_S:
            return self._info
        try:
            info = await self._inference.info()
        except BatonError as error:
            raise self._translate(error, "") from None
        self._info, self._info_at = info, time.monotonic()
        self._first_seen.setdefault(info.model_id, int(time.time()))
        return info

    def created(self, model_id: str) -> int:
        """When this gateway first saw the base model served (OpenAI's ``created``; the service does not say)."""
        return self._first_seen.get(model_id, int(time.time()))

    async def models(self, tenant: str) -> tuple[pb.InferenceInfoResponse, list[pb.LoadedAdapter]]:
        """The base model and the adapters ``tenant`` may use (its own, and those nobody's training made)."""
        try:
            info, adapters = await asyncio.gather(self.info(), self._inference.list_adapters())
        except BatonError as error:
            raise self._translate(error, "") from None
        return info, [adapter for adapter in adapters if adapter_visible(adapter, tenant)]

    async def prepare(self, call: ChatCall) -> PreparedChat:
        info = await self.info()
        adapter = "" if call.model in ("", info.model_id) else call.model
        if adapter and adapter not in {served.name for served in (await self.models(call.tenant))[1]}:
            # Unknown and another tenant's adapter answer alike: existence is never revealed.
            raise self._translate(NotFound(f"no adapter {adapter!r}", reason="ADAPTER_NOT_FOUND"), call.model)
        style = prompt_format(info.has_chat_template)
        prepared = PreparedChat(
            call, call.model or info.model_id, adapter, style, style.render(call.conversation, None)
        )
        query = search_query(call.conversation, call.rag.history_turns) if call.rag.enabled else ""
        if not query:
            return prepared
        prepared.query = query
        started = time.perf_counter()
        filters = {"collection": call.rag.collection} if call.rag.collection else {}
        search = SearchRequest(call.tenant, query, call.rag.k, call.rag.mode, filters)
        hits, prepared.search_timings = await self._retriever.search_timed(search)
        packing_started = time.perf_counter()
        counter = self._counters.counter(info, call.template_kwargs)
        prepared.token_counts = counter.source
        max_tokens = call.sampling.get("max_tokens")
        reserved = max_tokens or min(self._answer_tokens, info.max_model_len // 2)
        try:
            packed = await pack_context(
                hits, call.conversation, counter, reserved_tokens=reserved, query=query, style=style,
                policy=self.policy(call.rag, style),
            )  # fmt: skip
        except BatonError as error:
            raise self._translate(error, call.model) from None
        prepared.packed, prepared.prompt = packed, packed.prompt
        if call.rag.grounding > 0 and info.contrast and packed.passages:
            prepared.contrast, prepared.grounding = style.render(call.conversation, []), call.rag.grounding
        prepared.retrieve_s = packing_started - started
        prepared.pack_s = time.perf_counter() - packing_started
        metrics.RETRIEVAL_SECONDS.observe(prepared.retrieve_s)
        metrics.PACKING_SECONDS.observe(prepared.pack_s)
        if packed.prompt_tokens is not None:
            metrics.CONTEXT_TOKENS.observe(packed.prompt_tokens)
        return prepared

    def policy(self, rag: RagOptions, style: PromptFormat) -> SourcePolicy:
        """The service's source policy for ``style`` with the request's own choices applied."""
        asked = {
            "max_sources": rag.max_sources,
            "min_relative_score": rag.min_relative_score,
            "sentences": rag.sentences,
            "labels": rag.labels,
        }
        return dataclasses.replace(
            self._policies[style], **{name: value for name, value in asked.items() if value is not None}
        )

    async def start(self, prepared: PreparedChat) -> Generation:
        call = prepared.call
        sampling = dict(call.sampling)
        if prepared.style.stop:
            # The format's stops first: past the service's limit the request's own are the ones left out.
            stops = dict.fromkeys([*prepared.style.stop, *sampling.get("stop", ())])
            sampling["stop"] = list(stops)[:MAX_STOP_STRINGS]
        prompt = prepared.prompt
        stream = self._inference.generate(
            **({"prompt": prompt} if isinstance(prompt, str) else {"chat": prompt}),
            contrast=prepared.contrast,
            contrast_weight=prepared.grounding,
            adapter=prepared.adapter,
            request_id=call.request_id,
            template_kwargs=call.template_kwargs,
            **sampling,
        )
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            raise Internal("the inference service ended the generation without a message; see its log") from None
        except BatonError as error:
            raise self._translate(error, prepared.model) from None
        return Generation(prepared, stream, first)

    def _translate(self, error: BatonError, model: str) -> BatonError:
        """Inference errors in the terms of the chat API."""
        if isinstance(error, NotFound) and error.reason == "ADAPTER_NOT_FOUND":
            return NotFound(
                f"the model {model!r} does not exist; GET /v1/models lists the base model and the adapters served",
                reason="MODEL_NOT_FOUND",
            )
        if isinstance(error, ResourceExhausted) and error.reason == "LEASE_WAIT_TIMEOUT":
            # The GPU is held (training) and the chat would wait too long: 503 with Retry-After and the ETA.
            return Unavailable(
                f"the GPU is busy and the chat would wait too long ({error.message}); retry after the ETA",
                reason="GPU_BUSY",
                metadata=error.metadata,
                retry_after_s=error.retry_after_s,
            )
        if isinstance(error, Unavailable) and error.reason == Unavailable.default_reason:
            return Unavailable(
                f"the inference service at {self._inference.target} does not answer ({error.message}); start it "
                "(baton serve inference) or set BATON_GATEWAY_INFERENCE_ADDR",
                reason="INFERENCE_UNREACHABLE",
                retry_after_s=5.0,
            )
        return error


def search_query(conversation: Sequence[Turn], history_turns: int) -> str:
    """The latest user turn, after up to ``history_turns`` earlier ones (a follow-up such as "and in 1905?" then
    keeps its subject); the end is kept when that is longer than a search query may be."""
    if last_user_index(conversation) is None:
        return ""
    questions = [content.strip() for role, content in conversation if role == "user" and content.strip()]
    query = "\n".join(questions[-(history_turns + 1) :])
    if len(query) > MAX_QUERY_CHARS:
        query = query[-MAX_QUERY_CHARS:]
        query = query[query.find(" ") + 1 :] if " " in query[:100] else query
    return query


def adapter_visible(adapter: pb.LoadedAdapter, tenant: str) -> bool:
    """An adapter trained by a tenant's job is that tenant's (the registry's registry.json says whose); one an admin
    loaded from elsewhere in the registry has no owner and serves every tenant."""
    owner = _adapter_owner(adapter.path)
    return not owner or owner == tenant


@functools.lru_cache(maxsize=1024)
def _adapter_owner(path: str) -> str:
    # Cached: a registered version folder never changes (a new version is a new folder), and this runs per chat.
    try:
        return str(json.loads((Path(path) / "registry.json").read_text(encoding="utf-8")).get("tenant") or "")
    except (OSError, ValueError, AttributeError):
        return ""
