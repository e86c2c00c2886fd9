"""The adapter registry's safety checks: which folders LoadAdapter may read, and whether they fit the served model.

Rules (proto/baton/v1/inference.proto, LoadAdapterRequest):
- a path is relative to the registry root, or absolute inside it; ``..`` components are refused outright, and the
  resolved folder (symlinks followed) and each file in it must still lie inside the root;
- the folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (never pickled ``.bin`` weights, which
  can run code when loaded);
- the adapter was trained on the served model: its ``base_model_name_or_path`` names the served model (id, folder or
  folder name), and its LoRA matrices have the served model's dimensions and layer count;
- its rank is at most the engine's ``max_lora_rank``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton.runtime.errors import InvalidArgument, NotFound
from baton.runtime.files import model_config, safetensors_header

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_FILE = "baton-adapter.json"  # written by baton's trainer: version, data hash, losses
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ServedModel:
    """What an adapter must match: the served model's names and shapes (from its config.json)."""

    model_id: str
    model_path: Path
    num_layers: int
    dims: frozenset[int]  # every input/output width a LoRA matrix of this model may have

    @classmethod
    def from_folder(cls, model_path: Path, model_id: str) -> ServedModel:
        config = model_config(model_path)
        config = config.get("text_config", config)  # multimodal wrappers keep the LM's config inside
        hidden = int(config["hidden_size"])
        heads = int(config.get("num_attention_heads", 1))
        head_dim = int(config.get("head_dim") or hidden // heads)
        kv_heads = int(config.get("num_key_value_heads") or heads)
        widths = {hidden, heads * head_dim, kv_heads * head_dim}
        for key in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "vocab_size"):
            if config.get(key):
                widths.add(int(config[key]))
        return cls(model_id, model_path.resolve(), int(config["num_hidden_layers"]), frozenset(widths))


@dataclass(frozen=True)
class AdapterFiles:
    """A validated adapter folder."""

    path: Path
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str
    version: str
    size_bytes: int


def check_adapter_name(name: str, *, base_model_id: str) -> None:
    if not ADAPTER_NAME.match(name):
        raise InvalidArgument(
            f"adapter name {name!r} must be 1..64 characters of letters, digits, '.', '_' or '-'",
            reason="BAD_ADAPTER_NAME",
        )
    if name == base_model_id:
        raise InvalidArgument(
            f"adapter name {name!r} is the base model's id; choose another", reason="BAD_ADAPTER_NAME"
        )


class AdapterRegistry:
    """Resolves and validates adapter folders under one root (home/adapters by default)."""

    def __init__(self, root: Path, served: ServedModel, *, max_rank: int, max_bytes: int) -> None:
        self.root = root.resolve()
        self.served = served
        self.max_rank = max_rank
        self.max_bytes = max_bytes

    def inspect(self, path_text: str) -> AdapterFiles:
        """Validate the folder named by ``path_text`` (blocking file I/O: call it off the event loop)."""
        folder = self.resolve(path_text)
        config = _read_config(folder / CONFIG_FILE, path_text)
        weights = folder / WEIGHTS_FILE
        self._inside_root(weights.resolve(), path_text)
        size = weights.stat().st_size
        if size > self.max_bytes:
            raise InvalidArgument(
                f"adapter weights {path_text!r} are {size} bytes, above max_adapter_bytes={self.max_bytes}; is this "
                "a full model rather than a LoRA adapter?",
                reason="ADAPTER_TOO_LARGE",
            )
        shapes = _safetensors_shapes(weights, path_text)
        rank = _rank(config, shapes)
        base = str(config.get("base_model_name_or_path") or "")
        self._check_base_model(base, shapes, path_text)
        if rank > self.max_rank:
            raise InvalidArgument(
                f"adapter {path_text!r} has rank {rank}, above this engine's max_lora_rank={self.max_rank}; restart "
                f"inference with --max-lora-rank {_next_power_of_two(rank)} or train with a lower rank",
                reason="ADAPTER_RANK_TOO_HIGH",
            )
        return AdapterFiles(
            path=folder,
            rank=rank,
            alpha=float(config.get("lora_alpha") or rank),
            target_modules=_targets(config),
            base_model=base,
            version=_version(folder),
            size_bytes=size,
        )

    def resolve(self, path_text: str) -> Path:
        """The absolute folder inside the root, or INVALID_ARGUMENT / NOT_FOUND."""
        if not path_text or "\x00" in path_text:
            raise InvalidArgument("adapter path is empty", reason="ADAPTER_PATH_OUTSIDE_ROOT")
        given = Path(path_text)
        if ".." in given.parts:
            raise InvalidArgument(
                f"adapter path {path_text!r} contains '..'; give a folder inside the registry {self.root}",
                reason="ADAPTER_PATH_OUTSIDE_ROOT",
            )
        candidate = given if given.is_absolute() else self.root / given
        folder = candidate.resolve()  # follows symlinks: a link leading out of the root is caught below
        self._inside_root(folder, path_text)
        if not folder.is_dir():
            raise NotFound(
                f"no adapter folder {path_text!r} in the registry {self.root}", reason="ADAPTER_FILES_NOT_FOUND"
            )
        missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
        if missing:
            raise NotFound(
                f"adapter folder {path_text!r} lacks {', '.join(missing)} (a peft save_pretrained folder has both; "
                "pickled adapter_model.bin weights are not accepted)",
                reason="ADAPTER_FILES_NOT_FOUND",
            )
        return folder

    def _inside_root(self, resolved: Path, path_text: str) -> None:
        if not resolved.is_relative_to(self.root):
            raise InvalidArgument(
                f"adapter path {path_text!r} leads outside the adapter registry {self.root}; put adapters inside it",
                reason="ADAPTER_PATH_OUTSIDE_ROOT",
            )

    def _check_base_model(self, base: str, shapes: dict[str, list[int]], path_text: str) -> None:
        if base and not self._names_served_model(base):
            raise InvalidArgument(
                f"adapter {path_text!r} was trained on {base!r}, but this service serves {self.served.model_id!r} "
                f"({self.served.model_path}); load it into an inference service for that model",
                reason="BASE_MODEL_MISMATCH",
            )
        for key, shape in shapes.items():
            layer = _LAYER.search(key)
            wrong_layer = layer is not None and int(layer.group(1)) >= self.served.num_layers
            wrong_width = len(shape) == 2 and not _lora_width_fits(key, shape, self.served.dims)
            if wrong_layer or wrong_width:
                raise InvalidArgument(
                    f"adapter {path_text!r} does not fit {self.served.model_id!r}: tensor {key} {shape} has another "
                    "model's shape (layers or widths); it was trained on a different base model",
                    reason="BASE_MODEL_MISMATCH",
                )

    def _names_served_model(self, base: str) -> bool:
        served = self.served
        names = {served.model_id, served.model_id.rsplit("/", 1)[-1], str(served.model_path), served.model_path.name}
        base_path = Path(base)
        return base in names or base_path.name in names or (base_path.is_absolute() and base_path == served.model_path)


def _lora_width_fits(key: str, shape: list[int], dims: frozenset[int]) -> bool:
    # lora_A is [rank, in_features], lora_B is [out_features, rank]; the other side is the rank.
    if "lora_A" in key or "lora_embedding_A" in key:
        return shape[1] in dims
    if "lora_B" in key or "lora_embedding_B" in key:
        return shape[0] in dims
    return True


def _read_config(path: Path, path_text: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidArgument(f"adapter {path_text!r}: {CONFIG_FILE} is not valid JSON ({error})") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise InvalidArgument(f"adapter {path_text!r} is not a LoRA adapter (peft_type must be LORA)")
    return config


def _safetensors_shapes(path: Path, path_text: str) -> dict[str, list[int]]:
    """Tensor shapes from the safetensors header (8-byte length + JSON), without reading the weights."""
    try:
        header = safetensors_header(path)
        return {key: list(value["shape"]) for key, value in header.items() if key != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InvalidArgument(
            f"adapter {path_text!r}: {WEIGHTS_FILE} is not a readable safetensors file ({error})",
            reason="ADAPTER_REJECTED",
        ) from None


def _rank(config: dict[str, Any], shapes: dict[str, list[int]]) -> int:
    ranks = [int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    ranks += [shape[0] for key, shape in shapes.items() if "lora_A" in key and len(shape) == 2]
    return max(ranks)


def _targets(config: dict[str, Any]) -> tuple[str, ...]:
    targets = config.get("target_modules") or ()
    return (targets,) if isinstance(targets, str) else tuple(sorted(targets))


def _version(folder: Path) -> str:
    metadata = folder / METADATA_FILE
    if metadata.is_file():
        try:
            return str(json.loads(metadata.read_text(encoding="utf-8")).get("version", ""))
        except (OSError, json.JSONDecodeError):
            return ""
    return ""


def _next_power_of_two(value: int) -> int:
    return 1 << (value - 1).bit_length()
