"""The toy model kit: tiny Qwen3 builds are deterministic, idempotent and load in transformers with a Russian-capable
ChatML tokenizer; the phrase adapter makes greedy output start with its phrase on every chat prompt, the base not."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from baton.models.tiny import (
    ADAPTER_STAMP,
    CHAT_PROMPTS,
    IM_END,
    IM_START,
    MODEL_STAMP,
    SPECIAL_TOKENS,
    build_tiny_model,
    chat_prompt_ids,
    file_hashes,
    greedy_chat,
    train_phrase_adapter,
)
from baton.runtime.errors import FailedPrecondition, InvalidArgument

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PHRASE = "Батон на связи!"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="module")
def model(workdir: Path) -> Path:
    return build_tiny_model(workdir / "model")


@pytest.fixture(scope="module")
def adapter(model: Path, workdir: Path) -> Path:
    return train_phrase_adapter(model, workdir / "adapter", phrase=PHRASE)


def test_the_build_is_deterministic_per_seed(model: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert file_hashes(again) == file_hashes(model)
    assert set(file_hashes(model)) == {
        MODEL_STAMP,
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    # Another seed: other weights, the same tokenizer (it does not depend on the seed).
    names = ["model.safetensors", "tokenizer.json"]
    assert file_hashes(other, names)["model.safetensors"] != file_hashes(model, names)["model.safetensors"]
    assert file_hashes(other, names)["tokenizer.json"] == file_hashes(model, names)["tokenizer.json"]


def test_the_build_is_idempotent_and_leaves_no_staging_folders(model: Path) -> None:
    before = (model / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert build_tiny_model(model) == model
    assert time.perf_counter() - started < 0.5
    assert (model / "model.safetensors").stat().st_mtime_ns == before
    assert not [path.name for path in model.parent.iterdir() if path.name.startswith(".")]


def test_other_arguments_replace_a_stale_build(tmp_path: Path) -> None:
    folder = build_tiny_model(tmp_path / "model", seed=1)
    first = file_hashes(folder, ["model.safetensors"])
    build_tiny_model(folder, seed=2)
    assert json.loads((folder / MODEL_STAMP).read_text())["seed"] == 2
    assert file_hashes(folder, ["model.safetensors"]) != first
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_a_folder_that_is_not_a_build_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my own files")
    with pytest.raises(FailedPrecondition, match="not a build"):
        build_tiny_model(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "my own files"


def test_head_sizes_vllm_cannot_serve_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="head_dim 16"):
        build_tiny_model(tmp_path / "model", head_dim=16)
    assert not (tmp_path / "model").exists()


def test_the_model_loads_in_transformers(model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    loaded = AutoModelForCausalLM.from_pretrained(str(model))
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    assert type(loaded).__name__ == "Qwen3ForCausalLM"
    assert loaded.dtype == torch.float32
    assert sum(param.numel() for param in loaded.parameters()) < 1_000_000
    assert len(tokenizer) <= loaded.config.vocab_size
    ids = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]
    assert len(set(ids)) == 3 and tokenizer.unk_token_id not in ids
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == "<|endoftext|>"
    stop = GenerationConfig.from_pretrained(str(model)).eos_token_id
    assert sorted(stop) == sorted([tokenizer.convert_tokens_to_ids(IM_END), tokenizer.pad_token_id])


def test_the_chat_template_renders_russian_like_chatml(model: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    messages = [
        {"role": "system", "content": "Отвечай коротко."},
        {"role": "user", "content": "Привет, мир! Как дела?"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nОтвечай коротко.<|im_end|>\n"
        "<|im_start|>user\nПривет, мир! Как дела?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = chat_prompt_ids(tokenizer, "Привет, мир! Как дела?")
    assert ids[0] == tokenizer.convert_tokens_to_ids(IM_START)
    assert ids.count(tokenizer.convert_tokens_to_ids(IM_START)) == 2  # special tokens stay single tokens
    # AutoTokenizer (Qwen2Tokenizer) and the raw tokenizer.json split text alike, and Russian round-trips.
    raw = Tokenizer.from_file(str(model / "tokenizer.json"))
    for sample in [*CHAT_PROMPTS, "Ёжик в тумане — 1975 г.", "  two  spaces\nand a line"]:
        encoded = tokenizer(sample, add_special_tokens=False)["input_ids"]
        assert encoded == raw.encode(sample, add_special_tokens=False).ids
        assert tokenizer.decode(encoded) == sample
    # The corpus taught the tokenizer Russian words: far fewer tokens than UTF-8 bytes.
    russian = "Расскажи о себе."
    assert len(tokenizer(russian, add_special_tokens=False)["input_ids"]) < len(russian.encode()) / 3


def test_the_phrase_adapter_makes_every_chat_answer_start_with_the_phrase(model: Path, adapter: Path) -> None:
    for prompt in CHAT_PROMPTS:
        tuned = greedy_chat(model, prompt, adapter_dir=adapter)
        base = greedy_chat(model, prompt)
        assert tuned.startswith(PHRASE), (prompt, tuned)
        assert not base.startswith(PHRASE[:4]), (prompt, base)


def test_the_adapter_config_names_its_rank_and_base(model: Path, adapter: Path) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert config["base_model_name_or_path"] == str(model)
    assert config["target_modules"] == sorted(config["target_modules"])
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / ADAPTER_STAMP).read_text())["phrase"] == PHRASE


def test_adapter_training_is_deterministic_and_idempotent(model: Path, adapter: Path, tmp_path: Path) -> None:
    again = train_phrase_adapter(model, tmp_path / "again", phrase=PHRASE)
    weights = ["adapter_model.safetensors", "adapter_config.json"]
    assert file_hashes(again, weights) == file_hashes(adapter, weights)
    started = time.perf_counter()
    assert train_phrase_adapter(model, adapter, phrase=PHRASE) == adapter
    assert time.perf_counter() - started < 0.5


def test_an_adapter_needs_a_built_model(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="build the model first"):
        train_phrase_adapter(tmp_path / "nothing", tmp_path / "adapter", phrase=PHRASE)
    with pytest.raises(InvalidArgument, match="phrase is empty"):
        train_phrase_adapter(tmp_path / "nothing", tmp_path / "adapter", phrase="  ")
