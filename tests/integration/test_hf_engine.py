"""What only the hf engine (transformers + peft) does, driven directly on the tiny Qwen3 and its phrase adapters.

Its own scheduler (newcomers of a round prefilled together, then one batched forward per step for every running
request, at most
``max_concurrent_requests`` active, the rest FIFO), its prompt checks, peft's adapter wrapping and its start
failures. What both engines must do alike — exact greedy outputs, adapters, aborts, stop conditions, sampling,
sleep and wake — is in ``test_engine_conformance.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from baton.models.tiny import CHAT_PROMPTS
from baton.runtime.errors import InvalidArgument, Unavailable
from services.inference.engine import AdapterSlot, Contrast, EngineRequest, Sampling
from services.inference.engines.hf_engine import HfEngine
from tests.fixtures.inference import PHRASE_A, AdapterRegistry
from tests.integration.engine_helpers import MAX_TOKENS, make_config, prompt_ids, reference, run, slot, started

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def engine(tiny_llm: Path) -> AsyncIterator[HfEngine]:
    async with started(HfEngine(make_config(tiny_llm))) as engine:
        yield engine


# ------------------------------------------------------------------------------------------------ contrast


def contrastive_reference(
    model_path: Path, ids: list[int], contrast_ids: list[int], weight: float, steps: int = MAX_TOKENS
) -> list[int]:
    """Context-aware decoding written out with plain transformers: two caches, one per prompt, and each token the
    argmax of (1 + weight) x logits(prompt) - weight x logits(contrast prompt)."""
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    caches = [DynamicCache(), DynamicCache()]
    inputs = [torch.tensor([ids]), torch.tensor([contrast_ids])]
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            main, other = (
                model(input_ids=x, past_key_values=c).logits[0, -1] for x, c in zip(inputs, caches, strict=True)
            )
            token = int(torch.argmax((1 + weight) * main - weight * other))
            out.append(token)
            inputs = [torch.tensor([[token]])] * 2
    return out


async def test_a_contrast_decodes_by_the_contrastive_formula_beside_plain_requests(
    engine: HfEngine, tiny_llm: Path
) -> None:
    """A request with a contrast (its shadow row decodes in the same batch as two plain requests) gives exactly the
    tokens of context-aware decoding written out by hand; the plain requests keep their own outputs; an abort of
    the contrasted request mid-way leaves the engine serving."""
    ids, contrast_ids = prompt_ids(tiny_llm, CHAT_PROMPTS[0]), prompt_ids(tiny_llm, CHAT_PROMPTS[1])
    contrast = Contrast(contrast_ids, 1.0)
    expected = contrastive_reference(tiny_llm, ids, contrast_ids, 1.0)
    plain = await run(engine, ids, ignore_eos=True)
    assert expected != plain.token_ids  # the contrast changes the answer: the test can tell them apart
    others = [prompt_ids(tiny_llm, prompt) for prompt in CHAT_PROMPTS[2:4]]
    singles = [await run(engine, other, ignore_eos=True) for other in others]
    together = await asyncio.gather(
        run(engine, ids, contrast=contrast, ignore_eos=True, request_id="contrasted"),
        *(run(engine, other, ignore_eos=True, request_id=f"plain{i}") for i, other in enumerate(others)),
    )
    assert together[0].token_ids == expected
    assert [out.token_ids for out in together[1:]] == [out.token_ids for out in singles]
    assert engine.info.contrast

    streaming = asyncio.Event()
    long_run = run(engine, ids, contrast=contrast, ignore_eos=True, max_tokens=300, streaming=streaming)
    task = asyncio.create_task(long_run)
    await streaming.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert (await run(engine, ids, contrast=contrast, ignore_eos=True)).token_ids == expected


def corpus_ids(model_path: Path) -> list[int]:
    """The bundled corpus's first essays as one long text, tokenized."""
    corpus = Path(__file__).resolve().parents[2] / "examples" / "corpus"
    text = "\n\n".join(path.read_text() for path in sorted(corpus.glob("*.md")) if path.name[0] in "0123")
    return AutoTokenizer.from_pretrained(str(model_path))(text)["input_ids"]


async def test_a_contrast_ends_where_a_sliding_window_would_part_the_pair(gemma3: Path) -> None:
    """Gemma 3's sliding layers keep 512 positions and a row past them decodes alone, so a request and its shadow
    cannot stay in one batch there: the contrast applies up to the window, then the answer goes on plainly (all 14
    tokens come, the first 10 are the contrastive ones); a prompt already past the window decodes plainly."""
    every = corpus_ids(gemma3)
    ids = every[:500]  # 500 tokens: the window (510) is reached after 10 generated ones
    contrast_ids = ids[:1] + ids[-8:]
    async with started(HfEngine(make_config(gemma3, max_model_len=1024))) as engine:
        contrasted = await run(engine, ids, contrast=Contrast(contrast_ids, 2.0), max_tokens=14, ignore_eos=True)
        plain = await run(engine, ids, max_tokens=10, ignore_eos=True)
        assert len(contrasted.token_ids) == 14 and contrasted.finish_reason == "length"
        first = contrastive_reference(gemma3, ids, contrast_ids, 2.0, steps=10)
        assert contrasted.token_ids[:10] == first != plain.token_ids[:10]
        long_ids = every[:600]
        alone = await run(engine, long_ids, max_tokens=3, ignore_eos=True)
        with_contrast = await run(engine, long_ids, contrast=Contrast(contrast_ids, 2.0), max_tokens=3, ignore_eos=True)
        assert with_contrast.token_ids == alone.token_ids


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
