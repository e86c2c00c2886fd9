"""The adapter registry's safety checks, on adapter folders written here (real safetensors files, fake weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from baton.runtime.errors import InvalidArgument, NotFound
from services.inference.adapters import AdapterRegistry, ServedModel, check_adapter_name

HIDDEN, LAYERS, INTERMEDIATE = 64, 2, 128


def write_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    config = {
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "intermediate_size": INTERMEDIATE,
        "vocab_size": 1024,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_adapter(
    folder: Path, *, base: str, rank: int = 8, hidden: int = HIDDEN, layers: int = LAYERS, config: object = None
) -> Path:
    folder.mkdir(parents=True)
    tensors = {}
    for layer in range(layers):
        prefix = f"base_model.model.model.layers.{layer}"
        tensors[f"{prefix}.self_attn.q_proj.lora_A.weight"] = torch.zeros(rank, hidden)
        tensors[f"{prefix}.self_attn.q_proj.lora_B.weight"] = torch.zeros(hidden, rank)
        tensors[f"{prefix}.mlp.up_proj.lora_B.weight"] = torch.zeros(INTERMEDIATE, rank)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    adapter_config = config if config is not None else {
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "base_model_name_or_path": base,
        "target_modules": ["up_proj", "q_proj"],
    }  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
    return folder


@pytest.fixture
def setup(tmp_path: Path) -> tuple[AdapterRegistry, Path]:
    model = write_model(tmp_path / "models" / "tiny-qwen3")
    root = tmp_path / "adapters"
    root.mkdir()
    served = ServedModel.from_folder(model, "baton/tiny-qwen3")
    return AdapterRegistry(root, served, max_rank=16, max_bytes=10 << 20), model


def test_a_good_adapter_is_described(setup: tuple[AdapterRegistry, Path]) -> None:
    registry, model = setup
    write_adapter(registry.root / "alice" / "3", base=str(model))
    files = registry.inspect("alice/3")
    assert files.path == registry.root / "alice" / "3"
    assert (files.rank, files.alpha, files.target_modules) == (8, 16.0, ("q_proj", "up_proj"))
    assert registry.inspect(str(registry.root / "alice" / "3")) == files  # absolute inside the root is fine


@pytest.mark.parametrize("base", ["baton/tiny-qwen3", "tiny-qwen3", "/elsewhere/copies/tiny-qwen3", ""])
def test_the_base_model_may_be_named_by_id_or_folder(setup: tuple[AdapterRegistry, Path], base: str) -> None:
    registry, _ = setup
    write_adapter(registry.root / "a", base=base)
    assert registry.inspect("a").rank == 8


@pytest.mark.parametrize("path", ["../x", "a/../../x", "/etc", "/", ""])
def test_paths_outside_the_root_are_refused(setup: tuple[AdapterRegistry, Path], path: str) -> None:
    registry, _ = setup
    with pytest.raises(InvalidArgument) as caught:
        registry.inspect(path)
    assert caught.value.reason == "ADAPTER_PATH_OUTSIDE_ROOT"


def test_symlinks_leading_out_are_refused_even_for_single_files(
    setup: tuple[AdapterRegistry, Path], tmp_path: Path
) -> None:
    registry, model = setup
    outside = write_adapter(tmp_path / "outside", base=str(model))
    (registry.root / "link").symlink_to(outside)
    (registry.root / "mixed").mkdir()
    (registry.root / "mixed" / "adapter_config.json").write_text((outside / "adapter_config.json").read_text())
    (registry.root / "mixed" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    for path in ("link", "mixed"):
        with pytest.raises(InvalidArgument) as caught:
            registry.inspect(path)
        assert caught.value.reason == "ADAPTER_PATH_OUTSIDE_ROOT"


def test_missing_folders_and_files_are_not_found(setup: tuple[AdapterRegistry, Path]) -> None:
    registry, model = setup
    folder = write_adapter(registry.root / "pickled", base=str(model))
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    for path in ("nothing-here", "pickled"):
        with pytest.raises(NotFound) as caught:
            registry.inspect(path)
        assert caught.value.reason == "ADAPTER_FILES_NOT_FOUND"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"base": "Qwen/Qwen3-30B-A3B"}, "BASE_MODEL_MISMATCH"),
        ({"base": "", "hidden": 96}, "BASE_MODEL_MISMATCH"),  # unnamed, but another model's widths
        ({"base": "", "layers": 4}, "BASE_MODEL_MISMATCH"),  # more layers than the served model has
        ({"base": "tiny-qwen3", "rank": 32}, "ADAPTER_RANK_TOO_HIGH"),
        ({"base": "tiny-qwen3", "config": {"peft_type": "IA3"}}, "INVALID_ARGUMENT"),
        ({"base": "tiny-qwen3", "config": ["not", "an", "object"]}, "INVALID_ARGUMENT"),
    ],
)
def test_adapters_that_do_not_fit_are_refused(
    setup: tuple[AdapterRegistry, Path], kwargs: dict[str, object], reason: str
) -> None:
    registry, _ = setup
    write_adapter(registry.root / "bad", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument) as caught:
        registry.inspect("bad")
    assert caught.value.reason == reason
    assert "bad" in caught.value.message


def test_junk_weights_are_refused(setup: tuple[AdapterRegistry, Path]) -> None:
    registry, model = setup
    folder = write_adapter(registry.root / "junk", base=str(model))
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(InvalidArgument) as caught:
        registry.inspect("junk")
    assert caught.value.reason == "ADAPTER_REJECTED"


@pytest.mark.parametrize("name", ["", "a" * 65, "has space", "slash/name", "baton/tiny-qwen3", "ünï"])
def test_bad_adapter_names(name: str) -> None:
    with pytest.raises(InvalidArgument):
        check_adapter_name(name, base_model_id="baton/tiny-qwen3")


def test_good_adapter_names() -> None:
    for name in ("views", "alice-views.3", "A_1"):
        check_adapter_name(name, base_model_id="tiny")
