"""The transformers + peft engine: small models, machines without vLLM, and the CPU test suite.

All torch work runs on ONE worker thread, so the event loop never blocks and peft's adapter state (which adapter
is active, which are loaded) is only ever touched from one thread. The worker runs a scheduler loop of rounds: the
newcomers of a round are prefilled at once (one left-padded forward per adapter and similar prompt length; their
first tokens come within that round, not after the requests ahead of them), then join the decode batch, where ONE
forward pass advances every running request by a token (``hf_batch``: the KV caches held as one left-padded
``DynamicCache``). At most ``max_concurrent_requests`` requests are active; the others wait in
FIFO order.

Adapters are peft LoRA adapters named ``str(slot_id)``; the model is wrapped in a ``PeftModel`` when the first
adapter arrives. Loading and removing one runs on the worker between two rounds, never in the middle of a forward
pass. A batch whose rows all use one adapter (or none) switches to it once; a batch that mixes them runs as one
forward with peft's per-row ``adapter_names`` (``__base__`` for the base model).

Sleep (``yield_method`` "offload"): on CUDA the weights move to host memory and back; on CPU the model is freed and
loaded again from disk on wake, with every added adapter, so the wake path is exercised by the CPU tests too.

``torch.set_num_threads`` is process-wide: the engine leaves torch's default alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import queue
import random
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers
from peft import PeftConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from baton.models.output_layer import use_weight_first_output_layer
from baton.runtime.errors import BatonError, FailedPrecondition, Internal, InvalidArgument, NotFound, Unavailable
from baton.runtime.logging import log_event
from services.inference.engine import (
    AdapterSlot,
    EngineConfig,
    EngineDelta,
    EngineInfo,
    EngineRequest,
    FinishReason,
    Sampling,
    TokenLogprob,
    TopLogprob,
)
from services.inference.engines.hf_batch import DecodeBatch, cache_window, prefill_groups, prefill_inputs
from services.inference.engines.text import IncrementalDetokenizer, StopMatcher

log = logging.getLogger(__name__)

T = TypeVar("T")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_STOP = object()  # the worker's shutdown sentinel
_BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
# Newcomers prefilled in one forward hold at most this many (padded) prompt tokens: the activations of a prefill grow
# with it, and beyond a few thousand tokens a forward is compute-bound anyway (nothing left to share).
PREFILL_BATCH_TOKENS = 4096


@dataclass
class _Job:
    """A callable the worker runs between two rounds; its result or error goes to ``future``."""

    fn: Callable[[], Any]
    future: Future[Any]


@dataclass(eq=False)
class _Sequence:
    """One request's state on the worker. ``aborted`` is set from the event loop; the worker only reads it."""

    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[EngineDelta | BaseException]
    detokenizer: IncrementalDetokenizer
    stops: StopMatcher
    eos_ids: frozenset[int]
    output: list[int] = field(default_factory=list)
    batch: DecodeBatch | None = None
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # prompt + output tokens, for the repetition penalty
    counts: torch.Tensor | None = None  # output token counts, for the presence and frequency penalties
    aborted: bool = False
    finished: bool = False
    # Context-aware decoding: the request's contrast prompt decodes as a row of its own (``shadow``) beside it, in
    # the same batch, fed the tokens the request chooses; it never emits. ``shadow_of`` marks that row.
    shadow: _Sequence | None = None
    shadow_of: _Sequence | None = None

    @property
    def sampling(self) -> Sampling:
        return self.request.sampling

    @property
    def slot_id(self) -> int | None:
        return self.request.adapter.slot_id if self.request.adapter else None


# Requests sent together reach the worker a few milliseconds apart (the server takes their RPCs one after another).
# An idle worker that receives one waits for the others — until none comes within ADMISSION_GAP_S, for at most
# ADMISSION_WINDOW_S — and prefills them in one forward, instead of the first alone and the rest a prefill later.
# A lone request pays the gap once (4 ms against a prefill of tens to hundreds).
ADMISSION_GAP_S = 0.004
ADMISSION_WINDOW_S = 0.025


class HfEngine:
    """``InferenceEngine`` on transformers + peft (see the module docstring)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._device = torch.device("cuda", 0) if config.device == "cuda" else torch.device("cpu")
        self._dtype = _DTYPES[config.dtype]
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        # Everything below belongs to the worker thread.
        self._model: Any = None  # the transformers model (peft injects its LoRA layers into it in place)
        self._peft: PeftModel | None = None
        self._lora_layers: list[Any] = []  # peft's LoRA layers in the model, for the per-forward switches below
        self._tokenizer: Any = None
        self._eos_ids: frozenset[int] = frozenset()
        self._forward_kwargs: dict[str, Any] = {}
        self._pad_id = 0
        self._sdpa = False  # the model attends with torch's SDPA: decode steps hand it a ready 4-D mask
        self._window = 0  # how long a row may grow in a shared batch (hf_batch.cache_window)
        self._slots: dict[int, AdapterSlot] = {}  # every added slot, resident or not
        self._resident: set[int] = set()  # slots whose weights are in the model now
        self._asleep = False
        self._active: list[_Sequence] = []
        self._waiting: deque[_Sequence] = deque()
        self._batches: list[DecodeBatch] = []  # the shared batch first; rows that outgrew a sliding window after it
        self._outbox: list[tuple[_Sequence, EngineDelta | BaseException]] | None = None  # set during a round
        self._mailboxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}
        self._rng = random.Random(config.seed)

    # ---------------------------------------------------------------------------------------------- protocol

    @property
    def info(self) -> EngineInfo:
        device = f"cuda:{self._device.index or 0}" if self._device.type == "cuda" else "cpu"
        return EngineInfo("hf", transformers.__version__, self.config.dtype, "none", device, "offload", contrast=True)

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="hf-engine", daemon=True)
        self._thread.start()
        try:
            await self._call(self._load_model)
        except BaseException:
            await self.shutdown()
            raise

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._inbox.put(_STOP)
            await asyncio.to_thread(self._thread.join)

    async def sleep(self, level: int = 1) -> None:
        await self._call(self._sleep)

    async def wake(self) -> None:
        await self._call(self._wake)

    async def add_adapter(self, slot: AdapterSlot) -> None:
        await self._call(lambda: self._add_adapter(slot))

    async def remove_adapter(self, slot: AdapterSlot) -> None:
        await self._call(lambda: self._remove_adapter(slot))

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        sequence = self._new_sequence(request)
        self._inbox.put(sequence)
        try:
            while True:
                item = await sequence.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            # Closed early or cancelled: the worker drops the request before its next step.
            sequence.aborted = True

    def kv_cache_usage(self) -> float:
        return 0.0  # no paged cache: every request's cache grows on its own

    def device_memory_bytes(self) -> int:
        if self._device.type != "cuda" or not torch.cuda.is_available():
            return 0
        return int(torch.cuda.memory_allocated(self._device))

    # ---------------------------------------------------------------------------------------------- event loop side

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker between two rounds and return its result."""
        if self._thread is None or self._closed:
            raise Unavailable("the hf engine is not running: start it first (or it was shut down)")
        future: Future[T] = Future()
        self._inbox.put(_Job(fn, future))
        return await asyncio.wrap_future(future)

    def _new_sequence(self, request: EngineRequest) -> _Sequence:
        if self._thread is None or self._closed:
            raise Unavailable("the hf engine is not running: start it first (or it was shut down)")
        if not request.prompt_token_ids:
            raise InvalidArgument("prompt_token_ids is empty", reason="EMPTY_INPUT")
        if len(request.prompt_token_ids) >= self.config.max_model_len:
            raise InvalidArgument(
                f"the prompt has {len(request.prompt_token_ids)} tokens and leaves no room to generate within "
                f"max_model_len {self.config.max_model_len}: shorten it",
                reason="CONTEXT_LENGTH_EXCEEDED",
            )
        sequence = self._sequence(request)
        contrast = request.contrast
        if contrast is not None and contrast.prompt_token_ids and contrast.weight > 0:
            shadow_request = EngineRequest(
                f"{request.request_id}~contrast", list(contrast.prompt_token_ids), request.sampling, request.adapter
            )
            sequence.shadow = self._sequence(shadow_request)
            sequence.shadow.shadow_of = sequence
        return sequence

    def _sequence(self, request: EngineRequest) -> _Sequence:
        sampling = request.sampling
        return _Sequence(
            request=request,
            loop=asyncio.get_running_loop(),
            out=asyncio.Queue(),
            detokenizer=IncrementalDetokenizer(
                self._tokenizer,
                prompt_token_ids=request.prompt_token_ids,
                skip_special_tokens=sampling.skip_special_tokens,
            ),
            stops=StopMatcher(sampling.stop),
            eos_ids=frozenset() if sampling.ignore_eos else self._eos_ids,
        )

    # ---------------------------------------------------------------------------------------------- worker loop

    def _run(self) -> None:
        while True:
            try:
                if not self._drain_inbox(block=not self._active and not self._waiting):
                    break
                self._admit()
                if self._active:
                    self._round()
            except Exception as error:  # the worker must survive anything: a dead worker hangs every caller
                log.exception("inference.hf.worker_error")
                for sequence in [*self._active, *self._waiting]:
                    self._fail(sequence, _internal(error))
                self._active.clear()
                self._waiting.clear()
                self._batches.clear()
        self._stop()

    def _drain_inbox(self, *, block: bool) -> bool:
        """Handle everything queued (waiting for the first item if ``block``); False once told to stop.

        An idle worker (``block``) that receives a request gathers the ones right behind it first (``_next_item``)."""
        try:
            item = self._inbox.get(block=block)
            gather_until = time.monotonic() + ADMISSION_WINDOW_S if block else 0.0
            while True:
                if item is _STOP:
                    return False
                if isinstance(item, _Job):
                    self._run_job(item)
                else:
                    self._waiting.append(item)
                item = self._next_item(gather_until)
        except queue.Empty:
            return True

    def _next_item(self, gather_until: float) -> Any:
        """The next queued item (queue.Empty if none). While gathering — a request came to an idle worker, less than
        ADMISSION_WINDOW_S ago — it waits up to ADMISSION_GAP_S for one still on its way."""
        remaining = gather_until - time.monotonic()
        if remaining <= 0 or not self._waiting:
            return self._inbox.get_nowait()
        return self._inbox.get(timeout=min(ADMISSION_GAP_S, remaining))

    @staticmethod
    def _run_job(job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn())
        except BaseException as error:  # handed to the awaiting coroutine, which re-raises it
            job.future.set_exception(error)

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self.config.max_concurrent_requests:
            sequence = self._waiting.popleft()
            if sequence.aborted:
                continue
            if self._asleep or self._model is None:
                self._fail(sequence, Unavailable("the hf engine is asleep: wake it before generating"))
                continue
            self._active.append(sequence)

    def _round(self) -> None:
        """Prefill the newcomers (grouped by adapter), then one decode step per batch, then the newcomers join.

        What the round emits is handed to the event loop in one call after each forward, not one per token: with 8
        rows that is one thread wake-up per step instead of 8."""
        self._outbox = []
        try:
            self._round_steps()
        finally:
            self._flush()
            self._outbox = None

    def _round_steps(self) -> None:
        newcomers = [sequence for sequence in self._active if sequence.batch is None]
        groups: dict[int | None, list[_Sequence]] = {}
        for sequence in newcomers:
            groups.setdefault(sequence.slot_id, []).append(sequence)
        prefilled: list[DecodeBatch] = []
        for slot_id, sequences in groups.items():
            try:
                with self._use_adapter(slot_id), torch.inference_mode():
                    prefilled += self._prefill_group(sequences)
            except Exception as error:  # switching adapters failed: this group fails, the others go on
                self._fail_all(sequences, error, "inference.hf.adapter_switch_failed")
        self._flush()  # the newcomers' first tokens go out before the batch's step
        for batch in list(self._batches):
            self._decode(batch)
            self._flush()
        for batch in prefilled:
            batch.keep([index for index, row in enumerate(batch.rows) if not row.finished])
            if batch.rows:
                self._join(batch)
        self._active = [sequence for sequence in self._active if not sequence.finished]

    def _join(self, prefilled: DecodeBatch) -> None:
        """Prefilled rows join the shared batch (or start one, or decode alone if they cannot share)."""
        shared = self._batches[0] if self._batches else None
        if shared is not None and shared.can_take(prefilled, self.config.max_concurrent_requests):
            shared.merge(prefilled)
        else:
            self._batches.insert(0 if prefilled.shared else len(self._batches), prefilled)
            shared = prefilled
        for row in prefilled.rows:
            row.batch = shared

    def _decode(self, batch: DecodeBatch) -> None:
        """One token for every row of ``batch`` in one forward pass."""
        for index, row in enumerate(batch.rows):
            request = row.shadow_of or row
            if request.shadow is not None and batch.shared and batch.positions[index] > batch.window:
                self._end_contrast(request, f"the answer reached the sliding window ({batch.window} tokens)")
        for index in batch.outgrown():  # about to reach a sliding window: on its own from now on
            if batch.rows[index].finished:
                continue  # an ended shadow: dropped below
            alone = batch.split_off(index)
            alone.rows[0].batch = alone
            self._batches.append(alone)
        self._keep_rows(batch, lambda row: row.batch is batch and not row.aborted and self._adapter_ready(row))
        if not batch.rows:
            return
        try:
            with self._batch_adapters(batch) as adapter_kwargs, torch.inference_mode():
                outputs = self._model(
                    **batch.step_inputs([row.output[-1] for row in batch.rows], sdpa=self._sdpa),
                    past_key_values=batch.cache,
                    use_cache=True,
                    **self._forward_kwargs,
                    **adapter_kwargs,
                )
        except Exception as error:  # the forward failed: this batch's requests end, the others go on
            self._fail_all(batch.rows, error, "inference.hf.step_failed")
            self._batches.remove(batch)
            return
        batch.stepped()
        with torch.inference_mode():  # the penalties' per-request tensors are inference tensors
            self._take_tokens(batch.rows, outputs.logits[:, -1])
        self._keep_rows(batch, lambda row: not row.finished)

    def _take_tokens(self, rows: list[_Sequence], last_logits: torch.Tensor) -> None:
        """Each request's next token from its row of ``last_logits`` — contrasted with its shadow's row where it has
        one — then each shadow is fed the token its request chose (or ends with it)."""
        logits = last_logits.float()  # like generate(): sample in float32 whatever the weights are
        at = {id(row): index for index, row in enumerate(rows)}
        for index, row in enumerate(rows):
            if row.shadow is not None and id(row.shadow) in at:
                weight = row.request.contrast.weight  # type: ignore[union-attr]  # a shadow implies a contrast
                logits[index] = (1 + weight) * logits[index] - weight * logits[at[id(row.shadow)]]
        best = logits.argmax(dim=-1).tolist()  # one op for every greedy row (most requests are greedy)
        for index, row in enumerate(rows):
            if row.shadow_of is None:
                self._token_or_fail(row, logits[index], best[index])
        for row in rows:
            if row.shadow_of is not None:
                self._follow(row)

    @staticmethod
    def _follow(shadow: _Sequence) -> None:
        request = shadow.shadow_of
        assert request is not None
        if request.finished or request.aborted or not request.output:
            shadow.finished = True
        else:
            shadow.output.append(request.output[-1])

    def _keep_rows(self, batch: DecodeBatch, keep: Callable[[_Sequence], bool]) -> None:
        """Keep the rows ``keep`` accepts (it is asked once per request); a shadow goes with its request."""
        for row in batch.rows:
            if row.aborted and not row.finished:
                row.finished = True
        kept = {id(row) for row in batch.rows if row.shadow_of is None and keep(row)}
        batch.keep(
            [
                index
                for index, row in enumerate(batch.rows)
                if id(row.shadow_of if row.shadow_of is not None else row) in kept and not row.finished
            ]
        )
        if not batch.rows:
            self._batches.remove(batch)

    def _adapter_ready(self, sequence: _Sequence) -> bool:
        """False (and the request failed) when its adapter was removed while it ran."""
        slot_id = sequence.slot_id
        if slot_id is None or slot_id in self._resident:
            return True
        self._fail(sequence, _adapter_not_loaded(slot_id))
        return False

    def _batch_adapters(self, batch: DecodeBatch) -> contextlib.AbstractContextManager[dict[str, Any]]:
        """One adapter for the whole batch: switch to it. Several: peft applies each row's own in one forward."""
        slots = {row.slot_id for row in batch.rows}
        if len(slots) == 1:
            return _with_kwargs(self._use_adapter(next(iter(slots))), {})
        assert self._peft is not None  # rows with adapters exist only once peft wraps the model
        names = [_BASE if row.slot_id is None else str(row.slot_id) for row in batch.rows]
        return _per_row_adapters(self._lora_layers, names)

    def _fail_all(self, sequences: list[_Sequence], error: Exception, event: str) -> None:
        if not isinstance(error, BatonError):
            log.exception(event)
        for sequence in sequences:
            if not sequence.finished:
                self._fail(sequence, _internal(error))

    def _use_adapter(self, slot_id: int | None) -> contextlib.AbstractContextManager[Any]:
        if slot_id is None:
            if self._peft is None or not self._peft.peft_config:
                return contextlib.nullcontext()  # no adapter anywhere: the LoRA layers (if any) are inert
            # Base-model requests: the LoRA layers are switched off for the forward, then on again.
            return _lora_off(self._lora_layers)
        name = str(slot_id)
        if self._peft is None or slot_id not in self._resident:
            raise _adapter_not_loaded(slot_id)
        if self._peft.active_adapter != name:
            self._peft.set_adapter(name, inference_mode=True)
        return contextlib.nullcontext()

    def _prefill_group(self, sequences: list[_Sequence]) -> list[DecodeBatch]:
        """The newcomers of one adapter, prefilled in as few forwards as ``prefill_groups`` allows."""
        for sequence in sequences:
            sequence.finished |= sequence.aborted
        live = [sequence for sequence in sequences if not sequence.finished]
        for sequence in live:
            self._check_contrast(sequence)
        plain = [sequence for sequence in live if sequence.shadow is None]
        lengths = [len(sequence.request.prompt_token_ids) for sequence in plain]
        groups = [[plain[i] for i in group] for group in prefill_groups(lengths, PREFILL_BATCH_TOKENS, self._window)]
        # A request with a contrast is prefilled with its shadow: both rows have their first logits in one forward.
        groups += [[sequence, sequence.shadow] for sequence in live if sequence.shadow is not None]
        batches = []
        for rows in groups:
            try:
                batches.append(self._prefill(rows))
            except Exception as error:  # a torch error must end these requests, not the worker
                self._fail_all(rows, error, "inference.hf.step_failed")
        return batches

    def _check_contrast(self, sequence: _Sequence) -> None:
        """A request and its shadow share one batch, so both must fit the model's sliding window (a row past it
        decodes alone): a prompt already past it decodes without the contrast."""
        if sequence.shadow is None:
            return
        length = max(len(sequence.request.prompt_token_ids), len(sequence.shadow.request.prompt_token_ids))
        if length > self._window:
            self._end_contrast(sequence, f"the prompt ({length} tokens) is past the sliding window ({self._window})")

    def _end_contrast(self, sequence: _Sequence, why: str) -> None:
        """The request goes on with plain decoding; its shadow row is dropped with the next ``keep``."""
        assert sequence.shadow is not None
        log_event(log, "inference.hf.contrast_ended", level=logging.WARNING, request_id=sequence.request.request_id,
                  why=why)  # fmt: skip
        sequence.shadow.finished = True
        sequence.shadow = None

    def _token_or_fail(self, sequence: _Sequence, logits: torch.Tensor, argmax: int | None = None) -> None:
        try:
            self._take_token(sequence, logits, argmax)
        except Exception as error:
            self._fail_all([sequence], error, "inference.hf.step_failed")

    def _stop(self) -> None:
        for sequence in [*self._active, *self._waiting]:
            self._fail(sequence, Unavailable("the hf engine shut down: send the request again", retry_after_s=1.0))
        self._active.clear()
        self._waiting.clear()
        self._batches.clear()
        self._free_model()
        # Anything submitted while stopping gets an answer instead of hanging.
        with contextlib.suppress(queue.Empty):
            while True:
                item = self._inbox.get_nowait()
                if isinstance(item, _Job) and item.future.set_running_or_notify_cancel():
                    item.future.set_exception(Unavailable("the hf engine shut down"))
                elif isinstance(item, _Sequence):
                    self._fail(item, Unavailable("the hf engine shut down: send the request again"))

    # ---------------------------------------------------------------------------------------------- one token

    def _prefill(self, rows: list[_Sequence]) -> DecodeBatch:
        """The rows' whole prompts in one forward pass (one row: unpadded, as generate() runs it), then each row's
        first token; the cache they share, as a batch about to join the shared one."""
        cache = DynamicCache(config=self._model.config)
        prompts = [row.request.prompt_token_ids for row in rows]
        if len(rows) == 1:
            inputs = {"input_ids": torch.tensor(prompts, device=self._device)}
        else:
            inputs = prefill_inputs(prompts, self._pad_id, self._device)
        outputs = self._model(**inputs, past_key_values=cache, use_cache=True, **self._forward_kwargs)
        self._take_tokens(rows, outputs.logits[:, -1])
        if len(rows) == 1:
            return DecodeBatch.of_one(rows[0], cache, len(prompts[0]))
        return DecodeBatch.of_prefill(rows, cache, inputs["attention_mask"])

    def _take_token(self, sequence: _Sequence, logits: torch.Tensor, argmax: int | None = None) -> None:
        """Choose the next token from these logits (``argmax``: theirs, if already known), record it, send it on."""
        request = sequence.request
        token = argmax if argmax is not None and _plain_greedy(sequence) else self._choose(sequence, logits)
        delta = EngineDelta(token_ids=[token])
        if request.sampling.logprobs is not None:
            delta.logprobs = [self._logprob(logits, token, request.sampling.logprobs)]
        sequence.output.append(token)
        self._record(sequence, token)
        self._advance(sequence, token, delta)

    def _advance(self, sequence: _Sequence, token: int, delta: EngineDelta) -> None:
        """Decode the new token, check every stop condition, and send the delta."""
        sampling = sequence.sampling
        # The EOS or stop token ends the request; it counts as generated but adds no text (as in vLLM).
        if token in sequence.eos_ids:
            self._finish(sequence, delta, "stop", "")
            return
        if token in sampling.stop_token_ids:
            self._finish(sequence, delta, "stop", self._token_text(token))
            return
        text = sequence.detokenizer.add([token])
        # As in vLLM, stop strings only count once min_tokens tokens exist.
        if len(sequence.output) >= sampling.min_tokens:
            result = sequence.stops.feed(text)
            delta.text = result.text
            if result.matched is not None:
                self._finish(sequence, delta, "stop", result.matched, flush=False)
                return
        else:
            delta.text = text
        total = len(sequence.request.prompt_token_ids) + len(sequence.output)
        if len(sequence.output) >= sampling.max_tokens or total >= self.config.max_model_len:
            self._finish(sequence, delta, "length", "")
        else:
            self._emit(sequence, delta)

    def _finish(
        self, sequence: _Sequence, delta: EngineDelta, reason: FinishReason, matched: str, *, flush: bool = True
    ) -> None:
        if flush:
            # Release what was held back: an incomplete character, the possible start of a stop string.
            result = sequence.stops.feed(sequence.detokenizer.flush())
            delta.text += result.text
            if result.matched is not None:
                reason, matched = "stop", result.matched
            else:
                delta.text += sequence.stops.flush()
        delta.finish_reason, delta.matched_stop = reason, matched
        sequence.finished = True
        self._emit(sequence, delta)

    # ---------------------------------------------------------------------------------------------- sampling

    def _choose(self, sequence: _Sequence, logits: torch.Tensor) -> int:
        sampling = sequence.sampling
        logits = self._penalize(sequence, logits.clone())
        if len(sequence.output) < sampling.min_tokens:
            banned = [token for token in (*sequence.eos_ids, *sampling.stop_token_ids) if token < logits.shape[-1]]
            if banned:
                logits[banned] = float("-inf")
        if sampling.temperature == 0:
            return int(torch.argmax(logits))
        probs = _filtered_probs(logits / sampling.temperature, sampling)
        if sequence.generator is None:
            seed = sampling.seed if sampling.seed is not None else self._rng.getrandbits(63)
            sequence.generator = torch.Generator(device=logits.device).manual_seed(seed)
        return int(torch.multinomial(probs, 1, generator=sequence.generator))

    def _penalize(self, sequence: _Sequence, logits: torch.Tensor) -> torch.Tensor:
        sampling = sequence.sampling
        vocab = logits.shape[-1]
        if sampling.repetition_penalty != 1.0:
            if sequence.seen is None:
                sequence.seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
                prompt = [token for token in sequence.request.prompt_token_ids if token < vocab]
                sequence.seen[prompt] = True
            penalty = sampling.repetition_penalty
            # CTRL / vLLM: positive logits of seen tokens shrink, negative ones grow.
            penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(sequence.seen, penalized, logits)
        if sampling.presence_penalty or sampling.frequency_penalty:
            if sequence.counts is None:
                sequence.counts = torch.zeros(vocab, dtype=logits.dtype, device=logits.device)
            counts = sequence.counts
            logits = logits - sampling.frequency_penalty * counts - sampling.presence_penalty * (counts > 0)
        return logits

    @staticmethod
    def _record(sequence: _Sequence, token: int) -> None:
        if sequence.seen is not None and token < sequence.seen.shape[0]:
            sequence.seen[token] = True
        if sequence.counts is not None and token < sequence.counts.shape[0]:
            sequence.counts[token] += 1

    def _logprob(self, logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
        # Log-probabilities of the model's own distribution, before penalties and temperature (vLLM's default).
        logprobs = torch.log_softmax(logits, dim=-1)
        best: tuple[TopLogprob, ...] = ()
        if top > 0:
            values, indices = torch.topk(logprobs, min(top, logprobs.shape[-1]))
            best = tuple(
                TopLogprob(int(index), self._token_text(int(index)), float(value))
                for value, index in zip(values.tolist(), indices.tolist(), strict=True)
            )
        return TokenLogprob(token, self._token_text(token), float(logprobs[token]), best)

    def _token_text(self, token: int) -> str:
        return self._tokenizer.decode([token], skip_special_tokens=False)

    # ---------------------------------------------------------------------------------------------- results

    def _emit(self, sequence: _Sequence, item: EngineDelta | BaseException) -> None:
        if self._outbox is not None:
            self._outbox.append((sequence, item))
        else:
            self._send([(sequence, item)])

    def _flush(self) -> None:
        if self._outbox:
            items, self._outbox = self._outbox, []
            self._send(items)

    def _send(self, items: list[tuple[_Sequence, EngineDelta | BaseException]]) -> None:
        """Hand items to their event loops' mailboxes (in practice the service's one loop)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Sequence, EngineDelta | BaseException]]] = {}
        for sequence, item in items:
            by_loop.setdefault(sequence.loop, []).append((sequence, item))
        for loop, delivery in by_loop.items():
            mailbox = self._mailboxes.get(loop)
            if mailbox is None:
                mailbox = self._mailboxes[loop] = _Mailbox(loop)
            try:
                mailbox.post(delivery)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                del self._mailboxes[loop]
                for sequence, _ in delivery:
                    sequence.aborted = True

    def _fail(self, sequence: _Sequence, error: BaseException) -> None:
        sequence.finished = True
        if sequence.shadow_of is None:  # a shadow has nobody to tell: its request fails or goes on without it
            self._emit(sequence, error)

    # ---------------------------------------------------------------------------------------------- model

    def _load_model(self) -> None:
        started = time.perf_counter()
        path = Path(self.config.model_path)
        _check_model_folder(path)
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise Unavailable("device is cuda but torch sees no GPU: set device to cpu or run on a GPU machine")
        try:
            if self._tokenizer is None:
                self._tokenizer = AutoTokenizer.from_pretrained(str(path))
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=self._dtype, device_map=str(self._device))
        except Exception as error:
            raise Unavailable(
                f"cannot load the model from {path}: {type(error).__name__}: {error}", reason="MODEL_LOAD_FAILED"
            ) from error
        model.eval()
        model.requires_grad_(False)
        use_weight_first_output_layer(model)  # a big vocabulary's logits for a few rows: ~1.7x faster steps on a CPU
        self._model, self._peft = model, None
        self._lora_layers = []
        self._eos_ids = _eos_ids(model, self._tokenizer)
        # What fills the left padding of a batched prefill (masked out: any real id will do).
        self._pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        self._sdpa = getattr(model.config, "_attn_implementation", None) == "sdpa"
        self._window = cache_window(DynamicCache(config=model.config))  # the model's, known once it is loaded
        # Only the last position's logits: a long prompt's full logits would take prompt × vocab floats.
        accepts = inspect.signature(model.forward).parameters
        self._forward_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        log_event(
            log,
            "inference.hf.model_loaded",
            path=str(path),
            device=str(self._device),
            dtype=self.config.dtype,
            seconds=round(time.perf_counter() - started, 3),
        )

    def _free_model(self) -> None:
        self._model = self._peft = None
        self._lora_layers = []
        self._resident.clear()
        gc.collect()
        if self._device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _sleep(self) -> None:
        if self._asleep:
            return
        # Requests the core aborted just before may still be listed: they are dropped now, not at the next round.
        self._active = [sequence for sequence in self._active if not sequence.aborted]
        self._waiting = deque(sequence for sequence in self._waiting if not sequence.aborted)
        if self._active or self._waiting:
            raise FailedPrecondition("the hf engine cannot sleep while requests run: drain them first")
        self._batches.clear()  # only aborted rows can be left in them
        started = time.perf_counter()
        if self._device.type == "cuda":
            self._model.to("cpu")  # the LoRA layers are submodules: they move with it
            gc.collect()  # KV caches of finished requests may still be referenced from cycles
            torch.cuda.empty_cache()
        else:
            self._free_model()
        self._asleep = True
        log_event(log, "inference.hf.asleep", device=str(self._device), seconds=round(time.perf_counter() - started, 3))

    def _wake(self) -> None:
        if not self._asleep:
            return
        started = time.perf_counter()
        if self._device.type == "cuda":
            self._model.to(self._device)
        else:
            self._load_model()
        self._asleep = False
        for slot in list(self._slots.values()):
            if slot.slot_id in self._resident:
                continue
            try:
                self._load_adapter(slot)
            except BatonError as error:
                # The engine is awake and serves the rest; requests for this slot get ADAPTER_NOT_LOADED.
                self._slots.pop(slot.slot_id, None)
                log_event(log, "inference.hf.adapter_lost", level=logging.ERROR, slot=slot.slot_id, error=error.message)
        seconds = round(time.perf_counter() - started, 3)
        log_event(log, "inference.hf.awake", adapters=len(self._resident), seconds=seconds)

    # ---------------------------------------------------------------------------------------------- adapters

    def _add_adapter(self, slot: AdapterSlot) -> None:
        if slot.slot_id in self._resident:
            return
        if self._asleep:
            self._slots[slot.slot_id] = slot  # loaded on wake
            return
        self._load_adapter(slot)
        self._slots[slot.slot_id] = slot

    def _remove_adapter(self, slot: AdapterSlot) -> None:
        self._slots.pop(slot.slot_id, None)
        if slot.slot_id in self._resident:
            self._resident.discard(slot.slot_id)
            self._discard_adapter(str(slot.slot_id))
            log_event(log, "inference.hf.adapter_removed", slot=slot.slot_id, name=slot.name)

    def _load_adapter(self, slot: AdapterSlot) -> None:
        started = time.perf_counter()
        name = str(slot.slot_id)
        try:
            self._load_peft_weights(slot.path, name)
        except Exception as error:
            self._discard_adapter(name)
            raise InvalidArgument(
                f"peft rejected the adapter {slot.name!r} at {slot.path}: {type(error).__name__}: {error} — "
                "check that it is a LoRA adapter trained for this base model",
                reason="ADAPTER_REJECTED",
            ) from error
        self._resident.add(slot.slot_id)
        log_event(
            log,
            "inference.hf.adapter_loaded",
            slot=slot.slot_id,
            name=slot.name,
            seconds=round(time.perf_counter() - started, 3),
        )

    def _load_peft_weights(self, path: Path, name: str) -> None:
        if self._peft is None:
            # Wrap first, then load: with a reference kept, a failed load can be undone (from_pretrained would leave
            # half-injected layers in the base model behind).
            config = PeftConfig.from_pretrained(str(path))
            config.inference_mode = True
            self._peft = PeftModel(self._model, config, adapter_name=name)
        result = self._peft.load_adapter(str(path), adapter_name=name, is_trainable=False)
        # Keys that do not fit leave parts of the adapter at their initial values: a silently wrong adapter.
        missing = adapter_keys(result.missing_keys, name)
        if missing or result.unexpected_keys:
            raise ValueError(
                f"the weights do not match the adapter's modules (missing {missing[:3]}, "
                f"unexpected {list(result.unexpected_keys)[:3]})"
            )
        self._peft.eval()
        self._lora_layers = [module for module in self._model.modules() if isinstance(module, LoraLayer)]

    def _discard_adapter(self, name: str) -> None:
        if self._peft is not None and name in self._peft.peft_config:
            others = [other for other in self._peft.peft_config if other != name]
            if others and self._peft.active_adapter == name:
                # Deleting the active adapter makes peft pick another one and warn on every layer.
                self._peft.set_adapter(others[0], inference_mode=True)
            self._peft.delete_adapter(name)
            self._lora_layers = [module for module in self._model.modules() if isinstance(module, LoraLayer)]
            return
        if self._model is None:
            return
        # The PeftModel could not even be built: strip whatever peft injected before it failed.
        for module in self._model.modules():
            if isinstance(module, BaseTunerLayer):
                module.delete_adapter(name)
        configs = getattr(self._model, "peft_config", None)
        if isinstance(configs, dict):
            configs.pop(name, None)
            if not configs:
                del self._model.peft_config


class _Mailbox:
    """What the worker hands one event loop, with at most one wake-up pending.

    Waking a loop from another thread (``call_soon_threadsafe``) is a write to its self-pipe, measured at a tenth of
    the worker's time with 8 streams of the tiny model. While the loop has not yet run the last delivery (it is busy
    sending the previous tokens), later items join that delivery instead of waking it again.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[_Sequence, EngineDelta | BaseException]] = []

    def post(self, items: list[tuple[_Sequence, EngineDelta | BaseException]]) -> None:
        with self._lock:
            wake = not self._items  # else a delivery is pending and will take these too
            self._items += items
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:
                with self._lock:
                    self._items.clear()
                raise

    def _deliver(self) -> None:  # on the event loop
        with self._lock:
            items, self._items = self._items, []
        for sequence, item in items:
            sequence.out.put_nowait(item)


def _plain_greedy(sequence: _Sequence) -> bool:
    """Greedy with nothing that changes the logits first: the batch's argmax is this request's token."""
    sampling = sequence.sampling
    return (
        sampling.temperature == 0
        and sampling.repetition_penalty == 1.0
        and not sampling.presence_penalty
        and not sampling.frequency_penalty
        and len(sequence.output) >= sampling.min_tokens
    )


def _adapter_not_loaded(slot_id: int) -> NotFound:
    return NotFound(
        f"adapter slot {slot_id} is not loaded in the hf engine: load the adapter again", reason="ADAPTER_NOT_LOADED"
    )


@contextlib.contextmanager
def _with_kwargs(context: contextlib.AbstractContextManager[Any], kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:
    with context:
        yield kwargs


# peft's own switches walk the whole module tree on every call (PeftModel.disable_adapter even builds a status
# report): 2–3 ms per forward on the tiny model, more than the forward itself. The engine keeps the list of LoRA
# layers (refreshed when an adapter comes or goes) and flips them directly, per forward.


@contextlib.contextmanager
def _lora_off(layers: list[Any]) -> Iterator[None]:
    """The base model alone: every LoRA layer off for the forward (the flag BaseTunerLayer.disable_adapters reads)."""
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False


@contextlib.contextmanager
def _per_row_adapters(layers: list[Any], names: list[str]) -> Iterator[dict[str, Any]]:
    """Each row with its own adapter (``__base__``: none): what PeftModel.forward(adapter_names=...) does, a
    pre-forward hook handing every LoRA layer the names, without walking the module tree."""

    def hand_names(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kwargs["adapter_names"] = names
        return args, kwargs

    handles = [layer.register_forward_pre_hook(hand_names, with_kwargs=True) for layer in layers]
    try:
        yield {}
    finally:
        for handle in handles:
            handle.remove()


def adapter_keys(keys: Iterable[str], name: str) -> list[str]:
    """The state-dict keys of adapter ``name`` among ``keys`` (peft lists every adapter's as missing on a load).

    "…layers.2.self_attn.q_proj.lora_A.1.weight" belongs to adapter "1", not "2": the name is the part right after
    a ``lora_*`` part, never a layer index.
    """
    pattern = re.compile(rf"\.lora_[A-Za-z_]+\.{re.escape(name)}(\.|$)")
    return [key for key in keys if pattern.search(key)]


def _internal(error: BaseException) -> BatonError:
    if isinstance(error, BatonError):
        return error
    return Internal(f"generation failed in the hf engine: {type(error).__name__}: {error}")


def _filtered_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Probabilities after min-p, top-k and top-p (vLLM's order); the most likely token always survives."""
    if sampling.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < sampling.min_p * probs.max(), float("-inf"))
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the tokens before it already cover top_p.
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) > sampling.top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return torch.softmax(logits, dim=-1)


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(token) for token in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def _check_model_folder(path: Path) -> None:
    """Say which file is missing before transformers fails with a hub lookup error."""
    hint = "point model_path at a local Hugging Face model folder (config.json, weights, tokenizer)"
    if not path.is_dir():
        raise Unavailable(f"model folder {path} does not exist: {hint}", reason="MODEL_NOT_FOUND")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(any(path.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        missing.append(f"a tokenizer ({' or '.join(_TOKENIZER_FILES)})")
    if missing:
        raise Unavailable(f"model folder {path} has no {', no '.join(missing)}: {hint}", reason="MODEL_NOT_FOUND")
