"""Token-aware chunking with the embedder's own tokenizer.

A chunk never holds more than ``chunk_tokens`` tokens of the embedder's tokenizer, so the embedder never truncates
it (``ChunkingConfig.resolve`` refuses, at configuration time, a size that would not fit). Where a chunk ends is
chosen by preference, inside the window the token budget allows:

1. a section boundary — sections (a heading path on a page) are never merged: a chunk belongs to exactly one
   section, so its heading path, page and character offsets are exact citations. A tiny section makes a tiny
   chunk; embedding cost follows tokens, not chunks, so that costs little;
2. a paragraph break, then a sentence end (". ", "! ", "? ", "… ", also after closing quotes and brackets, in
   Russian and English; not before a lower-case letter, so "т. е." and "e.g. this" stay whole), as long as the
   chunk is at least half full;
3. a sentence end even if the chunk is only a quarter full (a whole sentence beats a fuller chunk);
4. a line break or a clause mark (, ; : and spaced dashes) in the second half, then the furthest word boundary,
   then any token boundary — the last only for one "word" longer than a chunk.

Consecutive chunks of a section overlap by at most ``overlap_tokens``. The next chunk starts at the earliest
sentence start (else line start, else clause start) among the last ``overlap_tokens`` tokens, if that gives at
least half the overlap; else at the earliest word start among them; else (no word starts there) with no overlap.
Every chunk ends beyond the previous one, so the work is linear: the cut candidates are computed once per section
with vectorised numpy, and each chunk costs a few binary searches.

Offsets are token spans, so ``chunk.text == section.text[chunk.start:chunk.end]`` with no leading or trailing
whitespace. Cuts happen only between tokens separated by whitespace unless a single word is longer than the room
left, so re-tokenising a chunk's text alone gives the same tokens (for word-local tokenizers: WordPiece,
SentencePiece, BPE). A chunk cut inside a word may tokenize longer alone; ``chunk_document`` re-tokenizes those
(rare) chunks and splits any that no longer fit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from baton.runtime.errors import InvalidArgument, UpstreamFailed
from services.gateway.ingest.types import Chunk, ParsedDocument, Section, Tokenizer

DEFAULT_MAX_CHUNK_TOKENS = 512
# One Tokenize request carries at most this much text; longer sections are split at whitespace (the embedder
# refuses oversized requests, and a bounded request bounds the gateway's memory for the token spans).
MAX_TOKENIZE_REQUEST_CHARS = 200_000
MAX_TOKENIZE_REQUEST_TEXTS = 256
# Splitting a chunk cut inside a word again halves it or better; ten rounds means something is wrong.
_MAX_REFIT_DEPTH = 10

# Cut levels, best first. A position's level says what kind of boundary lies between two tokens.
PARAGRAPH, SENTENCE, LINE, CLAUSE, WORD, TOKEN, NO_CUT = 6, 5, 4, 3, 2, 1, 0

_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")
# Not an end when the next word is lowercase, even behind an opening quote or bracket ("т.е. «цитата»", "e.g. (see"),
# nor after an abbreviation that never ends a sentence, whatever follows ("т.е. X-ray"). "и т.д." and "etc." often do.
_NEVER_FINAL = ("т.е", "т.к", "т.н", "напр", "e.g", "i.e", "cf", "vs")
_SENTENCE_END = re.compile(
    "".join(rf"(?<!\b(?i:{re.escape(abbreviation)}))" for abbreviation in _NEVER_FINAL)
    + r"""[.!?…]+["'»”’)\]]*\s+(?![\sa-zß-ÿа-яё]|[«"“„'‘(\[][a-zß-ÿа-яё])"""
)
_LINE_BREAK = re.compile(r"\n\s*")
_CLAUSE_END = re.compile(r"[,;:]\s+|\s[—–-]\s+")
_BREAKS: tuple[tuple[int, re.Pattern[str]], ...] = (
    (CLAUSE, _CLAUSE_END),
    (LINE, _LINE_BREAK),
    (SENTENCE, _SENTENCE_END),
    (PARAGRAPH, _PARAGRAPH_BREAK),
)
_WHITESPACE_CODEPOINTS = np.array([cp for cp in range(0x3001) if chr(cp).isspace()])  # U+3000 is the last


@dataclass(frozen=True)
class ResolvedChunking:
    """Chunk size and overlap checked against one embedder."""

    chunk_tokens: int
    overlap_tokens: int


@dataclass(frozen=True)
class ChunkingConfig:
    """Chunking as configured: ``chunk_tokens`` None means min(512, what the embedder accepts)."""

    chunk_tokens: int | None = None
    overlap_tokens: int = 64

    def resolve(self, max_input_length: int, special_tokens_count: int) -> ResolvedChunking:
        """Fit the configuration to an embedder; a chunk that could not be embedded whole is an error here,
        at start-up, never a silent truncation later."""
        room = max_input_length - special_tokens_count
        if room < 1:
            raise InvalidArgument(
                f"the embedder accepts {max_input_length} tokens and adds {special_tokens_count} special tokens, "
                "leaving no room for text; use another embedding model",
                reason="CHUNK_EXCEEDS_EMBEDDER",
            )
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise InvalidArgument(
                f"chunk_tokens={self.chunk_tokens} must be at least 1 (or unset for min(512, {room}))",
                reason="INVALID_CHUNKING",
            )
        if self.chunk_tokens is not None and self.chunk_tokens > room:
            raise InvalidArgument(
                f"chunk_tokens={self.chunk_tokens} plus the embedder's {special_tokens_count} special tokens "
                f"exceeds its max input of {max_input_length} tokens, so chunks would be truncated; set "
                f"chunk_tokens (BATON_GATEWAY_CHUNK_TOKENS) to at most {room}, or unset it for "
                f"{min(DEFAULT_MAX_CHUNK_TOKENS, room)}",
                reason="CHUNK_EXCEEDS_EMBEDDER",
                metadata={"max_input_length": str(max_input_length), "max_chunk_tokens": str(room)},
            )
        chunk_tokens = self.chunk_tokens if self.chunk_tokens is not None else min(DEFAULT_MAX_CHUNK_TOKENS, room)
        if not 0 <= self.overlap_tokens < chunk_tokens:
            raise InvalidArgument(
                f"overlap_tokens={self.overlap_tokens} must be at least 0 and below the chunk size of {chunk_tokens} "
                "tokens; lower chunk_overlap_tokens (BATON_GATEWAY_CHUNK_OVERLAP_TOKENS)",
                reason="INVALID_CHUNKING",
            )
        return ResolvedChunking(chunk_tokens, self.overlap_tokens)


def chunk_sections(
    sections: Sequence[Section], spans: Sequence[Sequence[tuple[int, int]]], config: ResolvedChunking
) -> list[Chunk]:
    """Chunks of every section, numbered in document order. ``spans[i]`` are the (start, end) character spans of
    the tokens of ``sections[i].text`` (special tokens excluded), in text order."""
    if len(sections) != len(spans):
        raise ValueError(f"{len(sections)} sections but {len(spans)} token span lists")
    chunks: list[Chunk] = []
    for section_index, (section, section_spans) in enumerate(zip(sections, spans, strict=True)):
        if not section_spans:
            continue
        bounds = np.asarray(section_spans, dtype=np.int64).reshape(-1, 2)
        n = len(bounds)
        if n > 1 and bool(np.any(bounds[1:, 0] < bounds[:-1, 0])):
            raise UpstreamFailed(
                f"the tokenizer's spans for section {section_index} are out of text order (special tokens "
                "included? they must be left out)",
                reason="TOKENIZER_MISMATCH",
            )
        # Most pages and sections fit one chunk: skip finding cut candidates for them.
        windows = _windows(_CutIndex.build(section.text, bounds), n, config) if n > config.chunk_tokens else [(0, n)]
        for first, stop in windows:
            start, end = int(bounds[first, 0]), int(bounds[stop - 1, 1])
            chunks.append(
                Chunk(
                    index=len(chunks),
                    text=section.text[start:end],
                    token_count=stop - first,
                    heading_path=section.heading_path,
                    page=section.page,
                    section_index=section_index,
                    start=start,
                    end=end,
                )
            )
    return chunks


async def chunk_document(
    doc: ParsedDocument,
    tokenizer: Tokenizer,
    config: ResolvedChunking,
    *,
    max_request_chars: int = MAX_TOKENIZE_REQUEST_CHARS,
) -> list[Chunk]:
    """Tokenize the document's sections with the embedder's tokenizer (in bounded requests) and chunk them. The
    chunking itself runs in a worker thread: it is CPU work that would otherwise stall the event loop."""
    spans = await tokenize_sections([section.text for section in doc.sections], tokenizer, max_request_chars)
    chunks = await asyncio.to_thread(chunk_sections, doc.sections, spans, config)
    return await _refit_cut_words(chunks, doc.sections, tokenizer, config.chunk_tokens)


async def tokenize_sections(
    texts: Sequence[str], tokenizer: Tokenizer, max_request_chars: int = MAX_TOKENIZE_REQUEST_CHARS
) -> list[list[tuple[int, int]]]:
    """Token spans of each text. Texts are packed into requests of at most ``max_request_chars`` characters (and
    MAX_TOKENIZE_REQUEST_TEXTS texts); a longer text is split at whitespace, its pieces tokenized separately and
    their spans shifted back, which gives the same tokens as one call for tokenizers that split on whitespace."""
    pieces = [
        (index, offset, piece) for index, text in enumerate(texts) for offset, piece in _split(text, max_request_chars)
    ]
    spans: list[list[tuple[int, int]]] = [[] for _ in texts]
    for batch in _batches(pieces, max_request_chars):
        answers = await tokenizer.token_spans([piece for _, _, piece in batch])
        if len(answers) != len(batch):
            raise UpstreamFailed(
                f"the tokenizer answered {len(answers)} token lists for {len(batch)} texts",
                reason="TOKENIZER_MISMATCH",
            )
        for (index, offset, _), answer in zip(batch, answers, strict=True):
            spans[index].extend((start + offset, end + offset) for start, end in answer)
    return spans


# ---------------------------------------------------------------------------------------------------- cutting


@dataclass(frozen=True)
class _CutIndex:
    """For each level, the sorted token indexes ``k`` (0 < k < n) before which a chunk may end at that level or
    a better one."""

    at_least: dict[int, np.ndarray]

    @classmethod
    def build(cls, text: str, bounds: np.ndarray) -> _CutIndex:
        n = len(bounds)
        starts, ends = bounds[:, 0], bounds[:, 1]
        level = np.full(n + 1, NO_CUT, dtype=np.int8)
        if n > 1:
            gap = starts[1:] - ends[:-1]
            after_space = _is_space(text, starts[1:] - 1) & (gap > 0)
            # Tokens that share a character (one character made several tokens) can never be cut apart.
            level[1:n] = np.where(after_space, WORD, np.where(gap >= 0, TOKEN, NO_CUT))
        for break_level, pattern in _BREAKS:
            positions = np.fromiter((m.end() for m in pattern.finditer(text)), dtype=np.int64)
            k = np.searchsorted(starts, positions, side="left")
            k = k[(k > 0) & (k < n)]
            k = k[level[k] >= TOKEN]
            level[k] = np.maximum(level[k], break_level)
        return cls({lvl: np.flatnonzero(level >= lvl) for lvl in range(TOKEN, PARAGRAPH + 1)})

    def last(self, lvl: int, low: int, high: int) -> int | None:
        """The largest cut of level ≥ ``lvl`` in [low, high]."""
        cuts = self.at_least[lvl]
        i = int(np.searchsorted(cuts, high, side="right")) - 1
        return int(cuts[i]) if i >= 0 and cuts[i] >= low else None

    def first(self, lvl: int, low: int, high: int) -> int | None:
        """The smallest cut of level ≥ ``lvl`` in [low, high]."""
        cuts = self.at_least[lvl]
        i = int(np.searchsorted(cuts, low, side="left"))
        return int(cuts[i]) if i < len(cuts) and cuts[i] <= high else None


def _is_space(text: str, positions: np.ndarray) -> np.ndarray:
    codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    inside = (positions >= 0) & (positions < len(codepoints))
    found = np.zeros(len(positions), dtype=bool)
    found[inside] = np.isin(codepoints[positions[inside]], _WHITESPACE_CODEPOINTS)
    return found


def _windows(cuts: _CutIndex, n: int, config: ResolvedChunking) -> Iterator[tuple[int, int]]:
    """Token ranges [first, stop) of the chunks of one section."""
    size, overlap = config.chunk_tokens, config.overlap_tokens
    first, previous_stop = 0, 0
    while n - first > size:
        stop = _choose_stop(cuts, first, max(first, previous_stop) + 1, first + size)
        yield first, stop
        previous_stop = stop
        first = _choose_next_first(cuts, first, stop, overlap)
    yield first, n


def _choose_stop(cuts: _CutIndex, first: int, low: int, high: int) -> int:
    """Where a chunk starting at token ``first`` ends: a cut in [low, high] by the preferences in the module doc."""
    size = high - first
    half, quarter = max(low, first + size // 2), max(low, first + size // 4)
    candidates = (
        (PARAGRAPH, half),
        (SENTENCE, half),
        (SENTENCE, quarter),
        (LINE, half),
        (CLAUSE, half),
        (WORD, low),
        (TOKEN, low),
    )
    for lvl, lowest in candidates:
        if (stop := cuts.last(lvl, lowest, high)) is not None:
            return stop
    return high  # every token in reach shares characters with its neighbour: nothing better exists


def _choose_next_first(cuts: _CutIndex, first: int, stop: int, overlap: int) -> int:
    """Where the chunk after [first, stop) starts: up to ``overlap`` tokens back, at a sentence start if possible."""
    low, high = max(first + 1, stop - overlap), stop - 1
    if overlap == 0 or low > high:
        return stop
    half_overlap = stop - (overlap + 1) // 2
    for lvl, latest in ((SENTENCE, half_overlap), (LINE, half_overlap), (CLAUSE, half_overlap), (WORD, high)):
        if (start := cuts.first(lvl, low, latest)) is not None:
            return start
    return stop  # no word starts in reach: an overlap starting mid-word would re-tokenize differently


# ---------------------------------------------------------------------------------------------------- cut words


async def _refit_cut_words(
    chunks: list[Chunk], sections: Sequence[Section], tokenizer: Tokenizer, size: int
) -> list[Chunk]:
    """A chunk that starts or ends inside a word (only when one word is longer than the room left) can take more
    tokens on its own than it covered in context: WordPiece turns "##ue" into "u ##e", SentencePiece adds a "▁".
    Tokenize such chunks alone and split any that no longer fit, so the embedder never truncates one."""
    suspects = [c for c in chunks if _cuts_a_word(c, sections[c.section_index].text)]
    if not suspects:
        return chunks
    alone = await tokenize_sections([c.text for c in suspects], tokenizer)
    refits = {
        chunk.index: await _refit(chunk, spans, tokenizer, size)
        for chunk, spans in zip(suspects, alone, strict=True)
        if len(spans) > size
    }
    if not refits:
        return chunks
    fitted = [part for chunk in chunks for part in refits.get(chunk.index, [chunk])]
    return [dataclasses.replace(chunk, index=index) for index, chunk in enumerate(fitted)]


async def _refit(
    chunk: Chunk, spans: list[tuple[int, int]], tokenizer: Tokenizer, size: int, depth: int = 0
) -> list[Chunk]:
    if len(spans) <= size:
        return [dataclasses.replace(chunk, token_count=len(spans))]
    if depth >= _MAX_REFIT_DEPTH:
        raise UpstreamFailed(
            f"a {len(chunk.text)}-character piece of text still takes {len(spans)} tokens on its own after "
            f"{depth} splits, over the chunk size of {size}; raise chunk_tokens",
            reason="CHUNK_DOES_NOT_FIT",
        )
    parts = chunk_sections([Section(chunk.text)], [spans], ResolvedChunking(size, 0))
    fitted: list[Chunk] = []
    for part in parts:
        moved = dataclasses.replace(chunk, text=part.text, start=chunk.start + part.start, end=chunk.start + part.end)
        part_spans = (await tokenize_sections([part.text], tokenizer))[0]
        fitted += await _refit(moved, part_spans, tokenizer, size, depth + 1)
    return fitted


def _cuts_a_word(chunk: Chunk, text: str) -> bool:
    starts_inside = chunk.start > 0 and not text[chunk.start - 1].isspace()
    ends_inside = chunk.end < len(text) and not text[chunk.end].isspace()
    return starts_inside or ends_inside


# ---------------------------------------------------------------------------------------------------- requests


def _split(text: str, limit: int) -> Iterator[tuple[int, str]]:
    """(offset, piece) with pieces of at most ``limit`` characters, cut after a paragraph break, a line break or a
    space when one exists in the second half of the piece."""
    offset = 0
    while len(text) - offset > limit:
        window = text[offset : offset + limit]
        cut = -1
        for separator in ("\n\n", "\n", " "):
            cut = window.rfind(separator, limit // 2)
            if cut != -1:
                cut += len(separator)
                break
        if cut <= 0:
            cut = limit
        yield offset, window[:cut]
        offset += cut
    yield offset, text[offset:]


def _batches(pieces: list[tuple[int, int, str]], max_chars: int) -> Iterator[list[tuple[int, int, str]]]:
    batch: list[tuple[int, int, str]] = []
    chars = 0
    for piece in pieces:
        if batch and (chars + len(piece[2]) > max_chars or len(batch) >= MAX_TOKENIZE_REQUEST_TEXTS):
            yield batch
            batch, chars = [], 0
        batch.append(piece)
        chars += len(piece[2])
    if batch:
        yield batch
