"""What only the hf engine (transformers + peft) does, driven directly on the tiny Qwen3 and its phrase adapters.

Its own scheduler (newcomers of a round prefilled together, then one batched forward per step for every running
request, at most
``max_concurrent_requests`` active, the rest FIFO), its prompt checks, peft's adapter wrapping and its start
failures. What both engines must do alike — exact greedy outputs, adapters, aborts, stop conditions, sampling,
sleep and wake — is in ``test_engine_conformance.py``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from baton.models.tiny import CHAT_PROMPTS
from baton.runtime.errors import InvalidArgument, Unavailable
from services.inference.engine import AdapterSlot, EngineRequest, Sampling
from services.inference.engines.hf_engine import HfEngine
from tests.fixtures.inference import PHRASE_A, AdapterRegistry
from tests.integration.engine_helpers import make_config, prompt_ids, reference, run, slot, started

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def engine(tiny_llm: Path) -> AsyncIterator[HfEngine]:
    async with started(HfEngine(make_config(tiny_llm))) as engine:
        yield engine


# ------------------------------------------------------------------------------------------------ scheduling


async def test_a_newcomer_gets_its_first_token_while_a_long_request_runs(engine: HfEngine, tiny_llm: Path) -> None:
    ids = prompt_ids(tiny_llm)
    long_run = asyncio.create_task(run(engine, ids, max_tokens=300, ignore_eos=True, request_id="long"))
    await asyncio.sleep(0.05)
    short = await run(engine, ids, max_tokens=3, request_id="short")
    long = await long_run
    assert len(long.token_ids) == 300 and long.finish_reason == "length"
    assert short.done_at < long.done_at  # the short one did not wait for the long one


async def test_concurrent_requests_decode_in_one_forward_per_step_and_equal_their_single_output(
    tiny_llm: Path, adapter_registry: AdapterRegistry
) -> None:
    """Prompts of different lengths (so rows are padded), the base model and both adapters in one batch (peft's
    per-row adapters): each output equals the request's own, and a step is one forward for all, not one each."""
    async with started(HfEngine(make_config(tiny_llm)), adapter_registry) as engine:
        adapters = [None, slot(adapter_registry, 1, "phrase-a"), slot(adapter_registry, 2, "phrase-b"), None]
        requests = list(zip((prompt_ids(tiny_llm, prompt) for prompt in CHAT_PROMPTS[:4]), adapters, strict=True))
        assert len({len(ids) for ids, _ in requests}) > 1
        sampling: dict[str, Any] = {"max_tokens": 24, "ignore_eos": True}
        singles = [await run(engine, ids, adapter, **sampling) for ids, adapter in requests]
        forwards = count_forwards(engine)
        together = await asyncio.gather(
            *(run(engine, ids, adapter, request_id=f"b{i}", **sampling) for i, (ids, adapter) in enumerate(requests))
        )
        assert [out.token_ids for out in together] == [out.token_ids for out in singles]
        assert [out.text for out in together] == [out.text for out in singles]
        # 4 prefills, then one decode forward per step (a request that arrived a round late adds a few).
        assert len(forwards) <= 4 + 24 + 4 < 4 * 24, forwards
        assert max(forwards) == 4, forwards  # every request in the same forward


async def test_requests_arriving_together_are_prefilled_in_one_forward(tiny_llm: Path) -> None:
    """Six requests queued while the worker is busy start in the same round: their prompts (different lengths,
    left-padded) go through one prefill forward, and each output still equals the request's own."""
    async with started(HfEngine(make_config(tiny_llm))) as engine:
        requests = [prompt_ids(tiny_llm, prompt) for prompt in CHAT_PROMPTS[:6]]
        assert len({len(ids) for ids in requests}) > 1
        sampling: dict[str, Any] = {"max_tokens": 12, "ignore_eos": True}
        singles = [await run(engine, ids, **sampling) for ids in requests]
        shapes = record_input_shapes(engine)
        gate = threading.Event()
        busy = asyncio.create_task(engine._call(lambda: gate.wait(10)))  # the worker runs this job meanwhile
        await asyncio.sleep(0.05)
        together = [
            asyncio.create_task(run(engine, ids, request_id=f"t{i}", **sampling)) for i, ids in enumerate(requests)
        ]
        await asyncio.sleep(0.05)
        gate.set()
        await busy
        outputs = await asyncio.gather(*together)
        assert [out.token_ids for out in outputs] == [out.token_ids for out in singles]
        prefills = [shape for shape in shapes if shape[1] > 1]
        assert len(prefills) < len(requests) and max(rows for rows, _ in prefills) > 1, shapes


async def test_requests_sent_together_to_an_idle_engine_share_the_first_prefill(tiny_llm: Path) -> None:
    """Requests that reach an idle worker a millisecond apart (as a server hands over RPCs sent together) are
    gathered into one prefill forward — not the first alone and the rest in the next round."""
    async with started(HfEngine(make_config(tiny_llm))) as engine:
        requests = [prompt_ids(tiny_llm, CHAT_PROMPTS[0])] * 4  # one length: one prefill group if gathered
        sampling: dict[str, Any] = {"max_tokens": 4, "ignore_eos": True}
        singles = [await run(engine, ids, **sampling) for ids in requests]
        shapes = record_input_shapes(engine)
        together = []
        for index, ids in enumerate(requests):
            together.append(asyncio.create_task(run(engine, ids, request_id=f"t{index}", **sampling)))
            await asyncio.sleep(0.001)
        outputs = await asyncio.gather(*together)
        assert [out.token_ids for out in outputs] == [out.token_ids for out in singles]
        prefills = [shape for shape in shapes if shape[1] > 1]
        assert [rows for rows, _ in prefills] == [len(requests)], shapes


def record_input_shapes(engine: HfEngine) -> list[tuple[int, int]]:
    """(rows, tokens) of every forward the engine's model runs from now on."""
    shapes: list[tuple[int, int]] = []

    def record(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        shapes.append(tuple(kwargs["input_ids"].shape))

    engine._model.register_forward_pre_hook(record, with_kwargs=True)
    return shapes


def count_forwards(engine: HfEngine) -> list[int]:
    """The batch size of every forward the engine's model runs from now on."""
    sizes: list[int] = []

    def record(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sizes.append(len(kwargs["input_ids"]))

    engine._model.register_forward_pre_hook(record, with_kwargs=True)
    return sizes


async def test_requests_beyond_max_concurrent_wait_their_turn(tiny_llm: Path) -> None:
    async with started(HfEngine(make_config(tiny_llm, max_concurrent_requests=1))) as engine:
        ids = prompt_ids(tiny_llm)
        first, second = await asyncio.gather(
            run(engine, ids, max_tokens=40, ignore_eos=True, request_id="first"),
            run(engine, ids, max_tokens=40, ignore_eos=True, request_id="second"),
        )
        assert first.token_ids == second.token_ids
        assert first.done_at <= second.first_at  # FIFO: the second started only after the first finished


async def test_generate_checks_the_prompt(engine: HfEngine) -> None:
    with pytest.raises(InvalidArgument):
        await run(engine, [])
    with pytest.raises(InvalidArgument) as too_long:
        await run(engine, [5] * 512)
    assert too_long.value.reason == "CONTEXT_LENGTH_EXCEEDED"
    # max_model_len caps the answer even if max_tokens would allow more.
    out = await run(engine, [5] * 500, max_tokens=50, ignore_eos=True)
    assert (len(out.token_ids), out.finish_reason) == (12, "length")


# ------------------------------------------------------------------------------------------------ adapters, sleep


async def test_a_rejected_first_adapter_leaves_the_base_model_untouched(
    tiny_llm: Path, adapter_registry: AdapterRegistry
) -> None:
    """The first adapter wraps the model in a PeftModel: a failed first load must strip what peft injected."""
    async with started(HfEngine(make_config(tiny_llm))) as engine:
        ids = prompt_ids(tiny_llm)
        with pytest.raises(InvalidArgument):
            await engine.add_adapter(AdapterSlot(1, "other", adapter_registry.root / "other-base", 8))
        assert (await run(engine, ids)).token_ids == reference(tiny_llm, CHAT_PROMPTS[0], None)
        await engine.add_adapter(slot(adapter_registry, 2, "phrase-a"))
        assert (await run(engine, ids, slot(adapter_registry, 2, "phrase-a"))).text == PHRASE_A


async def test_sleep_right_after_an_abort_succeeds(engine: HfEngine, tiny_llm: Path) -> None:
    """The core aborts what still runs, then sleeps: the aborted request must not block the sleep."""
    ids = prompt_ids(tiny_llm)
    sampling = Sampling(max_tokens=400, temperature=0.0, ignore_eos=True)
    stream = engine.generate(EngineRequest("cut-short", ids, sampling))
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    await engine.sleep()
    await engine.wake()
    assert (await run(engine, ids)).token_ids == reference(tiny_llm, CHAT_PROMPTS[0], None)


# ------------------------------------------------------------------------------------------------ start failures


async def test_a_model_folder_without_weights_names_what_is_missing(tmp_path: Path, tiny_llm: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_llm / "config.json").read_text())
    with pytest.raises(Unavailable) as no_weights:
        await HfEngine(make_config(broken)).start()
    assert str(broken) in no_weights.value.message
    assert "weights" in no_weights.value.message and "tokenizer" in no_weights.value.message
