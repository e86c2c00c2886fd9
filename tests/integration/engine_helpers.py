"""What the engine tests share: a config for the tiny Qwen3, adapter slots, the transformers/peft reference and a
stream collector.

The engines are driven directly, without gRPC (``test_engine_conformance.py`` for what every engine must do alike,
``test_hf_engine.py`` and ``test_vllm_engine.py`` for what only one of them does). The reference for every greedy
output is plain ``transformers`` ``generate(do_sample=False)`` (with ``peft`` for an adapter), so each engine's own
decoding — KV caches, batching, adapter switching, sleep and wake — is pinned to the library's, and so to the other
engine's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton.models.tiny import CHAT_PROMPTS, chat_prompt_ids
from services.inference.engine import (
    AdapterSlot,
    Contrast,
    EngineConfig,
    EngineDelta,
    EngineRequest,
    InferenceEngine,
    Sampling,
)
from tests.fixtures.inference import AdapterRegistry

MAX_TOKENS = 24

E = TypeVar("E", bound=InferenceEngine)


@dataclass
class Output:
    """One request's stream, put together."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    matched_stop: str = ""
    cached_prompt_tokens: int = 0
    deltas: list[EngineDelta] = field(default_factory=list)
    first_at: float = 0.0
    done_at: float = 0.0


def make_config(model_path: Path, **overrides: object) -> EngineConfig:
    """Small limits, so that vLLM's KV cache and LoRA slots fit this CPU (the hf engine ignores what it lacks)."""
    settings: dict[str, object] = {
        "model_path": model_path,
        "device": "cpu",
        "dtype": "float32",
        "max_model_len": 512,
        "max_concurrent_requests": 4,
        "max_lora_rank": 16,
        "max_loras": 2,
        "max_loaded_adapters": 4,
        "cpu_kv_cache_gib": 0.25,
    }
    return EngineConfig(**{**settings, **overrides})  # type: ignore[arg-type]


def slot(registry: AdapterRegistry, slot_id: int, folder: str) -> AdapterSlot:
    return AdapterSlot(slot_id, folder, registry.root / folder, 8)


@contextlib.asynccontextmanager
async def started(engine: E, registry: AdapterRegistry | None = None) -> AsyncIterator[E]:
    """The engine started (with phrase-a as slot 1 and phrase-b as slot 2 if given a registry), shut down after."""
    try:
        await engine.start()
        if registry is not None:
            await engine.add_adapter(slot(registry, 1, "phrase-a"))
            await engine.add_adapter(slot(registry, 2, "phrase-b"))
        yield engine
    finally:
        await engine.shutdown()


@functools.cache
def tokenizer(model_path: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(model_path))


def prompt_ids(model_path: Path, prompt: str = CHAT_PROMPTS[0]) -> list[int]:
    return chat_prompt_ids(tokenizer(model_path), prompt)


def decode(model_path: Path, token_ids: list[int]) -> str:
    return tokenizer(model_path).decode(token_ids, skip_special_tokens=True)


def expected_finish(model_path: Path, token_ids: list[int], max_tokens: int = MAX_TOKENS) -> str:
    eos = tokenizer(model_path).convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    return "stop" if token_ids[-1] in eos and len(token_ids) <= max_tokens else "length"


@functools.cache
def reference(model_path: Path, prompt: str, adapter_dir: Path | None, max_new_tokens: int = MAX_TOKENS) -> list[int]:
    """Greedy token ids from plain transformers (+ peft), float32 on the CPU."""
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    input_ids = torch.tensor([prompt_ids(model_path, prompt)])
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer(model_path).pad_token_id,
        )
    return output[0, input_ids.shape[1] :].tolist()


async def run(
    engine: InferenceEngine,
    ids: list[int],
    adapter: AdapterSlot | None = None,
    *,
    request_id: str = "r",
    streaming: asyncio.Event | None = None,
    lag: float = 0.0,
    contrast: Contrast | None = None,
    **sampling: object,
) -> Output:
    """Generate (greedy, ``MAX_TOKENS`` unless told otherwise) and collect the stream; ``streaming`` is set at the
    first delta; ``lag`` seconds of sleep after each delta make a slow consumer."""
    params: dict[str, object] = {"max_tokens": MAX_TOKENS, "temperature": 0.0, **sampling}
    out = Output()
    request = EngineRequest(request_id, ids, Sampling(**params), adapter, contrast)  # type: ignore[arg-type]
    async for delta in engine.generate(request):
        out.first_at = out.first_at or time.monotonic()
        if streaming is not None:
            streaming.set()
        out.deltas.append(delta)
        out.token_ids += delta.token_ids
        out.text += delta.text
        if delta.finish_reason is not None:
            out.finish_reason, out.matched_stop = delta.finish_reason, delta.matched_stop
            out.cached_prompt_tokens = delta.cached_prompt_tokens
        if lag:
            await asyncio.sleep(lag)
    out.done_at = time.monotonic()
    return out


def vllm_processes() -> set[int]:
    """Live vLLM processes under this one (multiprocessing's resource tracker is shared and stays)."""
    found = set()
    for child in psutil.Process(os.getpid()).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.name().startswith("VLLM::") and child.status() != psutil.STATUS_ZOMBIE:
                found.add(child.pid)
    return found


async def wait_vllm_processes_gone(pids: set[int]) -> None:
    # Generous: on two busy cores an exiting engine core can take many seconds to be reaped.
    deadline = time.monotonic() + 45
    while left := pids & vllm_processes():
        assert time.monotonic() < deadline, f"vLLM processes left behind: {left}"
        await asyncio.sleep(0.1)
