"""The memory, disk and time of building the RAG index (memory): chunking, embedding and the embedded store.

The build needs only the embedding model on the GPU — never the language model. Its numbers:

- **chunks** — each document is cut into chunks of at most ``chunk_tokens`` embedder tokens; chunks end at sentence
  or line boundaries, so they hold ``CHUNK_FILL`` of the limit on average, and neighbours share up to
  ``overlap_tokens``. A document shorter than a chunk is one chunk. With the documents' token counts the count is
  exact per document; otherwise every document is taken as ``tokens_per_page x pages / documents`` long.
- **disk** (the embedded store, ``baton.store.embedded``): the chunk text and its float32 vector in SQLite, a
  metadata row (ids, title, heading, source, offsets as JSON) with its indexes, the FTS5 BM25 index over the stemmed
  text, the vector snapshot (the float32 vectors again, ids, and HNSW links once a tenant passes
  ``hnsw_threshold``); beside it the cleaned texts the trainer reads and the catalog. The per-byte constant was
  measured on the store with SciFact (tests/integration/test_planner_measured.py checks the whole estimate on
  English and Russian corpora, within 10 %).
- **VRAM** — the encoder's weights (bf16) and one batch's activations, layer by layer (inference keeps nothing for
  a backward pass), plus the CUDA context.
- **time** — embedding FLOPs (2 per encoder parameter per token, plus attention) over the GPU's bf16 rate at
  ``ENCODER_MFU`` utilisation, plus the store's writes at ``STORE_CHUNKS_PER_S``.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from baton.planner.catalog import EmbeddingModel, GpuSpec, embedding_model
from baton.planner.plan import Breakdown, Item, LeaseAdvice, Plan, TimeEstimate, gib, verdict

MIB = 1 << 20
CHUNK_FILL = 0.9  # chunks end on sentence boundaries: on average they hold this share of the limit
# The embedded store's SQLite beyond the chunk texts and vectors — FTS5 postings and analysed terms, metadata rows
# and their indexes, page slack — per byte of chunk text: 3.6-4.0 measured on SciFact at chunk sizes 128-254 and
# overlaps 0-64 (a per-chunk term did not fit better: the postings grow with the text, the rows are small).
STORE_TEXT_FACTOR = 3.8
HNSW_LINK_BYTES_PER_M = 8.6  # level-0 links (2M x int32) plus upper levels, per unit of M
STORE_EMPTY_BYTES = 96 * 1024  # the schema, and a tenant's FTS5 tables (measured 53 KiB + ~40 KiB)
CATALOG_BYTES_PER_DOCUMENT = 1024
ENCODER_MFU = 0.35  # batched encoder inference reaches 30-40 % of the bf16 rate
STORE_CHUNKS_PER_S = 1500.0  # SQLite + FTS5 + vector index writes on one core (benchmarks/bench_ingest.py)
CUDA_CONTEXT_BYTES = 600 * MIB
EMBEDDER_HOST_BYTES = 2 << 30  # the embedder process: Python, torch, tokenizer


class RagJob(BaseModel):
    """Building the memory of a corpus."""

    model_config = ConfigDict(frozen=True)

    pages: int = Field(1_000_000, ge=0, description="Pages of text (a page is tokens_per_page tokens).")
    tokens_per_page: int = Field(500, ge=1, description="Embedder tokens per page (a dense book page: ~500).")
    documents: int | None = Field(None, ge=1, description="How many files [pages / 20].")
    document_tokens: list[int] | None = Field(
        None,
        description="The exact token count of every document (overrides pages and documents).",
        max_length=1_000_000,
    )
    embedding_model: str = "multilingual-e5-large"
    chunk_tokens: int | None = Field(None, ge=8, description="[min(512, what the embedder accepts)]")
    overlap_tokens: int = Field(64, ge=0)
    text_bytes_per_token: float = Field(
        4.0, gt=0, description="UTF-8 bytes per embedder token: English ~4.5, Russian ~3.5 with multilingual models."
    )
    batch_size: int = Field(64, ge=1)
    hnsw_threshold: int = Field(20_000, ge=0, description="Chunks of a tenant at which the HNSW graph is built.")
    hnsw_m: int = Field(32, ge=2)
    keep_texts: bool = Field(True, description="The cleaned texts are kept for training (BATON_HOME/texts).")

    def chunk_limit(self, model: EmbeddingModel) -> int:
        return self.chunk_tokens or min(512, model.max_tokens - 2)


def chunk_count(job: RagJob, model: EmbeddingModel) -> tuple[int, int]:
    """(chunks, tokens embedded) — overlapping tokens are embedded twice."""
    limit = job.chunk_limit(model)
    stride = max(1.0, limit * CHUNK_FILL - job.overlap_tokens)
    chunks = tokens = 0.0
    for length, count in _document_lengths(job):
        per_document = 1 if length <= limit else math.ceil((length - job.overlap_tokens) / stride)
        chunks += per_document * count
        tokens += (length + (per_document - 1) * job.overlap_tokens) * count
    return int(chunks), int(tokens)


def _document_lengths(job: RagJob) -> list[tuple[float, int]]:
    if job.document_tokens is not None:
        return [(float(n), 1) for n in job.document_tokens if n > 0]
    documents = job.documents or max(1, job.pages // 20)
    return [(job.pages * job.tokens_per_page / documents, documents)] if job.pages else []


def corpus_tokens(job: RagJob) -> int:
    return int(sum(length * count for length, count in _document_lengths(job)))


def rag_disk(job: RagJob, model: EmbeddingModel) -> Breakdown:
    chunks, embedded_tokens = chunk_count(job, model)
    text = embedded_tokens * job.text_bytes_per_token
    vector = model.dimensions * 4
    hnsw = chunks * job.hnsw_m * HNSW_LINK_BYTES_PER_M if chunks >= job.hnsw_threshold else 0
    documents = len(job.document_tokens) if job.document_tokens is not None else job.documents or job.pages // 20
    return Breakdown.of(
        [
            Item(
                name="chunk texts", bytes=int(text), note=f"{embedded_tokens:,} tokens x {job.text_bytes_per_token} B"
            ),
            Item(name="vectors in SQLite", bytes=chunks * vector, note=f"{chunks:,} x {model.dimensions} x 4 B"),
            Item(
                name="BM25 index, metadata rows, page slack",
                bytes=int(text * STORE_TEXT_FACTOR) + STORE_EMPTY_BYTES,
                note=f"{STORE_TEXT_FACTOR} B per byte of chunk text (measured)",
            ),
            Item(name="vector index snapshot", bytes=chunks * (vector + 9) + int(hnsw), note=_index_note(hnsw)),
            Item(
                name="cleaned texts (for training)",
                bytes=int(corpus_tokens(job) * job.text_bytes_per_token) if job.keep_texts else 0,
            ),
            Item(name="catalog", bytes=documents * CATALOG_BYTES_PER_DOCUMENT),
        ]
    )


def store_index_bytes(disk: Breakdown) -> int:
    """The store folder alone (what tests compare with ``du``): disk without the cleaned texts and the catalog."""
    return disk.total_bytes - disk.get("cleaned texts (for training)") - disk.get("catalog")


def _index_note(hnsw: float) -> str:
    return "flat vectors + ids, HNSW links" if hnsw else "flat vectors + ids (exact search below the threshold)"


def rag_vram(job: RagJob, model: EmbeddingModel, *, cpu: bool) -> Breakdown:
    seq = job.chunk_limit(model)
    # per layer at a time: hidden states in and out, q/k/v, the MLP's 4h, attention scores (2 B each)
    activations = job.batch_size * seq * (10 * model.hidden_size + model.num_heads * seq) * 2
    items = [
        Item(name="encoder weights", bytes=model.params * 2, note=f"{model.params:,} params x 2 B (bf16)"),
        Item(name="activations of one batch", bytes=activations, note=f"batch {job.batch_size} x {seq} tokens"),
    ]
    if not cpu:
        items.append(Item(name="CUDA context", bytes=CUDA_CONTEXT_BYTES))
    return Breakdown.of(items)


def rag_host_ram(job: RagJob, model: EmbeddingModel) -> Breakdown:
    chunks, _ = chunk_count(job, model)
    hnsw = chunks * job.hnsw_m * HNSW_LINK_BYTES_PER_M if chunks >= job.hnsw_threshold else 0
    return Breakdown.of(
        [
            Item(name="embedder process", bytes=EMBEDDER_HOST_BYTES),
            Item(
                name="vector index in memory (gateway)",
                bytes=chunks * (model.dimensions * 4 + 9) + int(hnsw),
                note="the store keeps each tenant's index loaded",
            ),
        ]
    )


def rag_time(job: RagJob, model: EmbeddingModel, gpu: GpuSpec) -> TimeEstimate:
    chunks, tokens = chunk_count(job, model)
    seq = job.chunk_limit(model)
    flops_per_token = 2 * model.encoder_params + 4 * model.num_layers * seq * model.hidden_size
    tokens_per_s = gpu.bf16_tflops * 1e12 * ENCODER_MFU / flops_per_token
    embed_s = tokens / tokens_per_s
    store_s = chunks / STORE_CHUNKS_PER_S
    return TimeEstimate(
        seconds=embed_s + store_s,
        how=(
            f"embedding {tokens:,} tokens at {tokens_per_s:,.0f} tokens/s ({embed_s / 60:,.0f} min) + store writes "
            f"{chunks:,} chunks at {STORE_CHUNKS_PER_S:,.0f}/s ({store_s / 60:,.0f} min, on the CPU, overlapping)"
        ),
        rates={"embed_tokens_per_s": tokens_per_s, "chunks_per_s": chunks / max(1e-9, embed_s + store_s)},
    )


def plan_rag(job: RagJob, gpu: GpuSpec, model: EmbeddingModel | None = None) -> Plan:
    encoder = model or embedding_model(job.embedding_model)
    chunks, tokens = chunk_count(job, encoder)
    vram = rag_vram(job, encoder, cpu=gpu.cpu)
    outcome = verdict(
        job,
        vram.total_bytes,
        gpu.memory_bytes,
        [(f"embed in batches of {size}", {"batch_size": size}) for size in (32, 16, 8, 4, 1) if size < job.batch_size],
        lambda changed: rag_vram(changed, encoder, cpu=gpu.cpu).total_bytes,
        fits=f"fits: the embedder needs {gib(vram.total_bytes)} (no language model)",
    )
    return Plan(
        job="rag",
        title=f"Memory of {corpus_tokens(job):,} tokens with {encoder.name}",
        model=encoder.name,
        gpu=gpu,
        vram=vram,
        host_ram=rag_host_ram(job, encoder),
        disk=rag_disk(job, encoder),
        time=rag_time(job, encoder, gpu),
        verdict=outcome,
        lease=LeaseAdvice(kind="EMBEDDING_BULK", vram_bytes=vram.total_bytes, exclusive=False, preemptible=True),
        facts={
            "chunks": chunks,
            "embedded_tokens": tokens,
            "chunk_tokens": job.chunk_limit(encoder),
            "vectors_fp32_bytes": chunks * encoder.dimensions * 4,
            "vectors_fp16_bytes": chunks * encoder.dimensions * 2,
        },
        assumptions=[
            f"chunks hold {CHUNK_FILL:.0%} of chunk_tokens on average (they end on sentence boundaries)",
            f"{job.text_bytes_per_token} UTF-8 bytes of text per embedder token",
            "the language model is not needed to build the index",
        ],
    )
