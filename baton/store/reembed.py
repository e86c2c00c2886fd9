"""Re-embedding a memory with another embedding model, without ever mixing two models' vectors.

Vectors of two models live in different spaces: a query embedded by one model compared with chunks embedded by
another ranks by noise, silently. So the store records the model whose vectors it holds (``model_identity``: the
model's id and weights hash, as the embedder's Info reports them), and the gateway refuses to start on a store of
another model (``check_store_model``), naming the command that fixes it.

``reembed_store`` builds the new memory beside the old one (``<store>.next``), read-only on the old store, so a
running gateway keeps answering searches from the old vectors meanwhile. It is resumable and idempotent: a document
whose chunks (ids and texts) are already in the new store is skipped, one deleted from the old store since is removed,
so a second run after an interruption — or after more ingests into the old store — only does what is missing. When
it is done it leaves ``REEMBEDDED`` (the model's identity) in the new store; the next gateway start whose embedder
serves that model swaps the two folders (``swap_in_reembedded``) and keeps the old one as ``<store>.replaced-<time>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from baton.runtime.errors import FailedPrecondition
from baton.store.base import ChunkRecord, VectorStore
from baton.store.embedded import EmbeddedStore
from baton.store.migrate import document_batches, read_only

DONE_FILE = "REEMBEDDED"
DOCUMENTS_PER_BATCH = 32
# An unrecorded store (written before models were recorded) is adopted when the serving model gives its sampled
# chunks the vectors it holds; another model gives cosines far below this (MiniLM vs e5: ~0).
SAME_MODEL_COSINE = 0.98
SAMPLE_CHUNKS = 8

Embed = Callable[[list[str]], np.ndarray]
AsyncEmbed = Callable[[list[str]], Awaitable[np.ndarray]]


def model_identity(model_id: str, model_sha: str) -> str:
    """How a store records its model: the name people know and the hash that decides the vectors."""
    return f"{model_id} (sha256 {model_sha[:16]})"


def next_store_path(store: Path) -> Path:
    return store.with_name(f"{store.name}.next")


@dataclass(frozen=True)
class ReembedReport:
    target: Path
    documents_embedded: int
    documents_kept: int
    documents_removed: int
    chunks_embedded: int


def reembed_store(
    source: Path,
    embed: Embed,
    identity: str,
    *,
    on_chunks: Callable[[int], None] | None = None,
    documents_per_batch: int = DOCUMENTS_PER_BATCH,
) -> ReembedReport:
    """Build ``<source>.next`` with every chunk of ``source`` embedded by ``embed`` (passages in, unit vectors
    out), recorded as ``identity``. ``on_chunks`` is told how many chunks each step handled (a progress bar)."""
    if not (source / "store.sqlite").is_file():
        raise FailedPrecondition(f"{source} holds no embedded store (no store.sqlite)", reason="NO_SOURCE_STORE")
    target_path = next_store_path(source)
    target = EmbeddedStore(target_path)
    counts = {"embedded": 0, "kept": 0, "removed": 0, "chunks": 0}
    try:
        _claim(target, identity)
        with read_only(source / "store.sqlite") as old, read_only(target_path / "store.sqlite") as new:
            for tenant in [name for (name,) in old.execute("SELECT name FROM tenants ORDER BY name")]:
                done = _signatures(new, tenant)
                seen: set[str] = set()
                for documents in document_batches(old, tenant, "", documents_per_batch):
                    seen.update(documents)
                    _reembed_batch(target, tenant, documents, done, embed, counts)
                    if on_chunks is not None:
                        on_chunks(sum(len(chunks) for chunks in documents.values()))
                for gone in set(done) - seen:
                    target.delete_document(tenant, gone)
                    counts["removed"] += 1
        (target_path / DONE_FILE).write_text(identity + "\n", encoding="utf-8")
    finally:
        target.close()
    return ReembedReport(target_path, counts["embedded"], counts["kept"], counts["removed"], counts["chunks"])


def total_chunks(source: Path) -> int:
    with read_only(source / "store.sqlite") as conn:
        return int(conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])


def _claim(target: EmbeddedStore, identity: str) -> None:
    """The new store is this model's: a half-built store of another model is not silently mixed into."""
    recorded = target.embedding_model()
    if recorded is not None and recorded != identity:
        raise FailedPrecondition(
            f"{target.path} holds a re-embedding with {recorded}, not {identity}: remove that folder to start over",
            reason="EMBEDDING_MODEL_MISMATCH",
        )
    target.set_embedding_model(identity)
    (target.path / DONE_FILE).unlink(missing_ok=True)  # done again only when this run ends


def _reembed_batch(
    target: EmbeddedStore,
    tenant: str,
    documents: dict[str, list[ChunkRecord]],
    done: dict[str, str],
    embed: Embed,
    counts: dict[str, int],
) -> None:
    todo = {doc: chunks for doc, chunks in documents.items() if done.get(doc) != _signature(chunks)}
    counts["kept"] += len(documents) - len(todo)
    texts = [chunk.text for chunks in todo.values() for chunk in chunks]
    vectors = iter(embed(texts)) if texts else iter(())
    for document_id, chunks in todo.items():
        fresh = [dataclasses.replace(chunk, vector=next(vectors)) for chunk in chunks]
        target.replace_document(tenant, document_id, fresh)
    counts["embedded"] += len(todo)
    counts["chunks"] += len(texts)


def _signature(chunks: Sequence[ChunkRecord]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk.chunk_id.encode() + b"\0" + chunk.text.encode() + b"\0")
    return digest.hexdigest()


def _signatures(conn: sqlite3.Connection, tenant: str) -> dict[str, str]:
    """document id -> signature of the chunks the new store already holds for ``tenant``."""
    row = conn.execute("SELECT id FROM tenants WHERE name = ?", (tenant,)).fetchone()
    if row is None:
        return {}
    signatures: dict[str, str] = {}
    for documents in document_batches(conn, tenant, "", 500):
        signatures.update({doc: _signature(chunks) for doc, chunks in documents.items()})
    return signatures


# ---------------------------------------------------------------------------------------------------- the gateway


def swap_in_reembedded(store: Path, identity: str) -> Path | None:
    """If ``<store>.next`` is a finished re-embedding with ``identity``, make it the store; the old folder is kept
    as ``<store>.replaced-<time>``, whose path is returned. Call before the store is opened."""
    candidate = next_store_path(store)
    done = candidate / DONE_FILE
    if not done.is_file() or done.read_text(encoding="utf-8").strip() != identity:
        return None
    retired = store.with_name(f"{store.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    if store.exists():
        store.rename(retired)
    candidate.rename(store)
    (store / DONE_FILE).unlink()
    return retired


REEMBED_REMEDY = (
    "Re-embed the memory with the new model: `baton store reembed` (builds it beside the old one, resumable, with a "
    "progress bar; the old memory stays searchable meanwhile if its model still serves), then restart the gateway "
    "to swap it in."
)
WEAVIATE_REMEDY = (
    "Ingest the documents again into a new collection (BATON_GATEWAY_WEAVIATE_COLLECTION) with the new model, or "
    "re-embed an embedded copy (`baton store reembed`) and `baton store migrate` it into a new collection."
)


async def check_store_model(
    store: VectorStore, identity: str, embed: AsyncEmbed, *, where: str, remedy: str = REEMBED_REMEDY
) -> None:
    """Record ``identity`` on a new store; refuse a store of another model (EMBEDDING_MODEL_MISMATCH). A store
    written before models were recorded is adopted only if ``embed`` gives its sampled chunks their stored vectors."""
    recorded = store.embedding_model()
    if recorded == identity:
        return
    if recorded is None:
        sample = store.sample_chunks(SAMPLE_CHUNKS)
        if not sample or _same_vectors(sample, await embed([text for text, _ in sample])):
            store.set_embedding_model(identity)
            return
        recorded = "another, unrecorded model"
    raise FailedPrecondition(
        f"the memory at {where} holds vectors of {recorded}, but the embedder serves {identity}: searching one "
        f"model's vectors with the other's queries ranks by noise. {remedy} Or start the embedder with the model "
        "the memory was built with (--model, --model-path).",
        reason="EMBEDDING_MODEL_MISMATCH",
        metadata={"store_model": recorded, "embedder_model": identity},
    )


def _same_vectors(sample: list[tuple[str, np.ndarray]], fresh: np.ndarray) -> bool:
    stored = np.stack([vector for _, vector in sample])
    if fresh.shape != stored.shape:
        return False
    return bool(np.min(np.sum(fresh * stored, axis=1)) >= SAME_MODEL_COSINE)
