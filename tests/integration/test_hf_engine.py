"""The hf engine (transformers + peft) driven directly, without gRPC, on the tiny Qwen3 and its phrase adapters.

The reference for every greedy output is plain ``transformers`` ``generate(do_sample=False)`` (with ``peft`` for an
adapter), so these tests pin the engine's own decoding loop — KV caches, round-robin scheduling, adapter switching,
sleep and wake — to the library's. Token ids are compared, and the streamed text to the full decode.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton.models.tiny import CHAT_PROMPTS, chat_prompt_ids
from baton.runtime.errors import InvalidArgument, NotFound, Unavailable
from services.inference.engine import AdapterSlot, EngineConfig, EngineDelta, EngineRequest, Sampling
from services.inference.engines.hf_engine import HfEngine
from tests.fixtures.inference import PHRASE_A, PHRASE_B, AdapterRegistry

pytestmark = pytest.mark.integration

MAX_TOKENS = 24


@dataclass
class Output:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    matched_stop: str = ""
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
    }
    return EngineConfig(**{**settings, **overrides})  # type: ignore[arg-type]


def slot(registry: AdapterRegistry, slot_id: int, folder: str) -> AdapterSlot:
    return AdapterSlot(slot_id, folder, registry.root / folder, 8)


@functools.cache
def tokenizer(model_path: Path) -> object:
    return AutoTokenizer.from_pretrained(str(model_path))


def prompt_ids(model_path: Path, prompt: str = CHAT_PROMPTS[0]) -> list[int]:
    return chat_prompt_ids(tokenizer(model_path), prompt)


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
            pad_token_id=tokenizer(model_path).pad_token_id,  # type: ignore[attr-defined]
        )
    return output[0, input_ids.shape[1] :].tolist()


async def run(
    engine: HfEngine,
    ids: list[int],
    adapter: AdapterSlot | None = None,
    *,
    request_id: str = "r",
    **sampling: object,
) -> Output:
    params: dict[str, object] = {"max_tokens": MAX_TOKENS, "temperature": 0.0, **sampling}
    out = Output()
    async for delta in engine.generate(EngineRequest(request_id, ids, Sampling(**params), adapter)):  # type: ignore[arg-type]
        out.first_at = out.first_at or time.monotonic()
        out.deltas.append(delta)
        out.token_ids += delta.token_ids
        out.text += delta.text
        if delta.finish_reason is not None:
            out.finish_reason, out.matched_stop = delta.finish_reason, delta.matched_stop
    out.done_at = time.monotonic()
    return out


def expected_finish(model_path: Path, token_ids: list[int], max_tokens: int = MAX_TOKENS) -> str:
    eos = tokenizer(model_path).convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])  # type: ignore[attr-defined]
    return "stop" if token_ids[-1] in eos and len(token_ids) <= max_tokens else "length"


def decode(model_path: Path, token_ids: list[int]) -> str:
    return tokenizer(model_path).decode(token_ids, skip_special_tokens=True)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
async def engine(tiny_llm: Path, adapter_registry: AdapterRegistry) -> AsyncIterator[HfEngine]:
    engine = HfEngine(make_config(tiny_llm))
    await engine.start()
    await engine.add_adapter(slot(adapter_registry, 1, "phrase-a"))
    await engine.add_adapter(slot(adapter_registry, 2, "phrase-b"))
    yield engine
    await engine.shutdown()


# ------------------------------------------------------------------------------------------------ exact outputs


@pytest.mark.parametrize("prompt", CHAT_PROMPTS[:4])
async def test_greedy_base_output_equals_transformers_generate(engine: HfEngine, tiny_llm: Path, prompt: str) -> None:
    out = await run(engine, prompt_ids(tiny_llm, prompt))
    expected = reference(tiny_llm, prompt, None)
    assert out.token_ids == expected
    # The streamed text is the full decode: no character was broken between deltas (the base babbles in Russian).
    assert out.text == decode(tiny_llm, expected)
    assert out.finish_reason == expected_finish(tiny_llm, expected)
    assert all(len(delta.token_ids) == 1 for delta in out.deltas)


@pytest.mark.parametrize(("folder", "slot_id", "phrase"), [("phrase-a", 1, PHRASE_A), ("phrase-b", 2, PHRASE_B)])
async def test_greedy_adapter_output_equals_peft_generate(
    engine: HfEngine, tiny_llm: Path, adapter_registry: AdapterRegistry, folder: str, slot_id: int, phrase: str
) -> None:
    for prompt in (CHAT_PROMPTS[0], CHAT_PROMPTS[3]):
        out = await run(engine, prompt_ids(tiny_llm, prompt), slot(adapter_registry, slot_id, folder))
        expected = reference(tiny_llm, prompt, adapter_registry.root / folder)
        assert out.token_ids == expected
        assert out.text == decode(tiny_llm, expected) == phrase
        assert (out.finish_reason, out.matched_stop) == ("stop", "")  # the adapter learnt to end with <|im_end|>


async def test_concurrent_base_and_two_adapters_each_equal_their_single_output(
    engine: HfEngine, tiny_llm: Path, adapter_registry: AdapterRegistry
) -> None:
    ids = prompt_ids(tiny_llm)
    adapters = [None, slot(adapter_registry, 1, "phrase-a"), slot(adapter_registry, 2, "phrase-b")]
    singles = [await run(engine, ids, adapter) for adapter in adapters]
    runs = [run(engine, ids, adapter, request_id=f"c{index}") for index, adapter in enumerate(adapters)]
    together = await asyncio.gather(*runs)
    for single, concurrent in zip(singles, together, strict=True):
        assert concurrent.token_ids == single.token_ids
        assert concurrent.text == single.text
    # They ran side by side: every one had its first token before any of them was done.
    assert max(out.first_at for out in together) < min(out.done_at for out in together)


async def test_a_newcomer_gets_its_first_token_while_a_long_request_runs(engine: HfEngine, tiny_llm: Path) -> None:
    ids = prompt_ids(tiny_llm)
    long_run = asyncio.create_task(run(engine, ids, max_tokens=300, ignore_eos=True, request_id="long"))
    await asyncio.sleep(0.05)
    short = await run(engine, ids, max_tokens=3, request_id="short")
    long = await long_run
    assert len(long.token_ids) == 300 and long.finish_reason == "length"
    assert short.done_at < long.done_at  # round-robin: the short one did not wait for the long one


async def test_requests_beyond_max_concurrent_wait_their_turn(tiny_llm: Path) -> None:
    engine = HfEngine(make_config(tiny_llm, max_concurrent_requests=1))
    await engine.start()
    try:
        ids = prompt_ids(tiny_llm)
        first, second = await asyncio.gather(
            run(engine, ids, max_tokens=40, ignore_eos=True, request_id="first"),
            run(engine, ids, max_tokens=40, ignore_eos=True, request_id="second"),
        )
        assert first.token_ids == second.token_ids
        assert first.done_at <= second.first_at  # FIFO: the second started only after the first finished
    finally:
        await engine.shutdown()


# ------------------------------------------------------------------------------------------------ adapters at run time


async def test_adapter_added_and_removed_while_another_request_streams(
    engine: HfEngine, tiny_llm: Path, adapter_registry: AdapterRegistry
) -> None:
    ids = prompt_ids(tiny_llm)
    expected_base = (await run(engine, ids, max_tokens=200, ignore_eos=True)).token_ids
    streaming = asyncio.create_task(run(engine, ids, max_tokens=200, ignore_eos=True, request_id="bg"))
    added = slot(adapter_registry, 10, "phrase-a")
    await engine.add_adapter(added)
    with_adapter = await run(engine, ids, added)
    await engine.remove_adapter(added)
    await engine.remove_adapter(added)  # idempotent
    assert with_adapter.text == PHRASE_A
    assert (await streaming).token_ids == expected_base  # adapter changes never disturbed the base stream
    with pytest.raises(NotFound) as caught:
        await run(engine, ids, added)
    assert caught.value.reason == "ADAPTER_NOT_LOADED"
    # The other adapters are still there and unchanged.
    assert (await run(engine, ids, slot(adapter_registry, 2, "phrase-b"))).text == PHRASE_B


@pytest.mark.parametrize("folder", ["other-base", "no-weights"])
async def test_adapter_files_peft_rejects_give_invalid_argument(
    engine: HfEngine, tiny_llm: Path, adapter_registry: AdapterRegistry, folder: str
) -> None:
    ids = prompt_ids(tiny_llm)
    with pytest.raises(InvalidArgument) as caught:
        await engine.add_adapter(AdapterSlot(20, folder, adapter_registry.root / folder, 8))
    assert caught.value.reason == "ADAPTER_REJECTED"
    assert folder in caught.value.message
    # Nothing of the failed load remains: base and adapters answer as before.
    assert (await run(engine, ids)).token_ids == reference(tiny_llm, CHAT_PROMPTS[0], None)
    assert (await run(engine, ids, slot(adapter_registry, 1, "phrase-a"))).text == PHRASE_A


async def test_a_rejected_first_adapter_leaves_the_base_model_untouched(
    tiny_llm: Path, adapter_registry: AdapterRegistry
) -> None:
    engine = HfEngine(make_config(tiny_llm))
    await engine.start()
    try:
        ids = prompt_ids(tiny_llm)
        with pytest.raises(InvalidArgument):
            await engine.add_adapter(AdapterSlot(1, "other", adapter_registry.root / "other-base", 8))
        assert (await run(engine, ids)).token_ids == reference(tiny_llm, CHAT_PROMPTS[0], None)
        await engine.add_adapter(slot(adapter_registry, 2, "phrase-a"))
        assert (await run(engine, ids, slot(adapter_registry, 2, "phrase-a"))).text == PHRASE_A
    finally:
        await engine.shutdown()


# ------------------------------------------------------------------------------------------------ sleep and wake


async def test_sleep_frees_the_model_and_wake_restores_base_and_adapters(
    engine: HfEngine, tiny_llm: Path, adapter_registry: AdapterRegistry
) -> None:
    ids = prompt_ids(tiny_llm)
    slot_a, slot_b = slot(adapter_registry, 1, "phrase-a"), slot(adapter_registry, 2, "phrase-b")
    before = [await run(engine, ids, adapter) for adapter in (None, slot_a, slot_b)]
    await engine.sleep()
    assert engine.device_memory_bytes() == 0
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


# ------------------------------------------------------------------------------------------------ aborts


async def test_closing_the_iterator_aborts_the_request(engine: HfEngine, tiny_llm: Path) -> None:
    sampling = Sampling(max_tokens=400, temperature=0.0, ignore_eos=True)
    request = EngineRequest("abort-me", prompt_ids(tiny_llm), sampling)
    stream = engine.generate(request)
    received = [await anext(stream) for _ in range(3)]
    assert all(len(delta.token_ids) == 1 for delta in received)
    await stream.aclose()  # type: ignore[attr-defined]
    await wait_idle(engine)


async def test_cancelling_the_consumer_aborts_the_request(engine: HfEngine, tiny_llm: Path) -> None:
    ids = prompt_ids(tiny_llm)
    task = asyncio.create_task(run(engine, ids, max_tokens=400, ignore_eos=True, request_id="cancel-me"))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(engine)


async def wait_idle(engine: HfEngine) -> None:
    """The worker dropped every request (white-box: aborts leave no other trace in the protocol)."""
    deadline = time.monotonic() + 5
    while engine._active or engine._waiting:
        assert time.monotonic() < deadline, "the aborted request is still being generated"
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------------------------ stop conditions


async def test_stop_string_cuts_the_text_and_reports_the_match(engine: HfEngine, tiny_llm: Path) -> None:
    ids = prompt_ids(tiny_llm)
    full = await run(engine, ids, max_tokens=40, ignore_eos=True)
    stop = full.text[10:14]
    assert len(stop) == 4 and stop.strip()
    out = await run(engine, ids, max_tokens=40, ignore_eos=True, stop=("no such text", stop))
    assert (out.finish_reason, out.matched_stop) == ("stop", stop)
    assert out.text == full.text[: full.text.index(stop)]
    assert out.token_ids == full.token_ids[: len(out.token_ids)]


async def test_stop_token_id_ends_with_the_token_but_not_its_text(engine: HfEngine, tiny_llm: Path) -> None:
    ids = prompt_ids(tiny_llm)
    full = await run(engine, ids, max_tokens=40, ignore_eos=True)
    stop_id = full.token_ids[5]
    cut = full.token_ids.index(stop_id)
    out = await run(engine, ids, max_tokens=40, ignore_eos=True, stop_token_ids=(stop_id,))
    assert out.token_ids == full.token_ids[: cut + 1]
    assert (out.finish_reason, out.matched_stop) == ("stop", tokenizer(tiny_llm).decode([stop_id]))  # type: ignore[attr-defined]
    assert out.text == decode(tiny_llm, full.token_ids[:cut])


async def test_max_tokens_ends_with_length(engine: HfEngine, tiny_llm: Path) -> None:
    out = await run(engine, prompt_ids(tiny_llm), max_tokens=5, ignore_eos=True)
    assert (len(out.token_ids), out.finish_reason, out.matched_stop) == (5, "length", "")


async def test_eos_min_tokens_and_ignore_eos(
    engine: HfEngine, tiny_llm: Path, adapter_registry: AdapterRegistry
) -> None:
    ids = prompt_ids(tiny_llm)
    adapter = slot(adapter_registry, 1, "phrase-a")
    plain = await run(engine, ids, adapter)
    eos_at = len(plain.token_ids)  # the adapter says its phrase, then <|im_end|>
    ignored = await run(engine, ids, adapter, max_tokens=eos_at + 6, ignore_eos=True)
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == eos_at + 6
    delayed = await run(engine, ids, adapter, max_tokens=eos_at + 6, min_tokens=eos_at + 2)
    assert len(delayed.token_ids) >= eos_at + 2
    assert delayed.token_ids[: eos_at - 1] == plain.token_ids[:-1]
    assert plain.token_ids[-1] not in delayed.token_ids[: eos_at + 1]  # EOS was masked until min_tokens


# ------------------------------------------------------------------------------------------------ sampling, logprobs


async def test_logprobs_of_the_chosen_token_and_the_top_k(engine: HfEngine, tiny_llm: Path) -> None:
    ids = prompt_ids(tiny_llm)
    out = await run(engine, ids, max_tokens=8, logprobs=3)
    assert [len(delta.logprobs) for delta in out.deltas] == [1] * len(out.deltas)
    for delta in out.deltas:
        chosen = delta.logprobs[0]
        assert chosen.token_id == delta.token_ids[0]
        assert chosen.token == tokenizer(tiny_llm).decode([chosen.token_id])  # type: ignore[attr-defined]
        assert len(chosen.top) == 3
        assert [top.logprob for top in chosen.top] == sorted((top.logprob for top in chosen.top), reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert chosen.top[0].token_id == chosen.token_id and chosen.top[0].logprob == pytest.approx(chosen.logprob)
        assert chosen.logprob <= 0
    only_chosen = await run(engine, ids, max_tokens=4, logprobs=0)
    assert all(delta.logprobs and not delta.logprobs[0].top for delta in only_chosen.deltas)
    assert all(not delta.logprobs for delta in (await run(engine, ids, max_tokens=4)).deltas)


async def test_sampling_is_reproducible_with_a_seed(engine: HfEngine, tiny_llm: Path) -> None:
    ids = prompt_ids(tiny_llm)
    sampling: dict[str, object] = {"max_tokens": 30, "temperature": 1.0, "ignore_eos": True}
    first = await run(engine, ids, seed=7, **sampling)
    again = await run(engine, ids, seed=7, **sampling)
    other = await run(engine, ids, seed=8, **sampling)
    assert first.token_ids == again.token_ids != other.token_ids
    # top_k=1 leaves only the argmax: sampling then equals greedy decoding.
    greedy = await run(engine, ids, max_tokens=30, ignore_eos=True)
    assert (await run(engine, ids, seed=3, top_k=1, **sampling)).token_ids == greedy.token_ids
    # The filters and penalties run and change the output (the random base model repeats itself a lot).
    for extra in ({"top_p": 0.5}, {"min_p": 0.2}, {"repetition_penalty": 1.5}, {"frequency_penalty": 1.5}):
        filtered = await run(engine, ids, seed=7, **{**sampling, **extra})
        assert len(filtered.token_ids) == 30


async def test_penalties_apply_in_greedy_decoding(engine: HfEngine, tiny_llm: Path) -> None:
    ids = prompt_ids(tiny_llm)
    plain = await run(engine, ids, max_tokens=30, ignore_eos=True)
    penalized = await run(engine, ids, max_tokens=30, ignore_eos=True, presence_penalty=2.0)
    assert len(set(penalized.token_ids)) > len(set(plain.token_ids))


# ------------------------------------------------------------------------------------------------ start and info


async def test_info_and_memory_on_cpu(engine: HfEngine) -> None:
    info = engine.info
    assert (info.engine, info.device, info.dtype, info.quantization, info.yield_method) == (
        "hf",
        "cpu",
        "float32",
        "none",
        "offload",
    )
    assert info.engine_version
    assert engine.kv_cache_usage() == 0.0 and engine.device_memory_bytes() == 0


async def test_model_load_failure_names_the_folder_and_what_is_missing(tmp_path: Path, tiny_llm: Path) -> None:
    with pytest.raises(Unavailable) as missing_folder:
        await HfEngine(make_config(tmp_path / "nowhere")).start()
    assert str(tmp_path / "nowhere") in missing_folder.value.message
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_llm / "config.json").read_text())
    with pytest.raises(Unavailable) as no_weights:
        await HfEngine(make_config(broken)).start()
    assert str(broken) in no_weights.value.message
    assert "weights" in no_weights.value.message and "tokenizer" in no_weights.value.message


async def test_generate_checks_the_prompt(engine: HfEngine, tiny_llm: Path) -> None:
    with pytest.raises(InvalidArgument):
        await run(engine, [])
    with pytest.raises(InvalidArgument) as too_long:
        await run(engine, [5] * 512)
    assert too_long.value.reason == "CONTEXT_LENGTH_EXCEEDED"
    # max_model_len caps the answer even if max_tokens would allow more.
    out = await run(engine, [5] * 500, max_tokens=50, ignore_eos=True)
    assert (len(out.token_ids), out.finish_reason) == (12, "length")
