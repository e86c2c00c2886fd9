"""The completion-style prompt a base model (no chat template) is served with, and packing in that mode, counted with
Gemma 3's real tokenizer (which adds <bos> to a text prompt) through the inference service's own PromptTokenizer."""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path

import pytest

from services.gateway.chat.packing import pack_context
from services.gateway.chat.prompt import (
    ANSWER_CUE,
    CHAT,
    COMPLETION,
    COMPLETION_INSTRUCTION,
    COMPLETION_STOP,
    prompt_format,
)
from services.inference.prompts import PromptTokenizer
from tests.unit.test_chat_packing import LocalCounter, topic_hits

QUESTION = "Where do otters sleep and why?"
HISTORY = [
    ("system", "You are a careful assistant."),
    ("user", "Hello"),
    ("assistant", "Hi!"),
    ("user", QUESTION),
]


@pytest.fixture(scope="module")
def gemma_tokenizer(gemma3: Path) -> PromptTokenizer:
    tokenizer = PromptTokenizer(gemma3)
    assert not tokenizer.has_chat_template, "the base Gemma is the model this mode is for"
    return tokenizer


def test_the_format_follows_the_chat_template() -> None:
    assert prompt_format(True) is CHAT and prompt_format(False) is COMPLETION
    assert CHAT.stop == () and COMPLETION.stop == COMPLETION_STOP


def test_without_sources_the_conversation_becomes_question_and_answer_lines() -> None:
    text = COMPLETION.render(HISTORY, None)
    assert text == f"You are a careful assistant.\n\nQuestion: Hello\nAnswer: Hi!\n\nQuestion: {QUESTION}\nAnswer:"
    assert COMPLETION.render([("user", "  Hi  ")], None) == "Question: Hi\nAnswer:"


def test_sources_come_after_the_earlier_turns_and_before_the_question() -> None:
    sources = ["[1] Otters\nSea otters hold hands.", "[2] Bees\nBees dance."]
    text = COMPLETION.render(HISTORY, sources)
    earlier = COMPLETION.render(HISTORY[:3], None).removesuffix(ANSWER_CUE)
    assert text.startswith(earlier.rstrip("\n")), "earlier turns are a fixed prefix (prefix cache)"
    tail = text[len(earlier) :]
    assert tail.startswith(COMPLETION_INSTRUCTION)
    assert tail.index("[1] Otters") < tail.index("[2] Bees") < tail.index(f"Question: {QUESTION}")
    assert text.endswith(f"Question: {QUESTION}\n{ANSWER_CUE}")
    assert "<start_of_turn>" not in text and "<|im_start|>" not in text, "no made-up chat template"


def test_packing_counts_the_completion_prompt_exactly_with_bos(gemma_tokenizer: PromptTokenizer) -> None:
    rng = random.Random(5)
    for max_model_len in (256, 512, 1024):
        counter = LocalCounter(gemma_tokenizer, max_model_len)
        for reserved in (32, 96, max_model_len // 2):
            packed = asyncio.run(
                pack_context(
                    topic_hits(rng), HISTORY, counter, reserved_tokens=reserved, query=QUESTION, style=COMPLETION
                )
            )
            assert isinstance(packed.prompt, str)
            ids = gemma_tokenizer.text_ids(packed.prompt)
            assert ids[0] == gemma_tokenizer.tokenizer.bos_token_id, "Generate adds <bos> to a text prompt"
            assert len(ids) + reserved <= max_model_len, (max_model_len, reserved)
            if packed.passages:
                assert packed.prompt_tokens == len(ids)
                numbers = [int(n) for n in re.findall(r"^\[(\d+)\] ", packed.prompt, flags=re.MULTILINE)]
                assert numbers == list(range(1, len(packed.passages) + 1))
            frame = len(gemma_tokenizer.text_ids(COMPLETION.render(HISTORY, [])))
            assert packed.budget_tokens == max_model_len - reserved - frame


def test_no_room_leaves_the_plain_completion_prompt(gemma_tokenizer: PromptTokenizer) -> None:
    chat = [("user", "Tell me everything. " * 60)]
    packed = asyncio.run(
        pack_context(
            topic_hits(random.Random(2)),
            chat,
            LocalCounter(gemma_tokenizer, 256),
            reserved_tokens=64,
            query=chat[0][1],
            style=COMPLETION,
        )
    )
    assert packed.passages == [] and packed.prompt == COMPLETION.render(chat, None)
    empty = asyncio.run(pack_context([], chat, LocalCounter(gemma_tokenizer, 256), reserved_tokens=64, query="x",
                                     style=COMPLETION))  # fmt: skip
    assert empty.prompt == COMPLETION.render(chat, None) and empty.left_out == 0


def test_the_chat_format_without_sources_is_the_conversation_itself() -> None:
    assert CHAT.render(HISTORY, None) == HISTORY
