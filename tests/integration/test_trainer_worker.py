"""The training process for real, on the CPU: ``python -m services.trainer.worker JOB_DIR`` with 4-bit NF4 QLoRA on
a tiny Qwen3 built from a config.

- an adapter trained on one (generated) author's texts lowers the perplexity of that author's held-out text by at
  least 30 % against the base model — and lowers it more than another author's;
- kill -9 after a checkpoint, then a restart: the job resumes from the checkpoint, the per-step losses continue
  exactly where they left off and the final adapter equals the one of an uninterrupted run with the same seed;
- SIGUSR1 (yield) and SIGTERM (shutdown): checkpoint and exit 75 within a step, then the restart continues;
- bad input: an ``error`` event with the reason and exit 1.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from baton.models.tiny import build_tiny_model
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

WORKER_TIMEOUT_S = 120
EVENT_TIMEOUT_S = 60

# ------------------------------------------------------------------------------------------------- the authors

# Author A: a fictional storyteller with made-up words and a few fixed turns of phrase.
AUTHOR_A = {
    "subj": ["Брыздень", "старый шмурк", "Колобуша", "Вирлянка", "мой зелёный тыртыр", "граф Пуфендор"],
    "verb": ["шмуркает", "дзынькает", "прыжеет", "кувырлит", "завирляет", "бормочет"],
    "place": ["у кривого моста", "под лунным пнём", "в тыртырном лесу", "над сонной речкой", "за печью бабки Глаши"],
    "adv": ["тихохонько", "вприпрыжку", "по-брыздяному", "наискосок", "ни свет ни заря"],
    "obj": ["свою шляпу", "горсть шмурок", "медный чайник", "последнюю вирлянку", "старую песню"],
}
TEMPLATES_A = (
    "{subj} {verb} {place}, и никто не знает почему.",
    "Ах, {subj} опять {verb} {adv}, будто ищет {obj}.",
    "{subj}, говорю я вам, {verb} {place} — и это прекрасно.",
    "Когда {subj} {verb} {adv}, весь мир пахнет шмурками.",
    "А {subj} всё {verb} и {verb} {place}, не выпуская {obj}.",
)
# Author B: another voice, other made-up words, other templates — the control.
AUTHOR_B = {
    "subj": ["Фламбуз", "инженер Трохов", "Зюмба", "кот Лапсердак", "Оглобла", "профессор Квак"],
    "verb": ["чертит", "паяет", "взвешивает", "измеряет", "проверяет", "собирает"],
    "place": ["в мастерской", "на третьем этаже", "возле склада", "в лаборатории", "на крыше ангара"],
    "adv": ["аккуратно", "дважды", "по инструкции", "с линейкой", "без спешки"],
    "obj": ["схему насоса", "латунный клапан", "отчёт за среду", "чертёж моста", "ящик болтов"],
}
TEMPLATES_B = (
    "Сначала {subj} {verb} {obj} {place}.",
    "Затем {subj} {adv} {verb} {obj}.",
    "Итог: {subj} {verb} {obj}, всё записано.",
    "Пункт второй: {subj} {verb} {place} {adv}.",
)


def write_author(words: dict[str, list[str]], templates: tuple[str, ...], seed: int, sentences: int) -> str:
    rng = random.Random(seed)
    return " ".join(
        rng.choice(templates).format(**{key: rng.choice(options) for key, options in words.items()})
        for _ in range(sentences)
    )


def author_corpus(path: Path, documents: int, seed: int) -> Path:
    lines = [
        json.dumps({"text": write_author(AUTHOR_A, TEMPLATES_A, seed * 1000 + i, 6)}, ensure_ascii=False)
        for i in range(documents)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ job helpers


def job_spec(model: Path, dataset: Path, **hyper: Any) -> dict[str, Any]:
    """A resolved spec as the service writes it: 40 steps of 8 sequences of 64 tokens, checkpoints every 10."""
    return {
        "job_id": "job-test",
        "name": "author-a",
        "base_model_path": str(model),
        "dataset": {"kind": "jsonl", "path": str(dataset), "format": "auto", "train_on_prompt": False},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.05, "target_modules": [], "target_experts": False,
                 "train_router": False, "use_rslora": False},
        "quantization": {"method": "nf4", "double_quant": True, "compute_dtype": "float32"},
        "hyper": {
            "learning_rate": 3e-3, "warmup_ratio": 0.1, "warmup_steps": None, "lr_schedule": "cosine",
            "seq_len": 64, "micro_batch_size": 4, "grad_accumulation_steps": 2, "max_steps": 40, "epochs": None,
            "eval_fraction": 0.2, "eval_every_steps": 10, "checkpoint_every_steps": 10, "keep_checkpoints": 2,
            "seed": 3, "gradient_checkpointing": True, "optimizer": "adamw_torch", "weight_decay": 0.0,
            "max_grad_norm": 1.0, **hyper,
        },
        "device": "cpu",
    }  # fmt: skip


class Job:
    """One job folder and the worker processes run on it, one at a time."""

    def __init__(self, folder: Path, spec: dict[str, Any]) -> None:
        self.folder = folder
        folder.mkdir(parents=True)
        (folder / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        # One thread: the matrices are tiny (more threads only spin), and the float sums stay the same every run.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        with (self.folder / "worker.log").open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.trainer.worker", str(self.folder)],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self.process

    def wait(self) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"the worker did not finish in {WORKER_TIMEOUT_S} s; log:\n{self.log()}")

    def run(self) -> int:
        self.start()
        return self.wait()

    def events(self) -> list[dict[str, Any]]:
        path = self.folder / "events.jsonl"
        if not path.exists():
            return []
        events = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the last line of a killed run may be cut short (the parent tolerates it too)
        return events

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + EVENT_TIMEOUT_S
        while time.monotonic() < deadline:
            found = next((event for event in self.events() if predicate(event)), None)
            if found is not None:
                return found
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"the worker exited ({self.process.returncode}) first; log:\n{self.log()}")
            time.sleep(0.02)
        pytest.fail(f"no such event within {EVENT_TIMEOUT_S} s; log:\n{self.log()}")

    def log(self) -> str:
        return (self.folder / "worker.log").read_text(encoding="utf-8", errors="replace")[-4000:]

    def adapter(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.folder / "output" / "adapter_model.safetensors"))


def step_losses(events: list[dict[str, Any]]) -> dict[int, list[float]]:
    """Every logged loss per step: a step redone after a kill -9 appears twice."""
    losses: dict[int, list[float]] = {}
    for event in events:
        if event["type"] == "step":
            losses.setdefault(event["step"], []).append(event["loss"])
    return losses


def assert_same_adapter(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.allclose(actual[name], tensor, rtol=0, atol=1e-7), name


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trainer-worker")


@pytest.fixture(scope="module")
def model(workdir: Path) -> Path:
    # Wider than the kit's default (hidden 128): room for a rank-8 adapter to pick up an author's habits.
    return build_tiny_model(
        workdir / "model", hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, head_dim=32
    )


@pytest.fixture(scope="module")
def corpus(workdir: Path) -> Path:
    return author_corpus(workdir / "author-a.jsonl", documents=40, seed=1)


@pytest.fixture(scope="module")
def reference(workdir: Path, model: Path, corpus: Path) -> Job:
    """The uninterrupted run every other run is compared with."""
    job = Job(workdir / "reference", job_spec(model, corpus))
    started = time.monotonic()
    code = job.run()
    assert code == 0, job.log()
    print(f"\nreference run: {time.monotonic() - started:.1f} s wall")
    return job


# ------------------------------------------------------------------------------------------------------- tests


def test_adapter_lowers_the_authors_held_out_perplexity(reference: Job, model: Path) -> None:
    events = reference.events()
    kinds = [event["type"] for event in events]
    assert kinds[0] == "dataset" and kinds[-1] == "done"
    dataset = events[0]
    assert dataset["total_steps"] == 40 and dataset["eval_documents"] == 8 and dataset["train_documents"] == 32
    assert [event["step"] for event in events if event["type"] == "step"] == list(range(1, 41))
    assert [e["reason"] for e in events if e["type"] == "checkpoint"] == ["periodic"] * 3 + ["final"]
    result = events[-1]["result"]
    before, after = result["eval_perplexity_before"], result["eval_perplexity_after"]
    drop = 1 - after / before
    print(
        f"\nheld-out (eval split, 8 documents) perplexity: base {before:.1f} -> adapter {after:.1f} ({drop:.0%} lower)"
    )
    assert drop >= 0.30
    assert math.isclose(result["eval_loss_before"], math.log(before)) and result["steps"] == 40
    assert result["tokens_seen"] > 0 and result["data_hash"] == dataset["data_hash"]

    output = reference.folder / "output"
    assert {"adapter_config.json", "adapter_model.safetensors", "baton-adapter.json", "loss.png"} <= {
        path.name for path in output.iterdir()
    }
    assert (output / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metadata = json.loads((output / "baton-adapter.json").read_text(encoding="utf-8"))
    assert metadata["base_model_path"] == str(model) and len(metadata["base_model_hash"]) == 64
    assert metadata["seq_len"] == 64 and metadata["lora"]["rank"] == 8

    # An independent check on fresh text: the adapter helps author A far more than author B (the style, not just
    # "Russian text"), measured outside the trainer's own evaluation code.
    fresh_a = write_author(AUTHOR_A, TEMPLATES_A, seed=99_999, sentences=40)
    fresh_b = write_author(AUTHOR_B, TEMPLATES_B, seed=99_999, sentences=40)
    (base_a, tuned_a), (base_b, tuned_b) = perplexities(model, output, [fresh_a, fresh_b])
    print(f"fresh author A: {base_a:.1f} -> {tuned_a:.1f}; author B: {base_b:.1f} -> {tuned_b:.1f}")
    assert tuned_a <= 0.7 * base_a
    assert tuned_a / base_a < tuned_b / base_b


def perplexities(model: Path, adapter: Path, texts: list[str]) -> list[tuple[float, float]]:
    """(base, adapter) perplexity of each text with the NF4 base, as the trainer loads it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(str(model), quantization_config=quant, device_map="cpu")
    tuned = PeftModel.from_pretrained(base, str(adapter)).eval()
    results = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text, verbose=False)["input_ids"][:512]])
            with tuned.disable_adapter():
                base_loss = float(tuned(input_ids=ids, labels=ids).loss)
            results.append((math.exp(base_loss), math.exp(float(tuned(input_ids=ids, labels=ids).loss))))
    return results


def test_strength_keeps_that_share_of_the_update_and_the_final_eval_scores_it(
    workdir: Path, reference: Job, tmp_path: Path
) -> None:
    """The reference job again from its final checkpoint, with strength 0.5 on the top half of the layers: only the
    export changes — the upper layers' B matrices halved, the lower ones' zero (those layers are the base's)."""
    from safetensors.torch import load_file

    from services.trainer.lora import layer_index

    folder = tmp_path / "half"
    shutil.copytree(reference.folder, folder, ignore=shutil.ignore_patterns("output", "events.jsonl", "*.log"))
    spec = json.loads((folder / "spec.json").read_text(encoding="utf-8"))
    spec["lora"]["strength"] = 0.5
    spec["lora"]["top_layers"] = 0.5
    (folder / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    job = Job.__new__(Job)
    job.folder, job.process = folder, None
    assert job.run() == 0, job.log()

    trained = load_file(reference.folder / "output" / "adapter_model.safetensors")
    halved = load_file(folder / "output" / "adapter_model.safetensors")
    assert trained.keys() == halved.keys() and any("lora_B" in name for name in trained)
    layers = {layer_index(name) for name in trained} - {None}
    assert len(layers) >= 2, layers
    first_kept = max(layers) + 1 - round((max(layers) + 1) * 0.5)
    for name, tensor in trained.items():
        factor = (0.0 if layer_index(name) < first_kept else 0.5) if "lora_B" in name else 1.0
        assert torch.allclose(halved[name], tensor * factor, rtol=0, atol=1e-7), name
    metadata = json.loads((folder / "output" / "baton-adapter.json").read_text(encoding="utf-8"))
    reference_metadata = json.loads((reference.folder / "output" / "baton-adapter.json").read_text(encoding="utf-8"))
    assert metadata["lora"]["strength"] == 0.5 and reference_metadata["lora"]["strength"] == 1.0
    assert metadata["lora"]["top_layers"] == 0.5 and reference_metadata["lora"]["top_layers"] == 1.0
    before, after = metadata["eval_perplexity_before"], metadata["eval_perplexity_after"]
    assert before == reference_metadata["eval_perplexity_before"]
    assert reference_metadata["eval_perplexity_after"] < after < before, "half the update: between base and adapter"
    logs = [e.get("message", "") for e in job.events() if e["type"] == "log"]
    assert any("adapter strength 0.5 (the top 0.5 of the layers; those below: 0)" in line for line in logs), logs


def test_evaluate_false_holds_the_split_out_scores_nothing_and_trains_the_same_adapter(
    model: Path, corpus: Path, reference: Job, tmp_path: Path
) -> None:
    """``evaluate: false`` (what `make demo` sets, leaving the scoring to its views stage): the same documents are
    held out, no evaluation runs, no before/after perplexity is recorded, and the adapter is the reference's —
    evaluating never changes what is trained."""
    job = Job(tmp_path / "no-eval", job_spec(model, corpus, evaluate=False))
    assert job.run() == 0, job.log()
    events = job.events()
    assert not [event for event in events if event["type"] == "eval"]
    (dataset,) = [event for event in events if event["type"] == "dataset"]
    (reference_dataset,) = [event for event in reference.events() if event["type"] == "dataset"]
    assert dataset == reference_dataset and dataset["eval_documents"] > 0
    metadata = json.loads((job.folder / "output" / "baton-adapter.json").read_text(encoding="utf-8"))
    assert metadata.get("eval_perplexity_before") is None and metadata.get("eval_perplexity_after") is None
    assert_same_adapter(job.adapter(), reference.adapter())


def test_kill_9_resumes_from_the_checkpoint_and_equals_an_uninterrupted_run(
    workdir: Path, model: Path, corpus: Path, reference: Job
) -> None:
    job = Job(workdir / "killed", job_spec(model, corpus))
    process = job.start()
    job.wait_for(lambda e: e["type"] == "checkpoint" and e["step"] == 20)
    job.wait_for(lambda e: e["type"] == "step" and e["step"] >= 23)  # mid-job: steps past the checkpoint are lost
    process.kill()
    assert process.wait() == -signal.SIGKILL
    assert not (job.folder / "output").exists()

    assert job.run() == 0, job.log()
    events = job.events()
    resumed = [event for event in events if event["type"] == "resumed"]
    assert [event["step"] for event in resumed] == [20]
    assert resumed[0]["from_checkpoint"].endswith("checkpoints/step-20")
    # The loss curve continues: every step (those redone after the kill included) has the reference's loss.
    expected = {step: losses[0] for step, losses in step_losses(reference.events()).items()}
    logged = step_losses(events)
    assert sorted(logged) == list(range(1, 41))
    for step, losses in logged.items():
        assert all(loss == pytest.approx(expected[step], rel=0, abs=1e-9) for loss in losses), step
    after_resume = [e["step"] for e in events[events.index(resumed[0]) :] if e["type"] == "step"]
    assert after_resume == list(range(21, 41))
    assert_same_adapter(job.adapter(), reference.adapter())
    assert sorted(p.name for p in (job.folder / "checkpoints").iterdir()) == ["step-30", "step-40"]  # keep 2


def test_sigusr1_and_sigterm_checkpoint_and_exit_75_then_the_job_continues(
    workdir: Path, model: Path, corpus: Path, reference: Job
) -> None:
    job = Job(workdir / "signalled", job_spec(model, corpus))
    stops = []
    for signum, after_step, reason in ((signal.SIGUSR1, 5, "yield"), (signal.SIGTERM, 25, "shutdown")):
        process = job.start()
        job.wait_for(lambda e, after_step=after_step: e["type"] == "step" and e["step"] >= after_step)
        signalled = time.monotonic()
        process.send_signal(signum)
        assert job.wait() == 75, job.log()
        took = time.monotonic() - signalled
        last = job.events()[-1]
        assert last["type"] == "checkpoint" and last["reason"] == reason, last
        assert (job.folder / "checkpoints" / f"step-{last['step']}" / "checkpoint.json").is_file()
        stops.append((reason, last["step"], took))
        assert took < 5.0  # one optimizer step and a checkpoint, not the rest of the job
    print(f"\nstops (reason, step, seconds from signal to exit 75): {stops}")
    assert job.run() == 0, job.log()
    resumed = [event["step"] for event in job.events() if event["type"] == "resumed"]
    assert resumed == [stops[0][1], stops[1][1]]
    assert_same_adapter(job.adapter(), reference.adapter())


def broken_jsonl(folder: Path) -> Path:
    path = folder / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{"text": \n{"text": "fine"}\n[1, 2]\n', encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("case", "reason", "hint"),
    [
        ("broken_jsonl", "BAD_JSONL", "line 2: not valid JSON"),
        ("unknown_target", "UNKNOWN_TARGET_MODULES", "choose from down_proj, gate_proj"),
        ("missing_model", "BASE_MODEL_MISSING", "has no config.json"),
        ("seq_len", "SEQ_LEN_TOO_LONG", "set hyperparameters.seq_len to 1024 or less"),
    ],
)
def test_bad_input_fails_with_a_reason_and_exit_1(
    workdir: Path, model: Path, corpus: Path, case: str, reason: str, hint: str
) -> None:
    spec = job_spec(model, corpus)
    if case == "broken_jsonl":
        spec["dataset"]["path"] = str(broken_jsonl(workdir))
    elif case == "unknown_target":
        spec["lora"]["target_modules"] = ["q_proj", "query_key_value"]
    elif case == "missing_model":
        spec["base_model_path"] = str(workdir / "no-such-model")
    else:
        spec["hyper"]["seq_len"] = 4096
    job = Job(workdir / f"bad-{case}", spec)
    assert job.run() == 1, job.log()
    last = job.events()[-1]
    assert last["type"] == "error" and last["reason"] == reason, last
    assert hint in last["message"]
    if case == "broken_jsonl":
        assert last["metadata"]["lines"] == "2,4"
    assert not (job.folder / "output").exists()
