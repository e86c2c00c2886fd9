"""Text cleaning between parsing and chunking: Unicode NFC, invisible characters, whitespace, PDF line-break
hyphenation, and the running headers, footers and page numbers of PDF pages.

Everything here is pure and linear in the text (a few regular-expression passes), because it runs on every page
of every document. ``clean_text`` is idempotent, so cleaning twice is harmless.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

# Line and paragraph separators that are not "\n": old Mac files, Word exports, form feeds between pages.
_LINE_BREAKS = re.compile(r"\r\n?|[\x0b\x85\u2028]")
_PARAGRAPH_BREAKS = re.compile(r"[\x0c\u2029]")
# A soft hyphen at the end of a line marks a hyphenated word: join the halves.
_SOFT_HYPHEN_BREAK = re.compile(r"\u00ad[^\S\n]*\n[^\S\n]*")
# Invisible characters that carry no text: zero-width space, word joiner and invisible operators, BOM, soft
# hyphen, Mongolian vowel separator, bidirectional controls (also the "Trojan source" ones). Zero-width (non-)joiners
# U+200C/U+200D stay: they change how emoji and some scripts read.
_INVISIBLE = re.compile(r"[\u00ad\u180e\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")
# C0 and C1 control characters except tab and newline (the line breaks above are already "\n").
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Horizontal whitespace other than a lone space: runs of spaces, tabs, no-break and typographic spaces.
_HORIZONTAL_SPACE = re.compile(r"[^\S\n]{2,}|[^\S\n \t]")
_LINE_EDGE_SPACE = re.compile(r"^[ \t]+|[ \t]+$", re.MULTILINE)
# "сво-\nбода" → "свобода": a letter, a hyphen ending the line, a lower-case letter starting the next. An upper-case
# letter ("Жан-\nПоль") or a digit ("2-\nго") after the break means the hyphen is part of the word: kept.
_HYPHENATED_BREAK = re.compile(r"(?<=[^\W\d_])[-\u2010]\n(?=[a-zß-öø-ÿа-яё])")
_BLANK_LINES = re.compile(r"\n{3,}")

# A line that is only a page number: "12", "- 12 -", "Page 3 of 10", "стр. 5", "Страница 5 из 20", "5/20".
_PAGE_NUMBER_LINE = re.compile(
    r"[-–—\s]*(?:(?:page|p\.|pp\.|стр\.?|страница|с\.)\s*)?\d{1,5}(?:\s*(?:/|of|из)\s*\d{1,5})?[-–—\s]*",
    re.IGNORECASE,
)
_DIGITS = re.compile(r"\d+")
_SPACES = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Normalise one section's text for chunking, embedding and hashing.

    Unicode NFC; invisible and control characters removed (tabs and newlines kept); runs of spaces collapsed to
    one space (a run holding a tab becomes one tab, so table columns stay apart); lines stripped; a line-break
    hyphenation joined; paragraphs separated by exactly one blank line; no leading or trailing whitespace.
    """
    text = _LINE_BREAKS.sub("\n", text)
    text = _PARAGRAPH_BREAKS.sub("\n\n", text)
    text = _SOFT_HYPHEN_BREAK.sub("", text)
    text = _INVISIBLE.sub("", text)
    text = _CONTROL.sub("", text)
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    text = _HORIZONTAL_SPACE.sub(_one_space, text)
    text = _LINE_EDGE_SPACE.sub("", text)
    text = _HYPHENATED_BREAK.sub("", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def _one_space(match: re.Match[str]) -> str:
    return "\t" if "\t" in match.group() else " "


def content_hash(text: str) -> str:
    """SHA-256 (hex) of already cleaned text: equal for byte-identical cleaned content, so it finds exact
    duplicates and changed documents. Pass ``clean_text`` output (it is not cleaned again here)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_page_number_line(line: str) -> bool:
    return _PAGE_NUMBER_LINE.fullmatch(line) is not None and any(ch.isdigit() for ch in line)


def strip_page_furniture(pages: Sequence[str], *, edge_lines: int = 3, min_share: float = 0.5) -> list[str]:
    """Remove running headers and footers and page-number lines from the text of a document's pages.

    Candidates are the first and the last ``edge_lines`` non-empty lines of a page, removed from the edge inwards
    while they are furniture, so body text is never touched even when it repeats. Furniture is a page number, or a
    line that (digits ignored, so "Глава 3 — стр. 7" matches "Глава 3 — стр. 8") sits at the edge of at least
    ``min_share`` of the pages — and of at least three pages, since with one or two pages a repeat proves nothing.
    """
    page_lines = [page.split("\n") for page in pages]
    edges = [_edges(lines, edge_lines) for lines in page_lines]
    counts: Counter[str] = Counter()
    for lines, (top, bottom) in zip(page_lines, edges, strict=True):
        counts.update({_furniture_key(lines[i]) for i in top + bottom})
    needed = max(3, math.ceil(min_share * len(pages)))
    repeated = {key for key, count in counts.items() if count >= needed}

    def is_furniture(line: str) -> bool:
        return is_page_number_line(line) or _furniture_key(line) in repeated

    cleaned: list[str] = []
    for lines, (top, bottom) in zip(page_lines, edges, strict=True):
        drop = set(_leading(top, lines, is_furniture)) | set(_leading(bottom[::-1], lines, is_furniture))
        cleaned.append("\n".join(line for i, line in enumerate(lines) if i not in drop))
    return cleaned


def _edges(lines: list[str], edge_lines: int) -> tuple[list[int], list[int]]:
    filled = [i for i, line in enumerate(lines) if line.strip()]
    return filled[:edge_lines], filled[-edge_lines:]  # on a short page the two may share lines


def _leading(indexes: list[int], lines: list[str], is_furniture: Callable[[str], bool]) -> Iterator[int]:
    for i in indexes:
        if not is_furniture(lines[i]):
            return
        yield i


def _furniture_key(line: str) -> str:
    return _DIGITS.sub("#", _SPACES.sub(" ", line).strip().casefold())
