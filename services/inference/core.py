"""InferenceCore: requests, adapters and tokens, the same whatever engine runs below (no grpc, no protobuf here).

A Generate call goes: validate and tokenize (off the event loop) → resolve sampling against the model's defaults and
the context length → pin the adapter (its weights stay until the request ends, even if the name is replaced or
unloaded meanwhile) → wait for a place in the bounded queue, the lease and a slot (``Lifecycle.admitted``) → stream
the engine's deltas, which run in a pump task so that a yield past its drain time can abort them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Literal

from baton.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from baton.runtime.logging import log_event
from services.inference.adapters import AdapterFiles, AdapterRegistry, check_adapter_name
from services.inference.engine import (
    AdapterSlot,
    Contrast,
    EngineDelta,
    EngineRequest,
    InferenceEngine,
    Sampling,
    TokenLogprob,
)
from services.inference.lifecycle import Lifecycle, ServiceState
from services.inference.metrics import InferenceMetrics
from services.inference.prompts import ChatPrompt, PromptTokenizer

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class CoreLimits:
    model_id: str
    max_model_len: int
    max_logprobs: int
    max_prompt_bytes: int
    max_wait_s: float
    max_loaded_adapters: int


@dataclass(frozen=True)
class SamplingInput:
    """Sampling as asked (None = unset: the model's generation_config.json default, else the documented one)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool | None = None


MAX_CONTRAST_WEIGHT = 10.0


@dataclass(frozen=True)
class ContrastInput:
    """The second input of context-aware decoding (``engine.Contrast``): exactly one input, as in GenerateCall."""

    weight: float
    prompt: str | None = None
    chat: ChatPrompt | None = None
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class GenerateCall:
    """One generation request; exactly one of prompt, chat and token_ids is set."""

    request_id: str = ""
    prompt: str | None = None
    chat: ChatPrompt | None = None
    token_ids: tuple[int, ...] | None = None
    sampling: SamplingInput = field(default_factory=SamplingInput)
    adapter_name: str = ""
    max_wait_s: float | None = None
    contrast: ContrastInput | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


@dataclass(frozen=True)
class Timings:
    queue_s: float
    wake_s: float
    time_to_first_token_s: float
    decode_s: float
    total_s: float


@dataclass
class GenerationChunk:
    request_id: str
    adapter_name: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: Literal["stop", "length", "aborted"] | None = None
    matched_stop: str = ""
    usage: Usage | None = None
    timings: Timings | None = None


@dataclass
class AdapterEntry:
    """An adapter served under a name. Replaced or unloaded entries stay in the engine until their requests end."""

    name: str
    files: AdapterFiles
    slot: AdapterSlot
    loaded_unix_s: float
    in_flight: int = 0
    retired: bool = False


@dataclass(frozen=True)
class LoadOutcome:
    adapter: AdapterEntry
    replaced: bool
    unchanged: bool
    load_s: float


@dataclass(frozen=True)
class TokenizeResult:
    ids: list[int]
    starts: list[int]
    ends: list[int]
    tokens: list[str]
    rendered_prompt: str


class InferenceCore:
    def __init__(
        self,
        engine: InferenceEngine,
        lifecycle: Lifecycle,
        tokenizer: PromptTokenizer,
        registry: AdapterRegistry,
        limits: CoreLimits,
        metrics: InferenceMetrics,
    ) -> None:
        self.engine = engine
        self.lifecycle = lifecycle
        self.tokenizer = tokenizer
        self.registry = registry
        self.limits = limits
        self.metrics = metrics
        self.adapters: dict[str, AdapterEntry] = {}
        self._adapter_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._next_slot_id = 1
        self._background: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------------------------------------- generate

    async def generate(self, call: GenerateCall) -> AsyncIterator[GenerationChunk]:
        arrived = time.monotonic()
        request_id = call.request_id or f"gen-{uuid.uuid4().hex[:16]}"
        self.lifecycle.check_accepting()
        prompt_ids = await asyncio.to_thread(self._prompt_ids, call)
        contrast = await asyncio.to_thread(self._contrast, call.contrast)
        sampling = self._resolve_sampling(call.sampling, len(prompt_ids))
        entry = self._pin_adapter(call.adapter_name)
        adapter_name = entry.name if entry else ""
        outcome = "ok"
        try:
            max_wait_s = call.max_wait_s if call.max_wait_s is not None else self.limits.max_wait_s
            wake_before = self._wake_marker()
            async with self.lifecycle.admitted(request_id, max_wait_s) as running:
                queue_s = time.monotonic() - arrived
                wake_s = queue_s if self._wake_marker() != wake_before else 0.0
                self.metrics.queue_seconds.observe(queue_s)
                self.metrics.prompt_tokens.inc(len(prompt_ids))
                request = EngineRequest(request_id, prompt_ids, sampling, entry.slot if entry else None, contrast)
                stream = _Stream(self.engine, request)
                running.task = stream.start()
                first_token_at = 0.0
                completion_tokens = 0
                async for delta in stream:
                    if delta is None:  # aborted by a yield past its drain time, or a lost lease
                        outcome = "aborted"
                        yield self._final(
                            request_id,
                            adapter_name,
                            "aborted",
                            "",
                            len(prompt_ids),
                            completion_tokens,
                            0,
                            arrived,
                            queue_s,
                            wake_s,
                            first_token_at,
                        )
                        return
                    if delta.token_ids and not first_token_at:
                        first_token_at = time.monotonic()
                        self.metrics.time_to_first_token.observe(first_token_at - arrived)
                    completion_tokens += len(delta.token_ids)
                    self.metrics.generated_tokens.inc(len(delta.token_ids))
                    chunk = GenerationChunk(request_id, adapter_name, delta.text, delta.token_ids, delta.logprobs)
                    if delta.finish_reason is not None:
                        final = self._final(
                            request_id,
                            adapter_name,
                            delta.finish_reason,
                            delta.matched_stop,
                            len(prompt_ids),
                            completion_tokens,
                            delta.cached_prompt_tokens,
                            arrived,
                            queue_s,
                            wake_s,
                            first_token_at,
                        )
                        chunk.finish_reason, chunk.matched_stop = final.finish_reason, final.matched_stop
                        chunk.usage, chunk.timings = final.usage, final.timings
                        yield chunk
                        return
                    yield chunk
        except BaseException as error:
            outcome = getattr(error, "reason", type(error).__name__)
            raise
        finally:
            self.metrics.requests.labels(outcome, adapter_name).inc()
            if entry is not None:
                self._unpin_adapter(entry)

    def _final(
        self,
        request_id: str,
        adapter_name: str,
        finish_reason: Literal["stop", "length", "aborted"],
        matched_stop: str,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
        arrived: float,
        queue_s: float,
        wake_s: float,
        first_token_at: float,
    ) -> GenerationChunk:
        now = time.monotonic()
        decode_s = now - first_token_at if first_token_at else 0.0
        if completion_tokens > 1 and decode_s > 0:
            self.metrics.decode_tokens_per_second.observe((completion_tokens - 1) / decode_s)
        timings = Timings(
            queue_s=queue_s,
            wake_s=wake_s,
            time_to_first_token_s=(first_token_at - arrived) if first_token_at else 0.0,
            decode_s=decode_s,
            total_s=now - arrived,
        )
        return GenerationChunk(
            request_id,
            adapter_name,
            finish_reason=finish_reason,
            matched_stop=matched_stop,
            usage=Usage(prompt_tokens, completion_tokens, cached_tokens),
            timings=timings,
        )

    def _wake_marker(self) -> float:
        # The state's start time changes with every transition: if it moved while we queued, a wake was part of it.
        return self.lifecycle.state_since_unix_s if self.lifecycle.state != ServiceState.AWAKE else -1.0

    def _prompt_ids(self, call: GenerateCall) -> list[int]:
        return self._input_ids(call.prompt, call.chat, call.token_ids)

    def _contrast(self, contrast: ContrastInput | None) -> Contrast | None:
        if contrast is None:
            return None
        if not self.engine.info.contrast:
            raise FailedPrecondition(
                f"the {self.engine.info.engine} engine does not run a contrast (context-aware decoding): send the "
                "request without one, or serve the model with the hf engine",
                reason="CONTRAST_UNSUPPORTED",
            )
        if not 0 < contrast.weight <= MAX_CONTRAST_WEIGHT:
            raise InvalidArgument(
                f"contrast weight {contrast.weight} is out of range: give a weight above 0 and at most "
                f"{MAX_CONTRAST_WEIGHT:g} (0.5 is usual)",
                reason="BAD_CONTRAST_WEIGHT",
            )
        return Contrast(self._input_ids(contrast.prompt, contrast.chat, contrast.token_ids), contrast.weight)

    def _input_ids(self, prompt: str | None, chat: ChatPrompt | None, token_ids: tuple[int, ...] | None) -> list[int]:
        given = [prompt is not None, chat is not None, token_ids is not None]
        if sum(given) != 1:
            raise InvalidArgument("give exactly one of prompt, chat and prompt_token_ids", reason="EMPTY_INPUT")
        if token_ids is not None:
            ids = list(token_ids)
            if not ids:
                raise InvalidArgument("prompt_token_ids is empty", reason="EMPTY_INPUT")
            bad = [token for token in ids if token >= self.tokenizer.vocab_size]
            if bad:
                raise InvalidArgument(
                    f"token id {bad[0]} is not below the vocabulary size {self.tokenizer.vocab_size}",
                    reason="BAD_TOKEN_ID",
                )
        elif chat is not None:
            self._check_bytes(sum(len(turn.content.encode()) for turn in chat.messages))
            ids, _ = self.tokenizer.chat_ids(chat)
        else:
            assert prompt is not None
            if not prompt:
                raise InvalidArgument("prompt is empty", reason="EMPTY_INPUT")
            self._check_bytes(len(prompt.encode()))
            ids = self.tokenizer.text_ids(prompt)
        if len(ids) >= self.limits.max_model_len:
            raise InvalidArgument(
                f"the prompt has {len(ids)} tokens; this model's context is {self.limits.max_model_len} tokens for "
                "prompt and answer together — shorten the prompt (fewer retrieved chunks, a shorter history)",
                reason="CONTEXT_LENGTH_EXCEEDED",
                metadata={"prompt_tokens": str(len(ids)), "max_model_len": str(self.limits.max_model_len)},
            )
        return ids

    def _check_bytes(self, size: int) -> None:
        if size > self.limits.max_prompt_bytes:
            raise InvalidArgument(
                f"the prompt is {size} bytes, above max_prompt_bytes={self.limits.max_prompt_bytes}",
                reason="PAYLOAD_TOO_LARGE",
            )

    def _resolve_sampling(self, asked: SamplingInput, prompt_tokens: int) -> Sampling:
        defaults = self.tokenizer.generation_defaults
        room = self.limits.max_model_len - prompt_tokens
        max_tokens = asked.max_tokens if asked.max_tokens is not None else room
        if asked.max_tokens is not None and asked.max_tokens > room:
            raise InvalidArgument(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({asked.max_tokens}) exceeds the context of "
                f"{self.limits.max_model_len} tokens; ask for at most {room} tokens",
                reason="CONTEXT_LENGTH_EXCEEDED",
            )
        sampling = Sampling(
            max_tokens=max_tokens,
            temperature=_pick(asked.temperature, defaults.get("temperature"), 1.0),
            top_p=_pick(asked.top_p, defaults.get("top_p"), 1.0),
            top_k=int(_pick(asked.top_k, defaults.get("top_k"), 0)),
            min_p=_pick(asked.min_p, None, 0.0),
            repetition_penalty=_pick(asked.repetition_penalty, defaults.get("repetition_penalty"), 1.0),
            presence_penalty=_pick(asked.presence_penalty, None, 0.0),
            frequency_penalty=_pick(asked.frequency_penalty, None, 0.0),
            seed=asked.seed,
            min_tokens=asked.min_tokens,
            stop=asked.stop,
            stop_token_ids=asked.stop_token_ids,
            ignore_eos=asked.ignore_eos,
            logprobs=asked.logprobs,
            skip_special_tokens=True if asked.skip_special_tokens is None else asked.skip_special_tokens,
        )
        self._check_sampling(sampling, asked)
        return sampling

    def _check_sampling(self, sampling: Sampling, asked: SamplingInput) -> None:
        problems = []
        if not 0 <= sampling.temperature <= 2:
            problems.append(f"temperature {sampling.temperature} is outside 0..2")
        if not 0 < sampling.top_p <= 1:
            problems.append(f"top_p {sampling.top_p} is outside (0, 1]")
        if asked.top_k is not None and asked.top_k < 1:
            problems.append("top_k must be at least 1")
        if not 0 <= sampling.min_p <= 1:
            problems.append(f"min_p {sampling.min_p} is outside [0, 1]")
        if sampling.repetition_penalty <= 0:
            problems.append("repetition_penalty must be above 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(sampling, name) <= 2:
                problems.append(f"{name} {getattr(sampling, name)} is outside -2..2")
        if sampling.max_tokens < 1:
            problems.append("max_tokens must be at least 1")
        if sampling.min_tokens > sampling.max_tokens:
            problems.append(f"min_tokens {sampling.min_tokens} is above max_tokens {sampling.max_tokens}")
        if len(sampling.stop) > MAX_STOP_STRINGS or any(not stop for stop in sampling.stop):
            problems.append(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings")
        if any(token >= self.tokenizer.vocab_size for token in sampling.stop_token_ids):
            problems.append(f"stop_token_ids must be below the vocabulary size {self.tokenizer.vocab_size}")
        if sampling.logprobs is not None and sampling.logprobs > self.limits.max_logprobs:
            problems.append(f"logprobs {sampling.logprobs} is above max_logprobs {self.limits.max_logprobs}")
        if problems:
            raise InvalidArgument("bad sampling parameters: " + "; ".join(problems), reason="BAD_SAMPLING")

    # ---------------------------------------------------------------------------------------------- adapters

    def _pin_adapter(self, name: str) -> AdapterEntry | None:
        if not name or name == self.limits.model_id:
            return None
        entry = self.adapters.get(name)
        if entry is None:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise NotFound(
                f"no adapter named {name!r} is loaded (loaded: {known}); LoadAdapter it first",
                reason="ADAPTER_NOT_FOUND",
            )
        entry.in_flight += 1
        return entry

    def _unpin_adapter(self, entry: AdapterEntry) -> None:
        entry.in_flight -= 1
        if entry.retired and entry.in_flight == 0:
            self._spawn(self._remove_from_engine(entry))

    async def load_adapter(self, name: str, path: str, *, replace: bool) -> LoadOutcome:
        started = time.monotonic()
        self.lifecycle.check_accepting()
        check_adapter_name(name, base_model_id=self.limits.model_id)
        async with self._adapter_locks[name]:
            files = await asyncio.to_thread(self.registry.inspect, path)
            current = self.adapters.get(name)
            if current is not None and current.files.path == files.path:
                return LoadOutcome(current, replaced=False, unchanged=True, load_s=time.monotonic() - started)
            if current is not None and not replace:
                raise AlreadyExists(
                    f"adapter {name!r} is loaded from {current.files.path}; pass replace=true to swap it for "
                    f"{files.path}",
                    reason="ADAPTER_EXISTS",
                )
            if current is None and len(self.adapters) >= self.limits.max_loaded_adapters:
                raise ResourceExhausted(
                    f"{len(self.adapters)} adapters are loaded (max_loaded_adapters="
                    f"{self.limits.max_loaded_adapters}); unload one first",
                    reason="TOO_MANY_ADAPTERS",
                )
            slot = AdapterSlot(self._next_slot_id, name, files.path, files.rank)
            self._next_slot_id += 1
            await self.lifecycle.add_adapter(slot)
            entry = AdapterEntry(name, files, slot, loaded_unix_s=time.time())
            self.adapters[name] = entry  # one assignment: new requests see either the old entry or the new one
            if current is not None:
                self._retire(current)
            load_s = time.monotonic() - started
            self.metrics.adapters_loaded.set(len(self.adapters))
            self.metrics.adapter_load_seconds.observe(load_s)
            log_event(
                log,
                "inference.adapter_loaded",
                name=name,
                path=str(files.path),
                rank=files.rank,
                replaced=current is not None,
                slot=slot.slot_id,
                load_s=load_s,
            )
            return LoadOutcome(entry, replaced=current is not None, unchanged=False, load_s=load_s)

    async def unload_adapter(self, name: str, *, allow_missing: bool) -> AdapterEntry | None:
        async with self._adapter_locks[name]:
            entry = self.adapters.pop(name, None)
            if entry is None:
                if allow_missing:
                    return None
                raise NotFound(f"no adapter named {name!r} is loaded", reason="ADAPTER_NOT_FOUND")
            self._retire(entry)
            self.metrics.adapters_loaded.set(len(self.adapters))
            log_event(log, "inference.adapter_unloaded", name=name, in_flight=entry.in_flight)
            return replace(entry)

    def _retire(self, entry: AdapterEntry) -> None:
        entry.retired = True
        if entry.in_flight == 0:
            self._spawn(self._remove_from_engine(entry))

    async def _remove_from_engine(self, entry: AdapterEntry) -> None:
        await self.lifecycle.remove_adapter(entry.slot)

    def adapter_resident(self) -> bool:
        return self.lifecycle.state == ServiceState.AWAKE

    # ---------------------------------------------------------------------------------------------- tokens

    async def tokenize(
        self, *, text: str | None, chat: ChatPrompt | None, add_special_tokens: bool | None, include_tokens: bool
    ) -> TokenizeResult:
        self.lifecycle.check_accepting()
        if (text is None) == (chat is None):
            raise InvalidArgument("give exactly one of text and chat", reason="EMPTY_INPUT")
        return await asyncio.to_thread(self._tokenize, text, chat, add_special_tokens, include_tokens)

    def _tokenize(
        self, text: str | None, chat: ChatPrompt | None, add_special_tokens: bool | None, include_tokens: bool
    ) -> TokenizeResult:
        if chat is not None:
            self._check_bytes(sum(len(turn.content.encode()) for turn in chat.messages))
            ids, rendered = self.tokenizer.chat_ids(chat)
            if add_special_tokens:
                ids = self.tokenizer.text_ids(rendered, add_special_tokens=True)
            starts, ends = [], []
        else:
            assert text is not None
            self._check_bytes(len(text.encode()))
            tokens = self.tokenizer.text_tokens(text, add_special_tokens=add_special_tokens is not False)
            ids, starts, ends, rendered = tokens.ids, tokens.starts, tokens.ends, ""
        names = self.tokenizer.token_texts(ids) if include_tokens else []
        return TokenizeResult(ids, starts, ends, names, rendered)

    async def count_tokens(
        self, texts: list[str], *, add_special_tokens: bool, chat: ChatPrompt | None
    ) -> tuple[list[int], int | None]:
        self.lifecycle.check_accepting()
        self._check_bytes(sum(len(text.encode()) for text in texts))

        def count() -> tuple[list[int], int | None]:
            counts = self.tokenizer.count(texts, add_special_tokens=add_special_tokens)
            chat_tokens = len(self.tokenizer.chat_ids(chat)[0]) if chat is not None else None
            return counts, chat_tokens

        return await asyncio.to_thread(count)

    # ---------------------------------------------------------------------------------------------- life

    def _spawn(self, work: object) -> None:
        task = asyncio.get_running_loop().create_task(work)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._background):
            with contextlib.suppress(Exception):
                await task
        await self.lifecycle.close()


class _Stream:
    """Runs an engine stream in its own task, so the lifecycle can abort it by cancelling that task."""

    def __init__(self, engine: InferenceEngine, request: EngineRequest) -> None:
        self._engine = engine
        self._request = request
        self._queue: asyncio.Queue[EngineDelta | BaseException | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(self._pump(), name=f"generate-{self._request.request_id}")
        return self._task

    async def _pump(self) -> None:
        stream = self._engine.generate(self._request)
        try:
            async for delta in stream:
                self._queue.put_nowait(delta)
        except asyncio.CancelledError:
            self._queue.put_nowait(None)  # aborted
            raise
        except BaseException as error:
            self._queue.put_nowait(error)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def __aiter__(self) -> AsyncIterator[EngineDelta | None]:
        assert self._task is not None
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item is None or item.finish_reason is not None:
                    return
        finally:
            if not self._task.done():
                self._task.cancel()  # the client went away: abort the request in the engine
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task


def _pick(asked: float | None, model_default: float | None, fallback: float) -> float:
    if asked is not None:
        return asked
    return model_default if model_default is not None else fallback
