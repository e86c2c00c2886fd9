"""What the client gets to show where an answer came from: one citation per numbered source, in packed order."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from services.gateway.chat.packing import Passage

SNIPPET_CHARS = 300
# "[2]", "[1, 3]", "[1][2]": the numbers a model writes when it cites.
_MARKER = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


def cited_numbers(answer: str) -> set[int]:
    return {int(number) for group in _MARKER.findall(answer) for number in group.split(",")}


def citations(passages: Sequence[Passage], answer: str | None = None) -> list[dict[str, Any]]:
    """``[n]`` → document, title, heading, page, chunk(s), score. ``cited`` says whether the answer refers to it
    (None while the answer is not known)."""
    used = cited_numbers(answer) if answer is not None else None
    return [
        citation(number, passage, None if used is None else number in used)
        for number, passage in enumerate(passages, 1)
    ]


def citation(number: int, passage: Passage, cited: bool | None) -> dict[str, Any]:
    best = passage.best
    meta = best.metadata
    page = meta.get("page")
    members = sorted(passage.hits, key=lambda hit: _order(hit.metadata.get("chunk_index")))
    snippet = passage.text if len(passage.text) <= SNIPPET_CHARS else passage.text[: SNIPPET_CHARS - 1].rstrip() + "…"
    return {
        "index": number,
        "marker": f"[{number}]",
        "document_id": best.document_id,
        "title": str(meta.get("title", "")),
        "heading": str(meta.get("heading", "")),
        "page": page if isinstance(page, int) and not isinstance(page, bool) else None,
        "source": str(meta.get("source", "")),
        "collection": str(meta.get("collection", "")),
        "chunk_id": best.chunk_id,
        "chunk_ids": [hit.chunk_id for hit in members],
        "score": best.score,
        "compressed": passage.compressed,
        "snippet": snippet,
        "cited": cited,
    }


def _order(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
