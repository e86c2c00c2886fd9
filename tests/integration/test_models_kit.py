"""``baton models``: the real pretrained models from PyPI, prepared into plain folders and served.

- prepare is idempotent (a second call returns the same folder at once, files untouched) and refuses a corrupt
  GGUF with a clear error, leaving nothing behind;
- an unknown name lists the known ones (``baton models prepare``, ``baton up --model``);
- Gemma's prepared tokenizer adds ``<bos>``, and the *served* model sees it: the inference service (a real process,
  hf engine) tokenizes a prompt with ``<bos>`` first and answers a question sensibly — without ``<bos>`` Gemma's
  output is garbage (../shared/FACTS.md).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from baton.clients.inference import InferenceClient
from baton.models.pretrained import CATALOGUE, GEMMA3, PREPARE_STAMP, SMOLLM2, installed_parts, prepare
from baton.models.publish import read_stamp
from baton.models.tiny import file_hashes
from baton.runtime.errors import FailedPrecondition
from tests.conftest import REPO_ROOT
from tests.fixtures.inference import InferenceHandle
from tests.fixtures.models import models_cache

pytestmark = pytest.mark.integration


def test_prepare_is_idempotent(smollm2: Path) -> None:
    before = file_hashes(smollm2)
    started = time.monotonic()
    again = prepare(SMOLLM2.name, models_cache())
    assert again == smollm2 and time.monotonic() - started < 2.0  # the stamp matched: no second conversion
    assert file_hashes(smollm2) == before
    assert read_stamp(smollm2, PREPARE_STAMP) == {"recipe": 1, "name": SMOLLM2.name, "gguf_sha256": SMOLLM2.gguf_sha256}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in smollm2.iterdir()}


def test_a_corrupt_gguf_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    [part] = installed_parts(SMOLLM2)
    corrupt = tmp_path / part.name
    shutil.copyfile(part, corrupt)
    with corrupt.open("r+b") as file:  # one flipped byte in the middle of the weights
        file.seek(corrupt.stat().st_size // 2)
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0xFF]))
    models = tmp_path / "models"
    with pytest.raises(FailedPrecondition) as refused:
        prepare(SMOLLM2.name, models, parts=[corrupt])
    assert refused.value.reason == "GGUF_CORRUPT"
    assert SMOLLM2.gguf_sha256 in refused.value.message and "--force-reinstall" in refused.value.message
    assert not (models / SMOLLM2.name).exists()
    assert list(models.iterdir()) == []  # no staging folder left behind


def _baton(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BATON_HOME": str(home), "BATON_MODELS_DIR": str(models_cache())}
    command = [sys.executable, "-m", "baton.cli.main", *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_an_unknown_model_name_lists_the_known_ones(tmp_path: Path) -> None:
    for args in (("models", "prepare", "llama-9000"), ("up", "--model", "llama-9000")):
        done = _baton(*args, home=tmp_path)
        assert done.returncode != 0
        assert "llama-9000" in done.stderr and all(name in done.stderr for name in CATALOGUE), done.stderr
    assert not (tmp_path / "run" / "stack.json").exists()  # `up` stopped before starting anything


def test_baton_models_list_says_what_is_ready(tmp_path: Path, smollm2: Path, gemma3: Path) -> None:
    done = _baton("models", "list", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert str(smollm2) in done.stdout and str(gemma3) in done.stdout
    assert "Gemma Terms of Use" in done.stdout and "Apache-2.0" in done.stdout
    assert "no (base model)" in done.stdout  # Gemma 3 270M has no chat template


def test_the_served_gemma_sees_its_bos_and_answers(gemma3: Path, tmp_path: Path) -> None:
    handle = InferenceHandle("hf", tmp_path / "inference", gemma3, tmp_path / "adapters", None)
    (tmp_path / "adapters").mkdir()
    handle.start()
    try:
        tokenized, answer = asyncio.run(_tokenize_and_answer(handle.target))
    finally:
        handle.stop()
    assert tokenized.ids[0] == 2 and tokenized.tokens[0] == "<bos>"  # GEMMA3.add_bos, as the engine receives it
    assert GEMMA3.add_bos
    assert "Paris" in answer, answer


async def _tokenize_and_answer(target: str) -> tuple[object, str]:
    async with InferenceClient(target) as client:
        tokenized = await client.tokenize("Привет, маяк", include_tokens=True)
        prompt = "Question: What is the capital of France?\nAnswer:"
        answer = "".join([m.text async for m in client.generate(prompt=prompt, temperature=0, max_tokens=8)])
    return tokenized, answer
