"""The real pretrained models (SmolLM2-135M-Instruct, Gemma 3 270M) on both engines: greedy output equals plain
transformers token for token, with and without a LoRA adapter loaded at run time.

The models are the folders ``baton models prepare`` writes (shared by the suite: tests/fixtures/models.py). The
adapter is a rank-8 LoRA on every attention and MLP projection with random (seeded) weights on both of its matrices,
so that it changes the greedy output; its reference is peft on top of transformers. SmolLM2 is prompted through its
chat template; Gemma 3 270M is a base model without one, prompted with plain text (``<bos>`` first: the prepared
tokenizer adds it, and a test below proves the engines see it).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from baton.models import tiny
from services.inference.engine import AdapterSlot, InferenceEngine
from tests.fixtures.models import GEMMA3, SMOLLM2, prepared_model
from tests.integration.engine_helpers import make_config, run, tokenizer

pytestmark = pytest.mark.integration

MAX_TOKENS = 20
PROMPTS = {
    SMOLLM2: ["What is the capital of France?", "Name three colours of the rainbow."],
    GEMMA3: ["Question: What is the capital of France?\nAnswer:", "Столица России — город"],
}
ADAPTER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_ids(name: str, prompt: str) -> list[int]:
    path = prepared_model(name)
    tok = tokenizer(path)
    if tok.chat_template:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tok(text, add_special_tokens=False).input_ids)
    return list(tok(prompt).input_ids)


@functools.cache
def random_adapter(name: str, folder: Path) -> Path:
    """A seeded LoRA with non-zero B matrices (peft initialises B to zero, which would change nothing)."""
    return tiny.random_adapter(prepared_model(name), folder, seed=0, rank=8, target_modules=ADAPTER_TARGETS)


@functools.cache
def reference(name: str, prompt: str, adapter: Path | None) -> list[int]:
    from peft import PeftModel

    path = prepared_model(name)
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    ids = torch.tensor([model_ids(name, prompt)])
    with torch.inference_mode():
        out = model.eval().generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_TOKENS
        )
    return out[0, ids.shape[1] :].tolist()


def _engine(kind: str, name: str) -> InferenceEngine:
    config = make_config(prepared_model(name), max_model_len=256, max_concurrent_requests=2)
    if kind == "vllm":
        from services.inference.engines.vllm_engine import VllmEngine

        return VllmEngine(config)
    from services.inference.engines.hf_engine import HfEngine

    return HfEngine(config)


@pytest.fixture(scope="module", params=[f"{kind}:{name}" for kind in ("hf", "vllm") for name in (SMOLLM2, GEMMA3)])
async def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[str, InferenceEngine, AdapterSlot]]:
    kind, name = request.param.split(":")
    adapter = random_adapter(name, tmp_path_factory.getbasetemp() / f"random-lora-{name}")
    engine = _engine(kind, name)
    await engine.start()
    try:
        slot = AdapterSlot(1, "random", adapter, 8)
        await engine.add_adapter(slot)
        yield name, engine, slot
    finally:
        await engine.shutdown()


async def test_greedy_output_equals_transformers_on_real_models(
    served: tuple[str, InferenceEngine, AdapterSlot],
) -> None:
    name, engine, slot = served
    for prompt in PROMPTS[name]:
        base = await run(engine, model_ids(name, prompt), max_tokens=MAX_TOKENS)
        assert base.token_ids == reference(name, prompt, None), prompt
        tuned = await run(engine, model_ids(name, prompt), slot, max_tokens=MAX_TOKENS)
        assert tuned.token_ids == reference(name, prompt, slot.path), prompt
        assert tuned.token_ids != base.token_ids  # the adapter is applied, not ignored


def test_the_real_models_answer_sensibly() -> None:
    """Not random weights: the references themselves know their facts (the prepared conversion kept the weights)."""
    smol = tokenizer(prepared_model(SMOLLM2)).decode(reference(SMOLLM2, PROMPTS[SMOLLM2][0], None))
    assert "Paris" in smol
    gemma = tokenizer(prepared_model(GEMMA3)).decode(reference(GEMMA3, PROMPTS[GEMMA3][0], None))
    assert "Paris" in gemma
