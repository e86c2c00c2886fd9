"""What the trainer needs to know about a base model before any weights are loaded: read from ``config.json`` and
the safetensors headers only (a few kilobytes per shard), so SubmitJob stays cheap even for a 60 GB model.

The headers name every tensor with its shape. A 2-D ``<module>.weight`` that is not an embedding belongs to a linear
layer — the modules LoRA can adapt (peft matches a target name against the end of the module path). Fused
mixture-of-experts weights (3-D tensors in transformers 5) are not ``nn.Linear`` and so are not targets by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baton.runtime.errors import InvalidArgument
from baton.runtime.files import safetensors_header

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class LinearModule:
    path: str  # e.g. "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class BaseModelFacts:
    path: Path
    model_type: str
    max_position_embeddings: int
    hidden_size: int
    num_layers: int
    vocab_size: int
    num_experts: int
    linear_modules: tuple[LinearModule, ...]
    total_params: int
    weights_bytes: int
    largest_shard_bytes: int
    config: dict[str, Any] = field(default_factory=dict, compare=False)  # config.json, for the planner

    @property
    def linear_params(self) -> int:
        return sum(module.params for module in self.linear_modules)

    @property
    def linear_names(self) -> list[str]:
        return sorted({module.name for module in self.linear_modules})

    def matching(self, target: str) -> list[LinearModule]:
        """Linear modules peft would adapt for one target-modules entry (its name or a dotted path suffix)."""
        return [m for m in self.linear_modules if m.path == target or m.path.endswith("." + target)]


def inspect_base_model(path: Path) -> BaseModelFacts:
    """Check that ``path`` is a complete local model folder and read its facts. INVALID_ARGUMENT
    (BASE_MODEL_MISSING) names what is missing."""
    config = _read_config(path)
    shards = _weight_shards(path)
    tensors: dict[str, tuple[str, list[int]]] = {}
    sizes = []
    for shard in shards:
        tensors.update(_read_header(shard))
        sizes.append(shard.stat().st_size)
    text = config.get("text_config", config)  # multimodal wrappers keep the LM's config inside
    linear = tuple(
        LinearModule(name.removesuffix(".weight"), shape[1], shape[0])
        for name, (_dtype, shape) in sorted(tensors.items())
        if name.endswith(".weight") and len(shape) == 2 and "embed" not in name.rsplit(".", 2)[-2]
    )
    return BaseModelFacts(
        path=path,
        model_type=str(config.get("model_type", "")),
        max_position_embeddings=int(text.get("max_position_embeddings") or 0),
        hidden_size=int(text.get("hidden_size") or 0),
        num_layers=int(text.get("num_hidden_layers") or 0),
        vocab_size=int(text.get("vocab_size") or 0),
        num_experts=int(text.get("num_experts") or text.get("num_local_experts") or 0),
        linear_modules=linear,
        total_params=sum(_numel(shape) for _dtype, shape in tensors.values()),
        weights_bytes=sum(sizes),
        largest_shard_bytes=max(sizes),
        config=config,
    )


def _missing(path: Path, what: str) -> InvalidArgument:
    return InvalidArgument(
        f"base_model_path {str(path)!r}: {what}. It must be a local Hugging Face model folder (config.json, tokenizer "
        "files, *.safetensors weights); baton never downloads from a model hub — copy the model onto this machine",
        reason="BASE_MODEL_MISSING",
        metadata={"base_model_path": str(path)},
    )


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise _missing(path, "no such folder")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise _missing(path, "no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _missing(path, f"config.json is unreadable ({error})") from None
    if not isinstance(config, dict):
        raise _missing(path, "config.json is not a JSON object")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise _missing(path, f"no tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    return config


def _weight_shards(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise _missing(path, f"{INDEX_FILE} is unreadable ({error})") from None
        shards = sorted({path / name for name in weight_map.values()})
        absent = [shard.name for shard in shards if not shard.is_file()]
        if absent:
            raise _missing(path, f"weight shards named by {INDEX_FILE} are missing: {', '.join(absent[:5])}")
        return shards
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise _missing(path, "no *.safetensors weights (pickled .bin weights are not accepted)")
    return shards


def _read_header(shard: Path) -> dict[str, tuple[str, list[int]]]:
    try:
        header = safetensors_header(shard)
    except (OSError, ValueError) as error:
        raise _missing(shard.parent, f"{shard.name} is not a readable safetensors file ({error})") from None
    return {
        name: (str(entry.get("dtype", "")), [int(n) for n in entry.get("shape", [])])
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict)
    }


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
