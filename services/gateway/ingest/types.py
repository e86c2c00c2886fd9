"""Data passed between the ingest steps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Section:
    """A run of text under one heading path on one page (page is None for formats without pages)."""

    text: str
    heading_path: tuple[str, ...] = ()
    page: int | None = None


@dataclass(frozen=True)
class ParsedDocument:
    title: str
    sections: list[Section]
    format: str  # txt, md, html, pdf, docx
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "\n\n".join(section.text for section in self.sections)


@dataclass(frozen=True)
class Chunk:
    """A chunk ready to embed. ``start``/``end`` are character offsets into its section's cleaned text."""

    index: int
    text: str
    token_count: int
    heading_path: tuple[str, ...]
    page: int | None
    section_index: int
    start: int
    end: int


class Tokenizer(Protocol):
    """The embedder's tokenizer as the ingest pipeline needs it: remote (the embedder's Tokenize RPC) in the
    gateway, local (``tokenizers``) in unit tests. The chunker itself is pure and takes the spans."""

    @property
    def max_input_length(self) -> int:
        """Most tokens one input may have, special tokens included."""
        ...

    @property
    def special_tokens_count(self) -> int:
        """How many special tokens the embedder adds to one input (e.g. 2 for [CLS] … [SEP])."""
        ...

    async def token_spans(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """For each text, the (start, end) character span of every token, without special tokens."""
        ...
