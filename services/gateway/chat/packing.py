"""Fit retrieved chunks into the model's context budget.

The budget is ``max_model_len - frame tokens - reserved answer tokens``, where the frame tokens are those of the
conversation as it will be rendered (``prompt.PromptFormat``: a chat, or a base model's completion text) with the
citing instruction and an empty sources frame, counted by the inference service's own tokenizer and chat template
(``CountTokens``), never guessed from characters.

1. Drop duplicates: a chunk whose text is identical (up to whitespace and case) to a better one, or whose span lies
   inside a better chunk of the same section of the same document.
   Then the ``SourcePolicy``: chunks scoring well below the best one are left out (a clear best hit is the answer's
   source; distractors beside it only confuse a small model), and each chunk may be *focused* on the sentences that
   share the most words with the question. Measured on XQuAD-en with SmolLM2-135M-Instruct (questions 200–300):
   eight whole sources → 0.07 of answers contain the gold answer; the best source alone → 0.33; focused on its two
   best sentences → 0.42 (0.46 with the chat format's instruction). See ``service.DEFAULT_POLICIES``.
2. Walk the rest best-first. A chunk that overlaps or continues a passage already taken (same document and section,
   overlapping span or the next/previous chunk) is merged into it, paying only for the new text and no second
   header; any other chunk becomes a new numbered passage if it fits.
3. The first chunk that does not fit is compressed extractively — its sentences that share the fewest words with
   the question are dropped until it fits — and packing stops there, so what is kept is always a best-first prefix
   of the ranking plus, at most, one shortened chunk: the lowest-scoring one.
4. Costs in steps 2–3 are estimates (a merged or shortened text is priced in proportion to its characters), so the
   final prompt is counted exactly once more; while it is over ``max_model_len - reserved`` the lowest-scoring
   passage loses sentences (or is dropped) and the prompt is counted again. The budget is never exceeded.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from baton.store.base import Hit
from services.gateway.chat.prompt import CHAT, SOURCE_SEPARATOR, Prompt, PromptFormat, Turn, format_source

# A source shorter than this is not worth its header and the model's attention.
MIN_SOURCE_TOKENS = 24
# Rounds of "count exactly, shrink the last passage" before giving up on sources altogether (each is one RPC).
MAX_FIT_ROUNDS = 8
ELISION = " … "

_SENTENCE_END = re.compile(r"""[.!?…]+["'»”’)\]]*\s+|\n\s*""")
_WORD = re.compile(r"\w+")
# Crude stemming for matching question words to sentences in Russian and English alike: the first letters of a word
# carry its stem (свободы/свобода, citations/cited), which is all extractive compression needs.
_STEM_CHARS = 5


@dataclass(frozen=True)
class TokenCounts:
    texts: list[int]
    prompt: int
    max_model_len: int


class TokenCounter(Protocol):
    """Counts as the served model will see it: texts as fragments inside a prompt, and ``prompt`` whole — a chat
    rendered with the chat template and its generation prompt, or a completion text with the tokenizer's special
    tokens (BOS), as Generate tokenizes it (the inference service's CountTokens)."""

    async def count(self, texts: Sequence[str], prompt: Prompt) -> TokenCounts: ...


@dataclass(frozen=True)
class SourcePolicy:
    """Which retrieved chunks become sources, and how much of each. Zero turns a limit off."""

    max_sources: int = 0  # numbered sources at most (0: as many as the budget holds)
    min_relative_score: float = 0.0  # leave out chunks scoring below this share of the best chunk's score
    sentences: int = 0  # keep this many sentences of each chunk: those sharing the most words with the question
    labels: bool = True  # start each source with "[n] Title — Heading"; off: the passage alone


# The whole-context behaviour: every chunk that fits, whole (a large model reads many sources well).
WHOLE = SourcePolicy()


@dataclass
class Passage:
    """One numbered source: a chunk, or neighbouring chunks of one section merged, possibly shortened."""

    hits: list[Hit]  # best first
    text: str
    span: tuple[int, int] | None  # character span in its section, while it is still a contiguous slice
    tokens: int  # estimated tokens of its source block, separator included
    compressed: bool = False
    chunk_indices: set[int] = field(default_factory=set)

    @property
    def best(self) -> Hit:
        return self.hits[0]

    @property
    def score(self) -> float:
        return self.best.score

    def block(self, number: int, labelled: bool = True) -> str:
        return format_source(number, *_label(self.best), self.text, labelled=labelled)


@dataclass(frozen=True)
class PackedContext:
    passages: list[Passage]  # numbered 1..n in this order (best first)
    prompt: Prompt  # what to generate from
    prompt_tokens: int | None  # exact tokens of ``prompt`` (None when no sources were added)
    max_model_len: int
    reserved_tokens: int
    budget_tokens: int  # room for sources: max_model_len - frame tokens - reserved (may be <= 0)
    retrieved: int
    duplicates: int = 0
    merged: int = 0
    compressed: int = 0
    left_out: int = 0  # chunks that did not fit, or that the policy left out
    focused: int = 0  # sources shortened to their sentences nearest the question

    def stats(self) -> dict[str, int | None]:
        return {
            "retrieved": self.retrieved,
            "packed": len(self.passages),
            "duplicates": self.duplicates,
            "merged": self.merged,
            "compressed": self.compressed,
            "focused": self.focused,
            "left_out": self.left_out,
            "budget_tokens": self.budget_tokens,
            "prompt_tokens": self.prompt_tokens,
            "reserved_tokens": self.reserved_tokens,
            "max_model_len": self.max_model_len,
        }


async def pack_context(
    hits: Sequence[Hit],
    conversation: Sequence[Turn],
    counter: TokenCounter,
    *,
    reserved_tokens: int,
    query: str,
    style: PromptFormat = CHAT,
    policy: SourcePolicy = WHOLE,
) -> PackedContext:
    """Choose, merge and shorten ``hits`` so that the prompt ``style`` renders plus ``reserved_tokens`` fits the
    model."""
    candidates, duplicates = dedupe(hits)
    plain = style.render(conversation, None)
    if not candidates:
        return PackedContext([], plain, None, 0, reserved_tokens, 0, len(hits), duplicates)
    terms = stems(query)
    candidates, cut = _close_to_best(candidates, policy.min_relative_score)
    candidates, focused = _focus_all(candidates, terms, policy.sentences)
    blocks = [format_source(i, *_label(hit), hit.text, labelled=policy.labels) for i, hit in enumerate(candidates, 1)]
    counts = await counter.count([*blocks, SOURCE_SEPARATOR], style.render(conversation, []))
    separator_tokens = counts.texts[-1]
    limit = counts.max_model_len - reserved_tokens
    budget = limit - counts.prompt
    base = PackedContext([], plain, None, counts.max_model_len, reserved_tokens, budget, len(hits))
    if budget < MIN_SOURCE_TOKENS:
        return _replace(base, duplicates=duplicates, left_out=len(candidates) + cut)
    selection = _select(candidates, blocks, counts.texts[:-1], separator_tokens, budget, terms, policy.max_sources)
    selection.left_out += cut
    for passage in selection.passages:
        passage.compressed |= passage.best.chunk_id in focused
    packed = await _fit(base, conversation, counter, style, selection, limit, terms, duplicates, policy.labels)
    return _replace(packed, focused=sum(p.best.chunk_id in focused for p in packed.passages))


def _close_to_best(candidates: list[Hit], ratio: float) -> tuple[list[Hit], int]:
    """The chunks (best first) scoring at least ``ratio`` times the best one; how many were left out."""
    best = candidates[0].score
    if ratio <= 0 or best <= 0:
        return candidates, 0
    kept = [hit for hit in candidates if hit.score >= ratio * best]
    return kept, len(candidates) - len(kept)


def _focus_all(candidates: list[Hit], terms: set[str], sentences: int) -> tuple[list[Hit], set[str]]:
    """Each chunk cut to its ``sentences`` sentences nearest the question; the ids of those that got shorter. A
    focused chunk is no longer a slice of its section, so it loses its span and is never merged with a neighbour."""
    if sentences <= 0:
        return candidates, set()
    out, focused = [], set()
    for hit in candidates:
        meta = hit.metadata
        text = focus(hit.text, terms, sentences, skip={str(meta.get("title", "")), str(meta.get("heading", ""))})
        if text == hit.text:
            out.append(hit)
            continue
        focused.add(hit.chunk_id)
        unplaced = {key: value for key, value in meta.items() if key not in ("start", "end")}
        out.append(dataclasses.replace(hit, text=text, metadata=unplaced))
    return out, focused


def focus(text: str, terms: set[str], sentences: int, *, skip: Collection[str] = ()) -> str:
    """The ``sentences`` sentences of ``text`` sharing the most words with the question (the earlier one on a tie),
    in their order, gaps marked ``…``. Lines equal to ``skip`` (the title and heading, which the source's label
    already shows) are never chosen."""
    spans = [span for span in sentence_spans(text) if text[span[0] : span[1]].strip() not in skip]
    if len(spans) <= sentences:
        return _join(text, spans, list(range(len(spans)))) if spans else text
    overlap = [len(stems(text[start:end]) & terms) for start, end in spans]
    kept = sorted(sorted(range(len(spans)), key=lambda i: (-overlap[i], i))[:sentences])
    return _join(text, spans, kept)


def dedupe(hits: Sequence[Hit]) -> tuple[list[Hit], int]:
    """Best first, without identical texts and without chunks lying inside a better one of the same section."""
    kept: list[Hit] = []
    texts: set[str] = set()
    spans: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for hit in sorted(hits, key=lambda h: -h.score):
        key = " ".join(hit.text.split()).casefold()
        section, span = _section(hit), _span(hit)
        inside = (
            section is not None
            and span is not None
            and any(s <= span[0] and span[1] <= e for s, e in spans.get(section, ()))
        )
        if key in texts or inside:
            continue
        texts.add(key)
        if section is not None and span is not None:
            spans.setdefault(section, []).append(span)
        kept.append(hit)
    return kept, len(hits) - len(kept)


@dataclass
class _Selection:
    passages: list[Passage]
    compressed: int = 0
    left_out: int = 0


def _select(
    candidates: list[Hit],
    blocks: list[str],
    block_tokens: list[int],
    separator: int,
    budget: int,
    terms: set[str],
    max_sources: int = 0,
) -> _Selection:
    chosen = _Selection([])
    room = budget
    for position, hit in enumerate(candidates):
        tokens = block_tokens[position] + separator
        target = _neighbour(chosen.passages, hit)
        if target is None and max_sources and len(chosen.passages) >= max_sources:
            chosen.left_out = len(candidates) - position
            break
        if target is not None:
            text, span = _merge_text(target, hit)
            cost = _proportion(tokens, len(text) - len(target.text), len(blocks[position])) + separator
            if cost <= room:
                _absorb(chosen.passages, target, hit, text, span, cost)
                room -= cost
                continue
        elif tokens <= room:
            chosen.passages.append(_passage(hit, tokens))
            room -= tokens
            continue
        # The first chunk that does not fit: shortened to the room left, unless it continues a source already
        # taken (a shortened copy would repeat the overlap; the source already holds the neighbourhood).
        shortened = None if target is not None else _compress_to(hit, blocks[position], tokens, room, terms)
        if shortened is not None:
            chosen.passages.append(shortened)
            chosen.compressed += 1
        chosen.left_out = len(candidates) - position - (shortened is not None)
        break
    return chosen


async def _fit(
    base: PackedContext,
    conversation: Sequence[Turn],
    counter: TokenCounter,
    style: PromptFormat,
    selection: _Selection,
    limit: int,
    terms: set[str],
    duplicates: int,
    labelled: bool,
) -> PackedContext:
    """Count the real prompt; shrink the last passage until it fits (never return a prompt over ``limit``)."""
    passages = selection.passages
    compressed, left_out = selection.compressed, selection.left_out
    for _ in range(MAX_FIT_ROUNDS):
        if not passages:
            break
        prompt = style.render(conversation, [p.block(n, labelled) for n, p in enumerate(passages, 1)])
        prompt_tokens = (await counter.count([], prompt)).prompt
        if prompt_tokens <= limit:
            return _replace(
                base,
                passages=passages,
                prompt=prompt,
                prompt_tokens=prompt_tokens,
                duplicates=duplicates,
                merged=sum(len(p.hits) - 1 for p in passages),
                compressed=compressed,
                left_out=left_out,
            )
        last = passages[-1]
        shrunk = _shrink(last, prompt_tokens - limit, terms, labelled)
        if shrunk is None:
            passages = passages[:-1]
            left_out += len(last.hits)
        else:
            compressed += not last.compressed
            passages = [*passages[:-1], shrunk]
    left_out += sum(len(p.hits) for p in passages)
    return _replace(base, duplicates=duplicates, compressed=compressed, left_out=left_out)


def _shrink(passage: Passage, overflow: int, terms: set[str], labelled: bool) -> Passage | None:
    """The passage with enough of its weakest sentences dropped to save ``overflow`` tokens (with a margin for the
    estimate), or None if too little would be left."""
    header_chars = len(passage.block(1, labelled)) - len(passage.text)
    text_tokens = _proportion(passage.tokens, len(passage.text), len(passage.text) + header_chars)
    target = text_tokens - overflow - max(2, overflow // 8)
    return _compressed_passage(passage.hits, passage.text, text_tokens, target, terms, passage.tokens - text_tokens)


def _compress_to(hit: Hit, block: str, tokens: int, room: int, terms: set[str]) -> Passage | None:
    header_tokens = _proportion(tokens, len(block) - len(hit.text), len(block))
    text_tokens = tokens - header_tokens
    return _compressed_passage([hit], hit.text, text_tokens, room - header_tokens, terms, header_tokens)


def _compressed_passage(
    hits: list[Hit], text: str, text_tokens: int, target_tokens: int, terms: set[str], header_tokens: int
) -> Passage | None:
    if target_tokens < MIN_SOURCE_TOKENS:
        return None
    shortened = compress(text, terms, keep_chars=int(len(text) * target_tokens / max(1, text_tokens)))
    if not shortened:
        return None
    tokens = header_tokens + _proportion(text_tokens, len(shortened), len(text))
    return Passage(list(hits), shortened, None, tokens, compressed=True, chunk_indices=set())


def compress(text: str, terms: set[str], *, keep_chars: int) -> str:
    """Extractive compression: drop the sentences sharing the fewest words with the question (the later one first
    on a tie) until at most ``keep_chars`` characters are left; kept sentences stay in order, gaps marked ``…``.
    A lone sentence still too long is cut at a word boundary; empty if nothing useful fits."""
    spans = sentence_spans(text)
    if not spans or keep_chars <= 0:
        return ""
    ranked = sorted(range(len(spans)), key=lambda i: (-len(stems(text[spans[i][0] : spans[i][1]]) & terms), i))
    kept = sorted(ranked)
    for weakest in reversed(ranked):
        if _joined_length(spans, kept) <= keep_chars or len(kept) == 1:
            break
        kept.remove(weakest)
    joined = _join(text, spans, kept)
    if len(joined) <= keep_chars:
        return joined
    cut = joined.rfind(" ", 0, keep_chars - 1)
    return joined[:cut].rstrip() + "…" if cut > 0 else ""


def _joined_length(spans: list[tuple[int, int]], kept: list[int]) -> int:
    """len(_join(...)) without building the string."""
    length = spans[kept[0]][1] - spans[kept[0]][0]
    for previous, current in itertools.pairwise(kept):
        if current == previous + 1:
            length += spans[current][1] - spans[previous][1]
        else:
            length += len(ELISION) + spans[current][1] - spans[current][0]
    return length


def _join(text: str, spans: list[tuple[int, int]], kept: list[int]) -> str:
    parts = [text[spans[kept[0]][0] : spans[kept[0]][1]]]
    for previous, current in itertools.pairwise(kept):
        if current == previous + 1:
            parts.append(text[spans[previous][1] : spans[current][1]])  # neighbours: the original text between
        else:
            parts.append(ELISION + text[spans[current][0] : spans[current][1]])
    return "".join(parts)


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Sentences (and lines) of ``text`` as character spans without surrounding whitespace."""
    spans: list[tuple[int, int]] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        end = match.start() + len(match.group().rstrip())
        if text[start:end].strip():
            spans.append(_strip_span(text, start, end))
        start = match.end()
    if text[start:].strip():
        spans.append(_strip_span(text, start, len(text)))
    return spans


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _neighbour(passages: list[Passage], hit: Hit) -> Passage | None:
    """A passage of the same section that ``hit`` overlaps or continues."""
    section, span, index = _section(hit), _span(hit), _chunk_index(hit)
    if section is None or span is None:
        return None
    for passage in passages:
        if passage.span is None or _section(passage.best) != section:
            continue
        overlaps = span[0] <= passage.span[1] and passage.span[0] <= span[1]
        continues = index is not None and not passage.chunk_indices.isdisjoint({index - 1, index + 1})
        if overlaps or continues:
            return passage
    return None


def _merge_text(passage: Passage, hit: Hit) -> tuple[str, tuple[int, int]]:
    span = _span(hit)
    assert passage.span is not None and span is not None
    return _merge_spans(passage.text, passage.span, hit.text, span)


Span = tuple[int, int]


def _merge_spans(text_a: str, span_a: Span, text_b: str, span_b: Span) -> tuple[str, Span]:
    """The section text covered by both, without the overlap twice (chunk texts are exact slices of the section)."""
    if span_b[0] < span_a[0]:
        text_a, span_a, text_b, span_b = text_b, span_b, text_a, span_a
    (start_a, end_a), (start_b, end_b) = span_a, span_b
    if start_b <= end_a:
        merged = text_a + text_b[end_a - start_b :] if end_b > end_a else text_a
    else:
        merged = f"{text_a} {text_b}"  # consecutive chunks: only whitespace lies between them
    return merged, (start_a, max(end_a, end_b))


def _absorb(passages: list[Passage], target: Passage, hit: Hit, text: str, span: tuple[int, int], cost: int) -> None:
    target.hits.append(hit)
    target.text, target.span = text, span
    target.tokens += cost
    index = _chunk_index(hit)
    if index is not None:
        target.chunk_indices.add(index)
    # The new chunk may bridge two passages of the section: fold the later (weaker) one into the earlier.
    for other in list(passages):
        if other is target or other.span is None or _section(other.best) != _section(target.best):
            continue
        touching = other.span[0] <= target.span[1] and target.span[0] <= other.span[1]
        if touching or _adjacent(target, other):
            target.text, target.span = _merge_spans(target.text, target.span, other.text, other.span)
            target.hits.extend(other.hits)
            target.chunk_indices |= other.chunk_indices
            target.tokens += other.tokens  # over-estimates (a second header): safe, the exact count comes later
            passages.remove(other)


def _adjacent(a: Passage, b: Passage) -> bool:
    return any(i - 1 in b.chunk_indices or i + 1 in b.chunk_indices for i in a.chunk_indices)


def _passage(hit: Hit, tokens: int) -> Passage:
    index = _chunk_index(hit)
    return Passage([hit], hit.text, _span(hit), tokens, chunk_indices={index} if index is not None else set())


def _label(hit: Hit) -> tuple[str, str, int | None]:
    meta = hit.metadata
    return str(meta.get("title", "")), str(meta.get("heading", "")), _int_or_none(meta.get("page"))


def _section(hit: Hit) -> tuple[str, int] | None:
    index = _int_or_none(hit.metadata.get("section_index"))
    return None if index is None else (hit.document_id, index)


def _span(hit: Hit) -> tuple[int, int] | None:
    start, end = _int_or_none(hit.metadata.get("start")), _int_or_none(hit.metadata.get("end"))
    return None if start is None or end is None or end < start else (start, end)


def _chunk_index(hit: Hit) -> int | None:
    return _int_or_none(hit.metadata.get("chunk_index"))


def _int_or_none(value: object) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float | str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def stems(text: str) -> set[str]:
    """Crude stems of a text's words (see _STEM_CHARS): how the question, sentences and answers are compared."""
    return {word[:_STEM_CHARS] for word in _WORD.findall(text.casefold()) if len(word) >= 3 or word.isdigit()}


def _proportion(tokens: int, part_chars: int, whole_chars: int) -> int:
    return math.ceil(tokens * max(0, part_chars) / max(1, whole_chars))


def _replace(context: PackedContext, **changes: object) -> PackedContext:
    return dataclasses.replace(context, **changes)  # type: ignore[arg-type]
