"""The hf engine's decode batches: rows that join (prefilled alone or together), leave and outgrow a sliding window
compute what they would alone.

Two tiny random models built in memory: a Llama (full attention only) and a Gemma 3 whose sliding window (8) is
shorter than the rows, so rows leave the shared batch mid-way. Each row's logits at every step must equal its solo
decoding's (float rounding aside) and its greedy tokens must be the same.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from services.inference.engines.hf_batch import NO_WINDOW, DecodeBatch, cache_window, prefill_groups, prefill_inputs

PROMPTS = [[5, 9, 2, 7], [3, 1, 4, 1, 5, 9, 2, 6, 5], [8, 8], [2, 7, 1, 8, 2, 8]]
STEPS = [6, 9, 12, 4]  # rows finish at different times


def llama() -> Any:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def gemma() -> Any:
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    return Gemma3ForCausalLM(config).eval()


class Row:
    def __init__(self, prompt: list[int], steps: int) -> None:
        self.prompt, self.steps = prompt, steps
        self.tokens: list[int] = []
        self.logits: list[torch.Tensor] = []


def prefill(model: Any, row: Row) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=torch.tensor([row.prompt]), past_key_values=cache, use_cache=True).logits[0, -1]
    row.logits.append(logits)
    row.tokens.append(int(logits.argmax()))
    return cache


def solo(model: Any, prompt: list[int], steps: int) -> Row:
    row = Row(prompt, steps)
    cache = prefill(model, row)
    for _ in range(steps - 1):
        logits = model(input_ids=torch.tensor([[row.tokens[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
        row.logits.append(logits)
        row.tokens.append(int(logits.argmax()))
    return row


def prefill_together(model: Any, rows: list[Row]) -> list[DecodeBatch]:
    """Rows arriving in the same round, prefilled as the engine does: grouped by ``prefill_groups``, one left-padded
    forward per group (a group of one: the plain forward)."""
    window = cache_window(DynamicCache(config=model.config))
    batches = []
    for group in prefill_groups([len(row.prompt) for row in rows], max_tokens=4096, window=window):
        members = [rows[index] for index in group]
        if len(members) == 1:
            batches.append(DecodeBatch.of_one(members[0], prefill(model, members[0]), len(members[0].prompt)))
            continue
        cache = DynamicCache(config=model.config)
        inputs = prefill_inputs([row.prompt for row in members], pad_id=0, device=torch.device("cpu"))
        logits = model(**inputs, past_key_values=cache, use_cache=True).logits[:, -1]
        for index, row in enumerate(members):
            row.logits.append(logits[index])
            row.tokens.append(int(logits[index].argmax()))
        batches.append(DecodeBatch.of_prefill(members, cache, inputs["attention_mask"]))
    return batches


def batched(
    model: Any,
    prompts: list[list[int]],
    steps: list[int],
    join_at: list[int],
    *,
    together: bool = False,
    sdpa: bool = False,
) -> list[Row]:
    """Row i is prefilled at step join_at[i] (with the others of that step if ``together``) and then joins the shared
    batch; finished rows leave it."""
    rows = [Row(prompt, count) for prompt, count in zip(prompts, steps, strict=True)]
    batches: list[DecodeBatch] = []
    for step in range(40):
        for batch in list(batches):
            outgrown = batch.outgrown()
            batches += [batch.split_off(index) for index in outgrown]
            batch.keep([i for i in range(len(batch.rows)) if i not in outgrown])
            if not batch.rows:
                batches.remove(batch)
                continue
            logits = model(
                **batch.step_inputs([row.tokens[-1] for row in batch.rows], sdpa=sdpa),
                past_key_values=batch.cache,
                use_cache=True,
            ).logits[:, -1]
            batch.stepped()
            for index, row in enumerate(batch.rows):
                row.logits.append(logits[index])
                row.tokens.append(int(logits[index].argmax()))
            batch.keep([index for index, row in enumerate(batch.rows) if len(row.tokens) < row.steps])
            if not batch.rows:
                batches.remove(batch)
        newcomers = [row for row, start in zip(rows, join_at, strict=True) if start == step]
        if together:
            prefilled = prefill_together(model, newcomers)
        else:
            prefilled = [DecodeBatch.of_one(row, prefill(model, row), len(row.prompt)) for row in newcomers]
        for alone in prefilled:
            if batches and batches[0].can_take(alone, limit=8):
                batches[0].merge(alone)
            else:
                batches.insert(0 if alone.shared else len(batches), alone)
    assert not batches
    return rows


@pytest.mark.parametrize("sdpa", [False, True], ids=["2d-mask", "4d-sdpa-mask"])
@pytest.mark.parametrize("make", [llama, gemma])
@torch.inference_mode()
def test_batched_rows_equal_their_solo_decoding(make: Any, sdpa: bool) -> None:
    model = make()
    assert model.config._attn_implementation == "sdpa"
    expected = [solo(model, prompt, steps) for prompt, steps in zip(PROMPTS, STEPS, strict=True)]
    got = batched(model, PROMPTS, STEPS, join_at=[0, 0, 2, 5], sdpa=sdpa)
    for want, have in zip(expected, got, strict=True):
        assert have.tokens == want.tokens
        for step, (a, b) in enumerate(zip(have.logits, want.logits, strict=True)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"step {step}")


@pytest.mark.parametrize("make", [llama, gemma])
@torch.inference_mode()
def test_rows_prefilled_together_equal_their_solo_decoding(make: Any) -> None:
    model = make()
    prompts = [*PROMPTS, [4, 4, 6, 1, 3]]
    steps = [*STEPS, 7]
    expected = [solo(model, prompt, count) for prompt, count in zip(prompts, steps, strict=True)]
    got = batched(model, prompts, steps, join_at=[0, 0, 0, 3, 3], together=True, sdpa=True)
    for want, have in zip(expected, got, strict=True):
        assert have.tokens == want.tokens
        for step, (a, b) in enumerate(zip(have.logits, want.logits, strict=True)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"step {step}")


def test_prefill_groups_bound_padding_size_and_window() -> None:
    # Longest first; a prompt under half the group's longest starts a new group.
    assert prefill_groups([10, 6, 4, 9], max_tokens=100, window=NO_WINDOW) == [[0, 3, 1], [2]]
    # count x longest within max_tokens.
    assert prefill_groups([10, 10, 10], max_tokens=25, window=NO_WINDOW) == [[0, 1], [2]]
    # A prompt longer than the shared batch's window is prefilled alone (it will decode alone).
    assert prefill_groups([9, 8, 3], max_tokens=100, window=6) == [[0], [1], [2]]
    assert prefill_groups([5, 4, 3], max_tokens=100, window=6) == [[0, 1, 2]]
    assert prefill_groups([], max_tokens=100, window=6) == []


def test_prefill_inputs_pad_left_and_count_positions_from_the_first_real_token() -> None:
    inputs = prefill_inputs([[7, 8, 9], [5]], pad_id=0, device=torch.device("cpu"))
    assert inputs["input_ids"].tolist() == [[7, 8, 9], [0, 0, 5]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


@torch.inference_mode()
def test_the_window_of_each_kind_of_cache() -> None:
    assert cache_window(prefill(llama(), Row([1, 2], 1))) == NO_WINDOW
    window = cache_window(prefill(gemma(), Row([1, 2], 1)))
    assert window == 6  # a row may feed a token at position 6: the sliding layer then holds 7 = window - 1


@torch.inference_mode()
def test_merge_pads_left_and_keep_trims_what_only_padding_used() -> None:
    model = llama()
    short, long = Row([1, 2], 1), Row([1, 2, 3, 4, 5], 1)
    batch = DecodeBatch.of_one(short, prefill(model, short), 2)
    batch.merge(DecodeBatch.of_one(long, prefill(model, long), 5))
    assert batch.mask.tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    assert batch.cache.layers[0].keys.shape[0] == 2 and batch.cache.layers[0].keys.shape[2] == 5
    batch.keep([0])
    assert batch.mask.tolist() == [[1, 1]] and batch.cache.layers[0].keys.shape[2] == 2
    assert batch.step_inputs([7]).keys() == {"input_ids"}  # one unpadded row: the plain forward


def test_an_adapters_keys_are_told_apart_from_layer_indices() -> None:
    from services.inference.engines.hf_engine import adapter_keys

    keys = [
        "base_model.model.model.layers.2.self_attn.q_proj.lora_A.1.weight",
        "base_model.model.model.layers.2.self_attn.q_proj.lora_B.1.weight",
        "base_model.model.model.layers.0.mlp.up_proj.lora_B.2.weight",
        "base_model.model.model.embed_tokens.lora_embedding_A.2",
    ]
    assert adapter_keys(keys, "2") == keys[2:]
    assert adapter_keys(keys, "1") == keys[:2]
    assert adapter_keys(keys, "12") == []
