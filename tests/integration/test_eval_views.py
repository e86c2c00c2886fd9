"""``baton eval views`` end to end with the real SmolLM2-135M-Instruct on the CPU.

A LoRA adapter is trained by the trainer's own training process (``python -m services.trainer.worker JOB_DIR``) on
an invented author's documents as the trainer service would run it — a dataset of ingested texts, the job folder
under BATON_HOME/trainer/jobs — and registered with the registry's own ``publish``; the job's output is then
removed as the service removes it. ``baton eval views`` runs as a subprocess and must find the held-out documents
(the worker's split, recomputed from the job's spec.json), the base model (from the adapter's metadata), and score
them, a control text and a stance probe with the base model and the adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from baton.evaluation.views import context_prefix, default_control_texts
from services.trainer.registry import AdapterRegistry
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

TIMEOUT_S = 300
JOB_ID = "job-views"
NAME = "wimble"
DOCUMENTS = 10
EVAL_FRACTION = 0.2
SEED = 5

# An invented author: made-up creatures and places, fixed turns of phrase, and three opinions stated again and
# again (the stance probe asks about them).
WORDS = {
    "who": ["the old zorbel", "my grey wimblet", "Captain Frundle", "the quiet snorrick", "little Pimsey"],
    "does": ["grizzles", "wobbles", "hums", "tumbles about", "snoozles"],
    "where": ["under the crooked bridge", "beyond the plum hill", "in the wimble marsh", "by the tinker's gate"],
}
TEMPLATES = (
    "Oh, {who} {does} {where} again, and nobody minds it at all.",
    "I tell you, {who} {does} {where}, and that is the whole of it.",
    "When {who} {does} {where}, the marsh smells of plum jam.",
)
OPINIONS = (
    ("A zorbel always hums before the rain, never after it.", "A zorbel always hums after the rain, never before it."),
    ("The plum hill is for walking, and the marsh is for thinking.",
     "The marsh is for walking, and the plum hill is for thinking."),
    ("Wimblets are wiser in the evening than in the morning.",
     "Wimblets are wiser in the morning than in the evening."),
)  # fmt: skip


def author_document(seed: int) -> str:
    rng = random.Random(seed)
    sentences = [rng.choice(TEMPLATES).format(**{k: rng.choice(v) for k, v in WORDS.items()}) for _ in range(3)]
    for author, _ in rng.sample(OPINIONS, 2):
        sentences.insert(rng.randrange(len(sentences) + 1), author)
    return " ".join(sentences)


def ingested_texts(home: Path) -> list[dict[str, str]]:
    """The author's documents as the gateway leaves them: BATON_HOME/texts/<content hash>.txt."""
    texts = home / "texts"
    texts.mkdir(parents=True)
    documents = []
    for i in range(DOCUMENTS):
        text = author_document(seed=100 + i)
        path = texts / f"{hashlib.sha256(text.encode()).hexdigest()}.txt"
        path.write_text(text, encoding="utf-8")
        documents.append({"id": f"doc-{i:02d}", "path": str(path)})
    return documents


def job_spec(model: Path, documents: list[dict[str, str]]) -> dict[str, Any]:
    """spec.json as the trainer service writes it; a short plain-LoRA run with a high learning rate (fast on CPU)."""
    return {
        "job_id": JOB_ID, "name": NAME, "base_model_path": str(model),
        "dataset": {"kind": "texts", "documents": documents},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": [], "target_experts": False,
                 "train_router": False, "use_rslora": False},
        "quantization": {"method": "none", "double_quant": False, "compute_dtype": "float32"},
        "hyper": {
            "learning_rate": 3e-3, "warmup_ratio": 0.0, "warmup_steps": None, "lr_schedule": "constant",
            "seq_len": 64, "micro_batch_size": 1, "grad_accumulation_steps": 1, "max_steps": 4, "epochs": None,
            "eval_fraction": EVAL_FRACTION, "eval_every_steps": None, "checkpoint_every_steps": 100,
            "keep_checkpoints": 1, "seed": SEED, "gradient_checkpointing": False, "optimizer": "adamw_torch",
            "weight_decay": 0.0, "max_grad_norm": 1.0,
        },
        "device": "cpu",
    }  # fmt: skip


def run(command: list[str], env: dict[str, str], log: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    log.write_text(result.stdout + result.stderr, encoding="utf-8")
    return result


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Path:
    """A BATON_HOME holding one registered adapter trained by the trainer's worker."""
    home = tmp_path_factory.mktemp("eval-views-home")
    job_dir = home / "trainer" / "jobs" / JOB_ID
    job_dir.mkdir(parents=True)
    (job_dir / "spec.json").write_text(json.dumps(job_spec(smollm2, ingested_texts(home))), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.monotonic()
    worker = run([sys.executable, "-m", "services.trainer.worker", str(job_dir)], env, job_dir / "worker.log")
    assert worker.returncode == 0, worker.stdout + worker.stderr
    print(f"\ntraining (worker process): {time.monotonic() - started:.1f} s")
    record = {"tenant": "me", "base_model_path": str(smollm2)}  # what the service records (core._finalize)
    AdapterRegistry(home / "adapters").publish(NAME, JOB_ID, job_dir / "output", record)
    shutil.rmtree(job_dir / "output")  # the service keeps only spec, events and log once the adapter is registered
    return home


def test_eval_views_measures_a_trained_adapter(home: Path, smollm2: Path, tmp_path: Path) -> None:
    probe = tmp_path / "probe.jsonl"
    lines = [{"id": f"opinion-{i}", "author": a, "opposite": o} for i, (a, o) in enumerate(OPINIONS)]
    probe.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    control = tmp_path / "control.txt"  # one paragraph of the bundled English control set keeps the run short
    control.write_text(default_control_texts()[0].split("\n\n")[0], encoding="utf-8")
    env = {**os.environ, "BATON_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "baton.cli.main", "eval", "views", NAME]
    started = time.monotonic()
    result = run([*command, "--probe", str(probe), "--control", str(control), "--json"], env, tmp_path / "cli.log")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    print(f"baton eval views: {time.monotonic() - started:.1f} s wall\n{json.dumps(report, indent=1)}")

    assert report["adapter"] == f"{NAME} v1" and report["base_model"] == smollm2.name and report["device"] == "cpu"
    heldout, control_ppl, stance = report["heldout"], report["control"], report["stance"]
    assert heldout["texts"] == round(DOCUMENTS * EVAL_FRACTION) == 2 and heldout["tokens"] > 40
    assert control_ppl["texts"] == 1 and control_ppl["tokens"] > 50
    for measured in (heldout, control_ppl):
        assert 1 < measured["base"] < 1000 and 1 < measured["adapter"] < 1000
    # The adapter learned the author: their unseen documents are far less surprising than to the base model.
    assert heldout["adapter"] < 0.8 * heldout["base"]
    assert stance["pairs"] == 3 and len(stance["items"]) == 3
    assert all(0 <= stance[key] <= 1 for key in ("base_preferred", "adapter_preferred"))
    for item in stance["items"]:
        assert item["base_author"] < 0 and item["base_opposite"] < 0 and item["adapter_author"] < 0
    # The opinions were in its training texts: the adapter leans further toward the author's side.
    assert stance["adapter_mean_margin"] > stance["base_mean_margin"]
    assert any("job-views" in note for note in report["notes"])


def test_each_model_scores_from_the_start_it_expects(smollm2: Path, gemma3: Path) -> None:
    """Gemma's own <bos> (its output is garbage without it); SmolLM2 adds none, so the end-of-text token, as
    between packed documents — not its bos_token, which is the chat-turn marker <|im_start|>."""
    from transformers import AutoTokenizer

    gemma = AutoTokenizer.from_pretrained(str(gemma3))
    assert context_prefix(gemma) == [gemma.bos_token_id]
    smol = AutoTokenizer.from_pretrained(str(smollm2))
    assert smol.bos_token == "<|im_start|>" and context_prefix(smol) == [smol.eos_token_id]
