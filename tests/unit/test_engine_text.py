"""Incremental detokenization and stop strings (services/inference/engines/text.py).

The tokenizers are built here from a few sentences, so multi-byte characters (Cyrillic, emoji, CJK) are split
into byte tokens the way a real byte-level BPE splits rare characters.
"""

from __future__ import annotations

import functools
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from services.inference.engines.text import IncrementalDetokenizer, StopMatcher

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["Hello world, the quick brown fox jumps over the lazy dog.", "Привет, как дела?", "Numbers 123 and #@!"]


@functools.cache
def byte_bpe() -> Tokenizer:
    """A byte-level BPE with a small vocabulary: rare characters stay split into single-byte tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    return tokenizer


@functools.cache
def metaspace_bpe() -> Tokenizer:
    """A SentencePiece-style tokenizer: a word's leading space is a "▁" the decoder drops at the text's start."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIALS))
    return tokenizer


def stream(tokenizer: Tokenizer, ids: list[int], chunks: list[int] | None = None, **kwargs: object) -> list[str]:
    """Feed ``ids`` in chunks of the given sizes (one token at a time by default); return deltas + the flush."""
    detok = IncrementalDetokenizer(tokenizer, **kwargs)  # type: ignore[arg-type]
    deltas, position = [], 0
    for size in chunks or [1] * len(ids):
        deltas.append(detok.add(ids[position : position + size]))
        position += size
    deltas.append(detok.add(ids[position:]))
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", ["Привет, мир!", "fox 🦊 and 🎉🎉", "日本語 mixed with Ελληνικά"])
def test_multibyte_characters_split_across_tokens_are_never_broken(text: str) -> None:
    tokenizer = byte_bpe()
    ids = tokenizer.encode(text).ids
    # The point of the test: some character really is split over several tokens.
    assert any("\ufffd" in tokenizer.decode([token]) for token in ids)
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == text
    assert all("\ufffd" not in delta for delta in deltas)
    # Tokens that only hold part of a character give an empty delta; the character comes out whole later.
    assert "" in deltas[:-1]


def test_incomplete_character_at_the_end_is_released_by_flush() -> None:
    tokenizer = byte_bpe()
    ids = tokenizer.encode("ok 🦊").ids
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join(detok.add([token]) for token in ids[:-1])
    assert text == "ok "  # the fox's last byte is missing: nothing of it yet
    assert detok.flush() == tokenizer.decode(ids[:-1])[len("ok ") :]
    assert detok.flush() == ""


def test_prompt_context_gives_the_first_token_its_leading_space() -> None:
    tokenizer = metaspace_bpe()
    prompt = tokenizer.encode("Hello").ids
    answer = tokenizer.encode("Hello world").ids[len(prompt) :]
    assert tokenizer.decode(answer).startswith("world")  # decoded alone, the space is lost
    assert "".join(stream(tokenizer, answer, prompt_token_ids=prompt)) == " world"


def test_special_tokens_are_skipped_or_kept() -> None:
    tokenizer = byte_bpe()
    ids = [*tokenizer.encode("Hi").ids, tokenizer.token_to_id("<|im_end|>")]
    assert "".join(stream(tokenizer, ids)) == "Hi"
    assert "".join(stream(tokenizer, ids, skip_special_tokens=False)) == "Hi<|im_end|>"


@settings(max_examples=300, deadline=None)
@given(data=st.data(), skip_special=st.booleans())
def test_concatenated_deltas_equal_the_full_decode(data: st.DataObject, skip_special: bool) -> None:
    """Any token sequence — also one that is not valid UTF-8 — decodes to the same text incrementally."""
    tokenizer = byte_bpe()
    ids = data.draw(st.lists(st.integers(0, tokenizer.get_vocab_size() - 1), max_size=40), label="ids")
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=len(ids)), label="chunks")
    deltas = stream(tokenizer, ids, chunks, skip_special_tokens=skip_special)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40))
def test_valid_text_never_yields_a_replacement_character(text: str) -> None:
    tokenizer = byte_bpe()
    # Special tokens kept: a text may spell one ("<|im_start|>"), and it must come back as written.
    deltas = stream(tokenizer, tokenizer.encode(text).ids, skip_special_tokens=False)
    assert "".join(deltas) == text
    if "\ufffd" not in text:
        assert all("\ufffd" not in delta for delta in deltas)


# ------------------------------------------------------------------------------------------------ stop strings


def run_stops(stops: list[str], deltas: list[str]) -> tuple[str, str | None, int]:
    """Emitted text, the matched stop, and how many deltas were consumed until the match."""
    matcher = StopMatcher(stops)
    out = []
    for index, delta in enumerate(deltas):
        result = matcher.feed(delta)
        out.append(result.text)
        if result.matched is not None:
            return "".join(out), result.matched, index + 1
    out.append(matcher.flush())
    return "".join(out), None, len(deltas)


def test_stop_string_spanning_deltas_cuts_the_output() -> None:
    text, matched, consumed = run_stops(["###"], ["Hello #", "#", "# world"])
    assert (text, matched, consumed) == ("Hello ", "###", 3)


def test_text_that_might_start_a_stop_is_held_then_released() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("go ST").text == "go "  # "ST" could begin "STOP"
    assert matcher.feed("AR").text == "STAR"  # it did not
    assert matcher.feed("S").text == ""
    assert matcher.flush() == "S"  # generation ended: nothing is lost


def test_first_complete_stop_wins_and_no_stops_passes_through() -> None:
    assert run_stops(["world", "lo"], ["Hello world"])[:2] == ("Hel", "lo")
    # "ab" is complete before "#abb" is, however the text is split.
    assert run_stops(["#abb", "ab"], ["#abb"])[:2] == ("#", "ab")
    assert run_stops(["#abb", "ab"], ["#a", "bb"])[:2] == ("#", "ab")
    assert run_stops([], ["a", "b"]) == ("ab", None, 2)
    assert run_stops(["é"], ["caf", "é au lait"])[:2] == ("caf", "é")


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab#", max_size=30),
    stops=st.lists(st.text(alphabet="ab#", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=6),
)
def test_streamed_stop_matching_equals_matching_the_whole_text(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(min(cut, len(text)) for cut in cuts)})
    deltas = [text[start:end] for start, end in itertools.pairwise(bounds)] or [""]
    emitted, matched, _ = run_stops(stops, deltas)
    # The oracle: the stop string that is complete first when the text grows one character at a time.
    found = [(text.find(stop) + len(stop), text.find(stop), stop) for stop in stops if stop in text]
    if not found:
        assert (emitted, matched) == (text, None)
        return
    _, start, stop = min(found)
    assert (emitted, matched) == (text[:start], stop)
