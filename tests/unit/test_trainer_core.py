"""The trainer's core with fake child processes (tests/fixtures/fake_worker.py, fake_prepare.py) and hand-driven
leases; the integration suite runs the real training process, a real scheduler and the service over gRPC.

What a fake pins down exactly: the state machine around a yield, a lost lease, a crash and a cancel; recovery of a
job whose service went away; the registry never holding half a version; validation errors with their reasons.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from baton.runtime.errors import BatonError, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.trainer.basemodel import inspect_base_model
from services.trainer.core import CoreConfig, TrainerCore
from services.trainer.estimate import estimate
from services.trainer.lease import FreeLease, TrainingLeaseRequest
from services.trainer.metrics import TrainerMetrics
from services.trainer.model import (
    DocumentsSource,
    EventType,
    Hyperparameters,
    Job,
    JobEvent,
    JobSpec,
    JobState,
    JsonlSource,
    LoraSettings,
    QuantSettings,
)
from services.trainer.registry import AdapterRegistry
from services.trainer.runner import EventTail
from services.trainer.store import JobStore
from services.trainer.validation import ValidationContext
from tests.fixtures.fake_worker import loss_at

TENANT = "alice"
HIDDEN, LAYERS, VOCAB, MLP = 64, 2, 128, 128


# ---------------------------------------------------------------------------------------------------- fixtures


def write_fake_model(folder: Path, *, max_positions: int = 256) -> Path:
    """A model folder the trainer can inspect: config, a tokenizer file, safetensors with real headers (zeros)."""
    folder.mkdir(parents=True)
    config = {"model_type": "qwen3", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "vocab_size": VOCAB,
              "max_position_embeddings": max_positions, "num_attention_heads": 2, "intermediate_size": MLP,
              "tie_word_embeddings": True, "torch_dtype": "float32"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")
    shapes = {"model.embed_tokens.weight": [VOCAB, HIDDEN], "model.norm.weight": [HIDDEN]}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{prefix}.self_attn.{name}.weight"] = [HIDDEN, HIDDEN]
        shapes[f"{prefix}.mlp.gate_proj.weight"] = [MLP, HIDDEN]
        shapes[f"{prefix}.mlp.up_proj.weight"] = [MLP, HIDDEN]
        shapes[f"{prefix}.mlp.down_proj.weight"] = [HIDDEN, MLP]
        shapes[f"{prefix}.input_layernorm.weight"] = [HIDDEN]
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * int(__import__("math").prod(shape))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return folder


@dataclass
class ScriptedLeases:
    """Grants FreeLeases (which tests drive by hand) while ``open`` is set; remembers every one."""

    open: asyncio.Event = field(default_factory=asyncio.Event)
    granted: list[FreeLease] = field(default_factory=list)
    requests: list[TrainingLeaseRequest] = field(default_factory=list)
    uses_gpu_lease: bool = True

    def __post_init__(self) -> None:
        self.open.set()

    async def acquire(self, request: TrainingLeaseRequest, on_queued: Callable[[int, float], None]) -> FreeLease:
        self.requests.append(request)
        if not self.open.is_set():
            on_queued(1, 30.0)
        await self.open.wait()
        lease = FreeLease(epoch=len(self.granted) + 1)
        self.granted.append(lease)
        return lease

    async def close(self) -> None:
        return None


@dataclass
class FakeHotLoader:
    calls: list[tuple[str, str]] = field(default_factory=list)

    async def load(self, name: str, relative_path: str) -> None:
        self.calls.append((name, relative_path))


@dataclass
class Harness:
    root: Path
    model: Path
    data: Path
    leases: ScriptedLeases = field(default_factory=ScriptedLeases)
    hot_loader: FakeHotLoader = field(default_factory=FakeHotLoader)
    max_queued_jobs: int = 16
    nf4_supported: bool = True
    core: TrainerCore | None = None
    metrics: CollectorRegistry = field(default_factory=CollectorRegistry)

    @property
    def registry(self) -> AdapterRegistry:
        return AdapterRegistry(self.root / "adapters")

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    async def start(self) -> TrainerCore:
        validation = ValidationContext(
            device="cpu",
            allowed_roots=[self.data.resolve()],
            catalog_path=self.root / "catalog.sqlite",
            texts_dir=self.root / "texts",
            default_priority=5,
            nf4_supported=self.nf4_supported,
        )
        config = CoreConfig(
            jobs_dir=self.jobs_dir,
            texts_dir=self.root / "texts",
            worker_module="tests.fixtures.fake_worker",
            prepare_module="tests.fixtures.fake_prepare",
            device="cpu",
            max_queued_jobs=self.max_queued_jobs,
            max_crash_restarts=2,
            child_stop_timeout_s=10.0,
            validation=validation,
        )
        store = JobStore(self.root / "jobs.sqlite")
        self.metrics = CollectorRegistry()
        self.core = TrainerCore(store, self.registry, self.leases, config, TrainerMetrics(self.metrics),
                                self.hot_loader)  # fmt: skip
        await self.core.start()
        return self.core

    def spec(self, name: str = "views", *, steps: int = 6, every: int = 2, **hyper: object) -> JobSpec:
        return JobSpec(
            name=name,
            tenant=TENANT,
            base_model_path=str(self.model),
            jsonl=JsonlSource(str(self.data / "good.jsonl")),
            hyperparameters=Hyperparameters(max_steps=steps, checkpoint_every_steps=every, **hyper),  # type: ignore[arg-type]
        )

    async def wait(self, job_id: str, until: Callable[[Job], bool], timeout_s: float = 20.0) -> Job:
        assert self.core is not None
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.core.get(job_id)
            if until(job):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} stuck in {job.state} at step {job.progress.step}")
            await asyncio.sleep(0.02)

    async def finish(self, job_id: str, timeout_s: float = 30.0) -> Job:
        return await self.wait(job_id, lambda job: job.terminal, timeout_s)


@pytest.fixture
async def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Harness]:
    monkeypatch.setenv("FAKE_STEP_S", "0.03")
    data = tmp_path / "data"
    data.mkdir()
    (data / "good.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(8)))
    (data / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n{"text": "ok"}\nnot json\n')
    (data / "empty.jsonl").write_text("\n  \n")
    h = Harness(tmp_path, write_fake_model(tmp_path / "model"), data)
    yield h
    if h.core is not None:
        await h.core.close()


def expected_weights(steps: int) -> str:
    """The fake worker's "adapter" after an uninterrupted run of ``steps`` steps."""
    return json.dumps([loss_at(step) for step in range(1, steps + 1)])


async def collect(core: TrainerCore, job_id: str, after_seq: int = 0) -> list[JobEvent]:
    return [event async for event in core.watch(job_id, after_seq=after_seq)]


# ---------------------------------------------------------------------------------------------------- submit


async def test_submit_fills_every_default_and_estimates_resources(harness: Harness) -> None:
    harness.leases.open.clear()  # keep it waiting: only the answer is under test
    core = await harness.start()
    job = await core.submit(harness.spec(steps=3))
    assert job.state == JobState.QUEUED and job.job_id.startswith("job-")
    spec = job.spec
    assert (spec.lora.rank, spec.lora.alpha, spec.lora.dropout, spec.lora.strength) == (16, 32.0, 0.05, 1.0)
    assert spec.lora.top_layers == 1.0
    assert spec.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # On a CPU: plain LoRA (the tiny base fits in memory many times over), 256-token sequences, 4 micro-batches a step.
    assert (spec.quantization.method, spec.quantization.double_quant, spec.quantization.compute_dtype) == (
        "none", True, "float32"
    )  # fmt: skip
    hyper = spec.hyperparameters
    assert hyper.seq_len == 256  # unset on a CPU: min(256, the model's maximum)
    assert (hyper.learning_rate, hyper.warmup_ratio, hyper.lr_schedule, hyper.optimizer) == (
        2e-4, 0.03, "cosine", "adamw_torch"
    )  # fmt: skip
    assert (hyper.micro_batch_size, hyper.grad_accumulation_steps, hyper.eval_fraction) == (1, 4, 0.05)
    assert hyper.max_steps == 3 and hyper.epochs is None  # only max_steps set: no epoch limit
    assert hyper.eval_every_steps == hyper.checkpoint_every_steps == 2 and hyper.keep_checkpoints == 2
    assert hyper.evaluate is True  # the trainer scores its held-out split unless told not to
    assert spec.gpu.priority == 5 and spec.gpu.preemptible is True and spec.hot_load is True
    assert spec.gpu.vram_bytes == job.estimate.vram_bytes > 0
    assert job.estimate.disk_bytes > 0 and job.estimate.ram_bytes > job.estimate.vram_bytes


@pytest.mark.parametrize(
    ("change", "reason", "words"),
    [
        (lambda h, s: setattr(s, "base_model_path", str(h.root / "nowhere")), "BASE_MODEL_MISSING", "no such folder"),
        (lambda h, s: setattr(s, "base_model_path", "model"), "BASE_MODEL_MISSING", "relative"),
        (lambda h, s: (h.model / "tokenizer.json").unlink(), "BASE_MODEL_MISSING", "no tokenizer"),
        (lambda h, s: (h.model / "model.safetensors").unlink(), "BASE_MODEL_MISSING", "safetensors"),
        (lambda h, s: setattr(s.jsonl, "path", "/etc/passwd"), "DATASET_PATH_INVALID", "outside"),
        (lambda h, s: setattr(s.jsonl, "path", str(h.data / "absent.jsonl")), "DATASET_PATH_INVALID", "not exist"),
        (lambda h, s: setattr(s.jsonl, "path", str(h.data / "empty.jsonl")), "EMPTY_DATASET", "empty"),
        (lambda h, s: setattr(s, "jsonl", None), "DATASET_REQUIRED", "exactly one"),
        (lambda h, s: setattr(s.hyperparameters, "seq_len", 257), "SEQ_LEN_TOO_LONG", "at most 256"),
        (lambda h, s: setattr(s.lora, "target_modules", ["q_proj", "qkv"]), "UNKNOWN_TARGET_MODULES", "qkv"),
        (lambda h, s: setattr(s.lora, "rank", 513), "OUT_OF_RANGE", "lora.rank"),
        (lambda h, s: setattr(s.lora, "dropout", 1.0), "OUT_OF_RANGE", "lora.dropout"),
        (lambda h, s: setattr(s.lora, "strength", 0.0), "OUT_OF_RANGE", "lora.strength"),
        (lambda h, s: setattr(s.lora, "strength", 1.5), "OUT_OF_RANGE", "lora.strength"),
        (lambda h, s: setattr(s.lora, "top_layers", 0.0), "OUT_OF_RANGE", "lora.top_layers"),
        (lambda h, s: setattr(s.lora, "top_layers", 1.5), "OUT_OF_RANGE", "lora.top_layers"),
        (lambda h, s: setattr(s.hyperparameters, "warmup_ratio", 0.6), "OUT_OF_RANGE", "warmup_ratio"),
        (lambda h, s: setattr(s.hyperparameters, "eval_fraction", 0.9), "OUT_OF_RANGE", "eval_fraction"),
        (lambda h, s: setattr(s.hyperparameters, "optimizer", "lion"), "UNKNOWN_OPTIMIZER", "adamw_torch"),
        (lambda h, s: setattr(s, "name", "Bad Name"), "BAD_NAME", "a-z"),
        (lambda h, s: setattr(s, "tenant", ""), "TENANT_REQUIRED", "tenant"),
    ],
)
async def test_bad_specs_are_refused_with_a_reason_and_what_to_fix(
    harness: Harness, change: Callable[[Harness, JobSpec], None], reason: str, words: str
) -> None:
    core = await harness.start()
    spec = harness.spec()
    change(harness, spec)
    with pytest.raises(InvalidArgument) as refused:
        await core.submit(spec)
    assert refused.value.reason == reason and words in refused.value.message, refused.value.message
    assert core.list("", [], 0, "")[2] == 0  # nothing was stored


async def test_unknown_target_modules_list_the_models_linear_modules(harness: Harness) -> None:
    core = await harness.start()
    spec = harness.spec()
    spec.lora.target_modules = ["self_attn.q_proj", "c_attn"]  # a dotted suffix is fine; c_attn is GPT-2's
    with pytest.raises(InvalidArgument) as refused:
        await core.submit(spec)
    assert refused.value.metadata["unknown"] == "c_attn"
    assert refused.value.metadata["linear_modules"].split(",") == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"
    ]  # fmt: skip


async def test_nf4_without_bitsandbytes_is_a_failed_precondition(harness: Harness) -> None:
    harness.nf4_supported = False
    core = await harness.start()
    asked = harness.spec()
    asked.quantization = QuantSettings(method="nf4")
    with pytest.raises(FailedPrecondition) as refused:
        await core.submit(asked)
    assert refused.value.reason == "QUANT_UNSUPPORTED"
    assert (await core.submit(harness.spec())).spec.quantization.method == "none"  # the CPU default needs no bnb


async def test_resubmitting_the_same_request_id_returns_the_first_job(harness: Harness) -> None:
    harness.leases.open.clear()
    core = await harness.start()
    first = await core.submit(harness.spec(), request_id="r-1")
    again = await core.submit(harness.spec(), request_id="r-1")
    other = await core.submit(harness.spec(), request_id="r-2")
    assert first.job_id == again.job_id != other.job_id
    assert core.list(TENANT, [], 0, "")[2] == 2


async def test_a_full_queue_refuses_with_retry_info(harness: Harness) -> None:
    harness.leases.open.clear()
    harness.max_queued_jobs = 2
    core = await harness.start()
    await core.submit(harness.spec())
    await core.submit(harness.spec())
    with pytest.raises(ResourceExhausted) as refused:
        await core.submit(harness.spec())
    assert refused.value.reason == "QUEUE_FULL" and refused.value.retry_after_s


async def test_validate_only_builds_statistics_and_stores_nothing(harness: Harness) -> None:
    core = await harness.start()
    job = await core.submit(harness.spec(), validate_only=True)
    assert job.job_id == "" and job.dataset is not None and job.dataset.documents == 8
    assert job.progress.total_steps == 6
    spec = harness.spec()
    spec.jsonl = JsonlSource(str(harness.data / "broken.jsonl"))
    with pytest.raises(InvalidArgument) as refused:
        await core.submit(spec, validate_only=True)
    assert refused.value.reason == "BAD_JSONL" and refused.value.metadata["lines"] == "2,4"
    assert core.list("", [], 0, "")[2] == 0
    assert [p.name for p in harness.jobs_dir.iterdir()] == []  # the scratch folder is gone


# ---------------------------------------------------------------------------------------------------- running


async def test_a_job_trains_registers_its_adapter_and_hot_loads_it(harness: Harness) -> None:
    core = await harness.start()
    job = await core.submit(harness.spec(steps=6, every=2))
    events = await collect(core, job.job_id)
    done = core.get(job.job_id)
    assert done.state == JobState.SUCCEEDED, done.error
    states = [e.state for e in events if e.type == EventType.STATE_CHANGED]
    assert states == [JobState.PREPARING, JobState.WAITING_FOR_GPU, JobState.RUNNING, JobState.FINALIZING,
                      JobState.SUCCEEDED]  # fmt: skip
    assert [e.progress.step for e in events if e.type == EventType.STEP] == [1, 2, 3, 4, 5, 6]
    assert [e.checkpoint.step for e in events if e.checkpoint] == [2, 4, 6]
    seqs = [e.seq for e in events[1:]]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    adapter = done.adapter
    assert adapter is not None and (adapter.name, adapter.version) == ("views", 1)
    assert Path(adapter.path) == harness.root / "adapters" / "views" / "1"
    assert (adapter.steps, adapter.tokens_seen, adapter.eval_loss_before) == (6, 600, 3.0)
    assert adapter.loss_plot_path.endswith("loss.png") and adapter.size_bytes > 0 and adapter.hot_loaded
    assert harness.hot_loader.calls == [("views", "views/1")]
    assert (Path(adapter.path) / "adapter_model.safetensors").read_text() == expected_weights(6)
    assert json.loads((Path(adapter.path) / "registry.json").read_text())["job_id"] == job.job_id
    assert not (harness.jobs_dir / job.job_id / "checkpoints").exists()  # work files cleaned up
    assert done.progress.total_steps == 6 and done.progress.eta_s == 0.0 and done.finished_unix_s > 0
    assert harness.leases.granted[0].released and done.lease_epoch == 0

    second = await core.submit(harness.spec(steps=2))
    assert (await harness.finish(second.job_id)).adapter.version == 2  # type: ignore[union-attr]
    assert harness.registry.versions("views") == [1, 2]


async def test_yield_checkpoints_releases_and_resumes_when_granted_again(harness: Harness) -> None:
    core = await harness.start()
    job = await core.submit(harness.spec(steps=30, every=10))
    await harness.wait(job.job_id, lambda j: j.progress.step >= 3)
    harness.leases.open.clear()  # the GPU goes to someone else until the test says so
    harness.leases.granted[0].yield_requested.set()
    paused = await harness.wait(job.job_id, lambda j: j.state == JobState.PAUSED)
    assert harness.leases.granted[0].released
    assert paused.last_checkpoint is not None and paused.last_checkpoint.reason == "yield"
    assert paused.progress.preemptions == 1 and paused.queue_position == 1
    harness.leases.open.set()
    done = await harness.finish(job.job_id)
    assert done.state == JobState.SUCCEEDED and done.progress.resumes == 1
    assert (Path(done.adapter.path) / "adapter_model.safetensors").read_text() == expected_weights(30)  # type: ignore[union-attr]
    messages = [e.message for e in await collect(core, job.job_id, after_seq=1)]
    assert any("asked to yield" in m for m in messages) and any(m.startswith("resumed from step") for m in messages)


async def test_a_yield_asked_on_the_last_steps_that_finishes_instead_counts_as_a_handover(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_IGNORE_YIELD", "1")  # the child trains on to its last step, then exits done
    core = await harness.start()
    job = await core.submit(harness.spec(steps=40, every=10))
    await harness.wait(job.job_id, lambda j: j.progress.step >= 3)
    harness.leases.granted[0].yield_requested.set()
    await harness.wait(job.job_id, lambda j: j.state == JobState.YIELDING)
    done = await harness.finish(job.job_id)
    assert done.state == JobState.SUCCEEDED and harness.leases.granted[0].released
    assert harness.metrics.get_sample_value("baton_trainer_yield_seconds_count") == 1


async def test_a_lost_lease_kills_the_child_at_once_and_the_job_resumes(harness: Harness) -> None:
    core = await harness.start()
    job = await core.submit(harness.spec(steps=40, every=5))
    await harness.wait(job.job_id, lambda j: j.progress.step >= 7)
    lost_at = time.monotonic()
    harness.leases.granted[0].lost.set()
    await harness.wait(job.job_id, lambda j: j.state == JobState.PAUSED or len(harness.leases.granted) > 1)
    assert time.monotonic() - lost_at < 1.5  # no checkpoint waited for: SIGKILL
    done = await harness.finish(job.job_id)
    assert done.state == JobState.SUCCEEDED and len(harness.leases.granted) == 2
    assert (Path(done.adapter.path) / "adapter_model.safetensors").read_text() == expected_weights(40)  # type: ignore[union-attr]


async def test_a_crash_resumes_from_the_last_checkpoint(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_CRASH_AT", "5")
    core = await harness.start()
    job = await core.submit(harness.spec(steps=8, every=2))
    done = await harness.finish(job.job_id)
    assert done.state == JobState.SUCCEEDED and done.crash_restarts == 1
    assert (Path(done.adapter.path) / "adapter_model.safetensors").read_text() == expected_weights(8)  # type: ignore[union-attr]
    logs = [e.message for e in await collect(core, job.job_id, after_seq=1) if e.type == EventType.LOG]
    assert any("crashed (exit -9, SIGKILL); restarting from step 4 (restart 1 of 2)" in m for m in logs), logs


async def test_repeated_crashes_fail_the_job_with_the_log_tail(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CRASH_AT", "2")
    monkeypatch.setenv("FAKE_CRASH_ALWAYS", "1")
    core = await harness.start()
    job = await core.submit(harness.spec(steps=4))
    done = await harness.finish(job.job_id)
    assert done.state == JobState.FAILED and done.error is not None
    assert done.error.reason == "TRAINER_CRASHED" and done.error.metadata["exit_code"] == "-9"
    assert "3 times" in done.error.message and "tests.fixtures.fake_worker" in done.error.message  # the log tail
    assert harness.registry.versions("views") == []


async def test_an_error_the_child_reports_fails_the_job_without_retrying(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FAIL", "OUT_OF_MEMORY")
    core = await harness.start()
    job = await core.submit(harness.spec())
    done = await harness.finish(job.job_id)
    assert done.state == JobState.FAILED and done.error is not None and done.crash_restarts == 0
    assert done.error.reason == "OUT_OF_MEMORY" and done.error.metadata["lines"] == "3,7"
    assert done.error.metadata["exit_code"] == "1"


async def test_broken_jsonl_fails_in_preparing_before_asking_for_the_gpu(harness: Harness) -> None:
    core = await harness.start()
    spec = harness.spec()
    spec.jsonl = JsonlSource(str(harness.data / "broken.jsonl"))
    job = await core.submit(spec)
    done = await harness.finish(job.job_id)
    assert done.state == JobState.FAILED and done.error is not None
    assert done.error.reason == "BAD_JSONL" and done.error.metadata["lines"] == "2,4"
    assert harness.leases.requests == []


# ---------------------------------------------------------------------------------------------------- cancel


async def test_cancel_while_training_registers_nothing(harness: Harness) -> None:
    core = await harness.start()
    job = await core.submit(harness.spec(steps=200, every=2))
    await harness.wait(job.job_id, lambda j: j.progress.step >= 3)
    answered = await core.cancel(job.job_id, TENANT)
    assert answered.state == JobState.CANCELLED and answered.cancel_requested
    assert harness.registry.versions("views") == []
    assert not (harness.root / "adapters" / "views").exists() or not any(
        (harness.root / "adapters" / "views").iterdir()
    )
    assert not (harness.jobs_dir / job.job_id / "checkpoints").exists()
    assert harness.leases.granted[0].released
    assert (await core.cancel(job.job_id)).state == JobState.CANCELLED  # idempotent
    finished = await core.submit(harness.spec(steps=1))
    await harness.finish(finished.job_id)
    with pytest.raises(FailedPrecondition):
        await core.cancel(finished.job_id)


async def test_cancel_of_a_queued_or_waiting_job_is_immediate(harness: Harness) -> None:
    harness.leases.open.clear()
    core = await harness.start()
    waiting = await core.submit(harness.spec())
    queued = await core.submit(harness.spec())
    await harness.wait(waiting.job_id, lambda j: j.state == JobState.WAITING_FOR_GPU and j.queue_position == 1)
    assert core.get(queued.job_id).queue_position == 1  # first in the trainer's own queue
    assert (await core.cancel(queued.job_id)).state == JobState.CANCELLED
    assert (await core.cancel(waiting.job_id)).state == JobState.CANCELLED
    assert harness.leases.granted == []


# ---------------------------------------------------------------------------------------------------- restarts


async def test_a_job_survives_its_service_going_away_mid_training(harness: Harness) -> None:
    core = await harness.start()
    job = await core.submit(harness.spec(steps=30, every=4))
    await harness.wait(job.job_id, lambda j: j.progress.step >= 9)
    # The service vanishes: its loop is cancelled (the child dies with it); nothing gets to mark the job paused.
    assert core._loop_task is not None
    core._loop_task.cancel()
    await asyncio.gather(core._loop_task, return_exceptions=True)
    assert JobStore(harness.root / "jobs.sqlite").get(job.job_id).state == JobState.RUNNING  # type: ignore[union-attr]
    harness.core = None
    restarted = await harness.start()
    assert restarted.get(job.job_id).state in (JobState.WAITING_FOR_GPU, JobState.RUNNING)
    done = await harness.finish(job.job_id)
    assert done.state == JobState.SUCCEEDED and done.progress.resumes == 1
    assert (Path(done.adapter.path) / "adapter_model.safetensors").read_text() == expected_weights(30)  # type: ignore[union-attr]


async def test_stopping_the_service_checkpoints_and_pauses_the_job(harness: Harness) -> None:
    core = await harness.start()
    job = await core.submit(harness.spec(steps=40, every=100))
    await harness.wait(job.job_id, lambda j: j.progress.step >= 3)
    await core.close()
    stored = JobStore(harness.root / "jobs.sqlite").get(job.job_id)
    assert stored is not None and stored.state == JobState.PAUSED
    assert stored.last_checkpoint is not None and stored.last_checkpoint.reason == "shutdown"
    assert harness.leases.granted[0].released
    restarted = await harness.start()
    done = await harness.finish(job.job_id)
    assert done.state == JobState.SUCCEEDED and restarted is harness.core
    assert (Path(done.adapter.path) / "adapter_model.safetensors").read_text() == expected_weights(40)  # type: ignore[union-attr]


async def test_a_job_whose_output_is_complete_is_finalized_without_training_again(harness: Harness) -> None:
    core = await harness.start()
    job = await core.submit(harness.spec(steps=3))
    await harness.wait(job.job_id, lambda j: j.state == JobState.FINALIZING or j.terminal)
    done = await harness.finish(job.job_id)
    # Replaying FINALIZING (a restart between the rename and recording SUCCEEDED) must give the same version.
    registry = harness.registry
    assert registry.find_by_job("views", job.job_id).version == done.adapter.version == 1  # type: ignore[union-attr]
    again = registry.publish("views", job.job_id, harness.root / "nowhere", {})
    assert again.version == 1 and registry.versions("views") == [1]


# ---------------------------------------------------------------------------------------------------- reading


async def test_other_tenants_jobs_do_not_exist_for_them(harness: Harness) -> None:
    harness.leases.open.clear()
    core = await harness.start()
    job = await core.submit(harness.spec())
    for call in (
        lambda: core.get(job.job_id, "mallory"),
        lambda: core.cancel(job.job_id, "mallory"),
        lambda: collect_with_tenant(core, job.job_id, "mallory"),
        lambda: core.get("job-nope", TENANT),
    ):
        with pytest.raises(NotFound) as refused:
            result = call()
            if asyncio.iscoroutine(result):
                await result
        assert refused.value.message in (f"no job {job.job_id!r}", "no job 'job-nope'")
    assert core.list("mallory", [], 0, "")[2] == 0 and core.list(TENANT, [], 0, "")[2] == 1


async def collect_with_tenant(core: TrainerCore, job_id: str, tenant: str) -> list[JobEvent]:
    return [event async for event in core.watch(job_id, tenant)]


async def test_list_pages_newest_first_and_refuses_foreign_tokens(harness: Harness) -> None:
    harness.leases.open.clear()
    core = await harness.start()
    ids = [(await core.submit(harness.spec())).job_id for _ in range(5)]
    seen, token = [], ""
    while True:
        jobs, token, total = core.list(TENANT, [], 2, token)
        assert total == 5
        seen += [job.job_id for job in jobs]
        if not token:
            break
    assert seen == ids[::-1]
    for _ in range(500):  # the first job leaves QUEUED (to prepare, then wait for the GPU) in the background
        queued, _, total = core.list(TENANT, [JobState.QUEUED], 0, "")
        if total == 4:
            break
        await asyncio.sleep(0.01)
    assert total == 4 and ids[0] not in [job.job_id for job in queued]  # the first one waits for the GPU
    _, token, _ = core.list(TENANT, [], 2, "")
    with pytest.raises(InvalidArgument):
        core.list("someone-else", [], 2, token)
    with pytest.raises(InvalidArgument):
        core.list(TENANT, [], 2, "garbage!")
    with pytest.raises(InvalidArgument):
        core.list(TENANT, [], 501, "")


async def test_watch_replays_stored_events_after_a_sequence_number(harness: Harness) -> None:
    core = await harness.start()
    job = await core.submit(harness.spec(steps=4))
    live = await collect(core, job.job_id)
    replay = await collect(core, job.job_id, after_seq=3)
    assert live[0].type == EventType.SNAPSHOT and live[0].seq == 0 and live[0].job is not None
    assert [e.seq for e in replay] == list(range(4, replay[-1].seq + 1))
    assert replay[-1].state == JobState.SUCCEEDED and replay[-1].adapter is not None
    snapshot_only = await collect(core, job.job_id)
    assert len(snapshot_only) == 1 and snapshot_only[0].state == JobState.SUCCEEDED


# ---------------------------------------------------------------------------------------------------- documents


def write_catalog(root: Path, rows: list[tuple[str, str, str, str | None]]) -> None:
    db = sqlite3.connect(root / "catalog.sqlite")
    db.execute(
        "CREATE TABLE documents (document_id TEXT, tenant TEXT, collection TEXT, content_hash TEXT, duplicate_of TEXT, "
        "source TEXT)"
    )
    db.executemany(
        "INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?)",
        [(d, TENANT, c, h, dup, f"/notes/{d}.md") for d, c, h, dup in rows],
    )
    db.commit()
    db.close()
    (root / "texts").mkdir(exist_ok=True)


async def test_ingested_documents_become_a_texts_dataset_without_duplicates(harness: Harness) -> None:
    write_catalog(harness.root, [("d1", "notes", "h1", None), ("d2", "notes", "h2", None),
                                 ("d3", "notes", "h1", "d1"), ("d4", "mail", "h4", None)])  # fmt: skip
    for content_hash in ("h1", "h2", "h4"):
        (harness.root / "texts" / f"{content_hash}.txt").write_text(f"text {content_hash}")
    core = await harness.start()
    spec = harness.spec(steps=2)
    spec.jsonl, spec.documents = None, DocumentsSource(collections=["notes"])
    job = await core.submit(spec)
    resolved = [(d.document_id, d.content_hash, d.source) for d in job.spec.documents.resolved]  # type: ignore[union-attr]
    assert resolved == [("d1", "h1", "/notes/d1.md"), ("d2", "h2", "/notes/d2.md")]
    done = await harness.finish(job.job_id)
    assert done.state == JobState.SUCCEEDED and done.dataset is not None and done.dataset.documents == 2
    written = json.loads((harness.jobs_dir / job.job_id / "spec.json").read_text())
    assert written["dataset"] == {"kind": "texts", "documents": [
        {"id": "d1", "path": str(harness.root / "texts" / "h1.txt"), "source": "/notes/d1.md"},
        {"id": "d2", "path": str(harness.root / "texts" / "h2.txt"), "source": "/notes/d2.md"},
    ]}  # fmt: skip
    assert written["lora"]["target_modules"] == [] and written["hyper"]["max_steps"] == 2

    spec.documents = DocumentsSource(document_ids=["d1", "d9"])
    with pytest.raises(InvalidArgument) as unknown:
        await core.submit(spec)
    assert unknown.value.reason == "UNKNOWN_DOCUMENTS" and unknown.value.metadata["document_ids"] == "d9"
    (harness.root / "texts" / "h4.txt").unlink()
    spec.documents = DocumentsSource(collections=["mail"])
    with pytest.raises(InvalidArgument) as missing:
        await core.submit(spec)
    assert missing.value.reason == "DOCUMENT_TEXT_MISSING"
    spec.documents = DocumentsSource(collections=["empty"])
    with pytest.raises(InvalidArgument) as empty:
        await core.submit(spec)
    assert empty.value.reason == "EMPTY_DATASET"


# ---------------------------------------------------------------------------------------------------- pieces


def test_event_tail_reads_whole_lines_and_survives_a_torn_one(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"type": "step", "step": 1}\n{"type": "st')
    tail = EventTail(path, 0)
    assert tail.read() == [{"type": "step", "step": 1}] and tail.read() == []
    tail.seal()  # the writer died mid-line: the next one starts on a fresh line
    with path.open("ab") as handle:
        handle.write(b'{"type": "resumed", "step": 1}\nnot json\n[1]\n')
    assert tail.read() == [{"type": "resumed", "step": 1}]
    assert tail.offset == path.stat().st_size


def test_the_estimate_follows_quantisation_checkpointing_and_rank(tmp_path: Path) -> None:
    facts = inspect_base_model(write_fake_model(tmp_path / "m"))
    assert facts.total_params == VOCAB * HIDDEN + HIDDEN + LAYERS * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * MLP + HIDDEN)
    assert facts.max_position_embeddings == 256 and len(facts.linear_modules) == LAYERS * 7

    def spec(**changes: object) -> JobSpec:
        hyper = Hyperparameters(seq_len=256, micro_batch_size=4, gradient_checkpointing=True)
        base = JobSpec(lora=LoraSettings(rank=8), quantization=QuantSettings("nf4", True, "float32"),
                       hyperparameters=hyper)  # fmt: skip
        for key, value in changes.items():
            target, name = key.split("__")
            setattr(getattr(base, target), name, value)
        return base

    # The planner's arithmetic (baton.planner.training): GPU semantics, where the 4-bit base is what stays resident.
    nf4 = estimate(facts, spec(), device="cuda")
    plain = estimate(facts, spec(quantization__method="none"), device="cuda")
    no_ckpt = estimate(facts, spec(hyperparameters__gradient_checkpointing=False), device="cuda")
    big_rank = estimate(facts, spec(lora__rank=64), device="cuda")
    assert nf4.vram_bytes < plain.vram_bytes and nf4.vram_bytes < big_rank.vram_bytes
    assert nf4.vram_bytes < no_ckpt.vram_bytes
    linear = LAYERS * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * MLP)
    dequantised = HIDDEN * MLP * 4 * 1.08  # the largest 4-bit layer dequantised for its matmul (+ allocator slack)
    assert plain.vram_bytes - nf4.vram_bytes == pytest.approx(
        linear * 4 - linear * (0.5 + 1 / 64 + 4 / (64 * 256)) - dequantised, rel=0.01
    )
    lora_params = 8 * LAYERS * (4 * (HIDDEN + HIDDEN) + 2 * (HIDDEN + MLP) + (MLP + HIDDEN))
    # weights, gradients (plus the allocator's 8 % on them) and AdamW's two moments: 4 + 4 x 1.08 + 8 B per param
    assert big_rank.vram_bytes - nf4.vram_bytes == pytest.approx((64 - 8) * lora_params // 8 * 16.32, rel=0.01)
    # On a CPU the same job has no CUDA context, and the quantised layers' source pages stay mapped.
    on_cpu = estimate(facts, spec(), device="cpu")
    assert on_cpu.ram_bytes > on_cpu.vram_bytes and on_cpu.disk_bytes > 0


def test_the_store_keeps_jobs_and_events_together(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    job = Job("job-1", JobSpec(name="x", tenant=TENANT), created_unix_s=1.0)
    event = JobEvent(1, "job-1", EventType.LOG, 2.0, JobState.QUEUED, job.progress, message="hi")
    job.last_seq = 1
    store.save(job, [event])
    with pytest.raises(sqlite3.IntegrityError):  # a seq is written once
        store.save(job, [event])
    assert store.get("job-1") == job and list(store.events_after("job-1", 0)) == [event]
    assert store.get("job-1").last_seq == 1  # type: ignore[union-attr]  # the failed transaction left nothing
    store.close()


async def test_errors_keep_the_baton_taxonomy(harness: Harness) -> None:
    core = await harness.start()
    with pytest.raises(BatonError) as caught:
        core.get("")
    assert caught.value.grpc_code.name == "NOT_FOUND"


def test_the_wire_format_keeps_unset_fields_unset_and_round_trips_a_resolved_spec(harness: Harness) -> None:
    from baton.v1 import trainer_pb2 as pb
    from services.trainer.servicer import job_to_proto, spec_from_proto
    from services.trainer.validation import resolve_spec

    request = pb.TrainerJobSpec(name="v", tenant=TENANT, base_model_path=str(harness.model),
                                jsonl=pb.JsonlDataset(path=str(harness.data / "good.jsonl")))  # fmt: skip
    request.hyperparameters.seed = 7
    request.hyperparameters.warmup_steps = 0  # set to zero is not unset
    request.gpu.preemptible = False
    spec = spec_from_proto(request)
    assert spec.lora.rank is None and spec.hyperparameters.learning_rate is None and spec.hot_load is None
    assert spec.hyperparameters.warmup_steps == 0 and spec.gpu.preemptible is False and spec.hyperparameters.seed == 7
    assert spec.quantization.method is None and spec.jsonl is not None and spec.jsonl.format == "auto"
    validation = ValidationContext("cpu", [harness.data.resolve()], harness.root / "c", harness.root / "t", 5, True)
    resolved = resolve_spec(spec, validation)
    wire = job_to_proto(Job("job-x", resolved.spec, estimate=resolved.estimate)).spec
    assert wire.lora.HasField("rank") and wire.lora.rank == 16 and wire.hyperparameters.learning_rate == 2e-4
    assert wire.quantization.method == pb.TRAINER_QUANT_METHOD_NONE and wire.hot_load is True  # CPU default
    assert wire.hyperparameters.lr_schedule == pb.TRAINER_LR_SCHEDULE_COSINE
    assert not wire.hyperparameters.HasField("max_steps") and wire.hyperparameters.epochs == 1.0
    assert wire.gpu.preemptible is False and wire.gpu.vram_bytes == resolved.estimate.vram_bytes
    assert spec_from_proto(wire) == resolved.spec  # what GetJob shows can be submitted again as it is


def test_quantization_and_length_defaults_follow_the_device() -> None:
    from services.trainer.validation import default_quantization

    gib = 1 << 30
    assert default_quantization("cuda", 135_000_000) == "nf4"  # QLoRA where VRAM is what it saves
    assert default_quantization("cpu", 135_000_000, memory_bytes=24 * gib) == "none"  # 0.5 GB of 24: plain LoRA
    assert default_quantization("cpu", 8_000_000_000, memory_bytes=24 * gib) == "nf4"  # 32 GB fp32 would not fit


async def test_a_gpu_job_gets_the_gpu_defaults(harness: Harness) -> None:
    from services.trainer.validation import ValidationContext, resolve_spec

    validation = ValidationContext("cuda", [harness.data.resolve()], harness.root / "c", harness.root / "t", 5, True)
    spec = harness.spec(steps=3)
    resolved = resolve_spec(spec, validation).spec
    assert resolved.quantization.method == "nf4" and resolved.quantization.compute_dtype == "bfloat16"
    assert resolved.hyperparameters.grad_accumulation_steps == 8
    assert resolved.hyperparameters.optimizer == "paged_adamw_8bit"
