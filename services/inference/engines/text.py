"""Text helpers every engine that decodes for itself needs: incremental detokenization and stop strings.

``IncrementalDetokenizer`` turns a growing list of token ids into text deltas. Decoding one token at a time is
wrong twice over: a byte-level BPE token can hold half of a multi-byte character (Russian, emoji, CJK), and
SentencePiece-style tokenizers decide a token's leading space from its neighbour. So, as TGI
(``decode_token`` in ``server/text_generation_server/models/model.py``) and vLLM (``detokenize_incrementally``) do,
it decodes a short window twice — ``ids[prefix_offset:read_offset]`` (already emitted) and ``ids[prefix_offset:]``
— and emits the difference, but only once the window no longer ends in U+FFFD (an incomplete character).

``StopMatcher`` finds stop strings across deltas: it holds back the tail of the text that could still become a
stop string, and cuts the output where the first stop string to be complete starts (so the result does not
depend on how the text was split into deltas) (the stop string itself is not part of the output, as
in vLLM and the OpenAI API).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as context before the first generated one (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
PROMPT_CONTEXT_TOKENS = 5


class TokenDecoder(Protocol):
    """What both ``tokenizers.Tokenizer`` and a transformers tokenizer offer."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Text deltas for a growing list of generated token ids, never splitting a character.

    ``prompt_token_ids`` (its last few) are decoded as context only, so that the first generated token gets the
    leading space a SentencePiece tokenizer gives it in the middle of a text; they never appear in the output.
    """

    def __init__(
        self,
        tokenizer: TokenDecoder,
        *,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]) if prompt_token_ids else []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the text they complete ("" while a character is still incomplete)."""
        self._ids.extend(token_ids)
        prefix_text, new_text = self._window()
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            # Slide the window: what was read becomes the context of the next decode.
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end, decoded as U+FFFD)."""
        prefix_text, new_text = self._window()
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""

    def _window(self) -> tuple[str, str]:
        window = self._ids[self._prefix_offset :]
        prefix_text = self._decode(window[: self._read_offset - self._prefix_offset])
        return prefix_text, self._decode(window)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens) if ids else ""


@dataclass(frozen=True)
class StopResult:
    text: str  # text that is safe to emit now
    matched: str | None = None  # the stop string found (``text`` then ends where it began)


class StopMatcher:
    """Finds stop strings in streamed text, holding back what could be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._held = ""

    def feed(self, delta: str) -> StopResult:
        """Add new text; return what may be emitted and the stop string if one is now complete."""
        if not self._stops:
            return StopResult(delta)
        text = self._held + delta
        match = self._earliest_match(text)
        if match is not None:
            start, stop = match
            self._held = ""
            return StopResult(text[:start], stop)
        keep = self._partial_suffix_length(text)
        self._held = text[len(text) - keep :] if keep else ""
        return StopResult(text[: len(text) - keep])

    def flush(self) -> str:
        """The held-back text, released when generation ends without a stop string."""
        held, self._held = self._held, ""
        return held

    def _earliest_match(self, text: str) -> tuple[int, str] | None:
        """The stop string that is complete first as the text grows (earliest end; then the longest)."""
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _partial_suffix_length(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[len(text) - length :]):
                    longest = length
                    break
        return longest
