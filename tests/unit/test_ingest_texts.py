"""The ingest pipeline keeps each document's cleaned text at texts/<content_hash>.txt for the trainer: the text that
was indexed, once per content (duplicates share it), and restored for documents indexed before texts were kept."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from baton.store.embedded import EmbeddedStore
from services.gateway.catalog import Catalog
from services.gateway.ingest.chunker import ChunkingConfig
from services.gateway.ingest.clean import content_hash
from services.gateway.ingest.pipeline import IngestItem, IngestPipeline, keep_text
from tests.unit.tokenizer_helpers import minilm_tokenizer

TENANT = "t1"
TEXT = "# Заметки\n\nСвобода   воли —\u200b способность разума.\r\nВторая строка."


class FakeEmbedder:
    async def embed(self, texts: Sequence[str], *, input_type: str | None = None) -> np.ndarray:
        rng = np.random.default_rng(len(texts))
        return rng.standard_normal((len(texts), 8)).astype(np.float32)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def pipeline_parts(home: Path) -> Iterator[tuple[Catalog, EmbeddedStore]]:
    catalog = Catalog(home / "catalog.sqlite")
    store = EmbeddedStore(home / "store", durable=False)
    yield catalog, store
    store.close()
    catalog.close()


def make_pipeline(parts: tuple[Catalog, EmbeddedStore], texts_dir: Path | None) -> IngestPipeline:
    tokenizer = minilm_tokenizer()
    chunking = ChunkingConfig(64, 8).resolve(tokenizer.max_input_length, tokenizer.special_tokens_count)
    return IngestPipeline(parts[0], parts[1], FakeEmbedder(), tokenizer, chunking, texts_dir=texts_dir)


async def test_cleaned_text_is_kept_under_its_content_hash(
    home: Path, pipeline_parts: tuple[Catalog, EmbeddedStore]
) -> None:
    texts = home / "texts"
    pipeline = make_pipeline(pipeline_parts, texts)
    items = [
        IngestItem("a.md", "a.md", data=TEXT.encode()),
        IngestItem("copy.md", "copy.md", data=TEXT.encode()),  # a duplicate: same cleaned content
    ]
    report = await pipeline.ingest(TENANT, "notes", items)
    assert sorted(o.status for o in report.outcomes) == ["added", "duplicate"]
    row = pipeline_parts[0].by_source(TENANT, "a.md")
    assert row is not None
    files = list(texts.iterdir())
    assert [f.name for f in files] == [f"{row.content_hash}.txt"]  # one file; no temporaries left behind
    kept = files[0].read_text(encoding="utf-8")
    assert content_hash(kept) == row.content_hash
    assert "\u200b" not in kept and "\r" not in kept and "Свобода воли" in kept


async def test_unchanged_document_gets_its_missing_text_back(
    home: Path, pipeline_parts: tuple[Catalog, EmbeddedStore]
) -> None:
    await make_pipeline(pipeline_parts, None).ingest(TENANT, "notes", [IngestItem("a.md", "a.md", data=TEXT.encode())])
    texts = home / "texts"
    assert not texts.exists()
    report = await make_pipeline(pipeline_parts, texts).ingest(
        TENANT, "notes", [IngestItem("a.md", "a.md", data=TEXT.encode())]
    )
    assert [o.status for o in report.outcomes] == ["unchanged"]
    row = pipeline_parts[0].by_source(TENANT, "a.md")
    assert row is not None and (texts / f"{row.content_hash}.txt").is_file()


def test_keep_text_is_idempotent(tmp_path: Path) -> None:
    first = keep_text(tmp_path, "один текст")
    stamp = first.stat().st_mtime_ns
    assert keep_text(tmp_path, "один текст") == first
    assert first.stat().st_mtime_ns == stamp  # not rewritten
    assert first.read_text(encoding="utf-8") == "один текст"
