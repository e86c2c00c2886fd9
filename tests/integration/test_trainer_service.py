"""The trainer service for real: a process on loopback driven over gRPC, training with the real training process
(services.trainer.worker: NF4 QLoRA on a tiny Qwen3 built from a config, on the CPU) under a TRAINING lease from a
real scheduler.

- a job goes QUEUED → … → SUCCEEDED and leaves adapters/<name>/1/ with weights, metadata and the loss plot;
- kill -9 of the service mid-job: the training process dies with it, the restarted service resumes the job from its
  last checkpoint, and the final adapter equals the uninterrupted run's (same spec and seed);
- a higher-priority lease request makes the job checkpoint and release within the scheduler's yield deadline; when
  the GPU is free again the job continues and finishes;
- bad input fails the call (INVALID_ARGUMENT with the reason) or the job (FAILED with the broken line numbers);
- a cancel during training leaves no version, no staging folder and no checkpoints behind;
- ``baton train FOLDER`` stages the texts, shows progress and the result; ``baton adapters`` lists the registry.

The module shares one scheduler and one trainer (tests/fixtures/trainer.py); each test submits its own job.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from baton.clients.trainer import TrainerClient, state_name
from baton.lease import LeaseClient, LeaseKind, LeaseRequest
from baton.runtime.errors import BatonError, InvalidArgument
from baton.v1 import trainer_pb2 as pb
from tests.conftest import REPO_ROOT
from tests.fixtures.trainer import TrainerStack, author_jsonl, wait_until

pytestmark = pytest.mark.integration

TENANT = "alice"
JOB_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def corpus(trainer_stack: TrainerStack) -> Path:
    return author_jsonl(trainer_stack.trainer.data / "author.jsonl", 24, seed=0)


@pytest.fixture
async def client(trainer_stack: TrainerStack) -> AsyncIterator[TrainerClient]:
    async with TrainerClient(trainer_stack.trainer.target) as trainer_client:
        yield trainer_client


def job_spec(stack: TrainerStack, dataset: Path, name: str, *, steps: int = 20, every: int = 5) -> pb.TrainerJobSpec:
    """20 steps of 4 sequences of 64 tokens, checkpoints every 5 — about 10 s of training here. NF4 asked for
    explicitly (a CPU's default is plain LoRA): the service's path for QLoRA, the GPU default, stays under test."""
    return pb.TrainerJobSpec(
        name=name,
        tenant=TENANT,
        base_model_path=str(stack.model),
        jsonl=pb.JsonlDataset(path=str(dataset)),
        lora=pb.TrainerLoraSettings(rank=8),
        quantization=pb.TrainerQuantizationSettings(method=pb.TRAINER_QUANT_METHOD_NF4),
        hyperparameters=pb.TrainerHyperparameters(
            seq_len=64,
            micro_batch_size=4,
            grad_accumulation_steps=1,
            max_steps=steps,
            checkpoint_every_steps=every,
            eval_fraction=0.2,
            learning_rate=3e-3,
            seed=1,
        ),
    )


async def wait_for(
    client: TrainerClient, job_id: str, predicate: object, timeout_s: float, stack: TrainerStack
) -> pb.TrainerJob:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            job = await client.get(job_id, tenant=TENANT)
        except BatonError:  # the service is restarting
            job = None
        if job is not None and predicate(job):  # type: ignore[operator]
            return job
        if time.monotonic() > deadline:
            where = f"{state_name(job.state)} at step {job.progress.step}" if job else "unreachable"
            raise TimeoutError(f"job {job_id}: {where}\n{stack.trainer.log_tail()}")
        await asyncio.sleep(0.1)


async def finished(client: TrainerClient, job_id: str, stack: TrainerStack) -> pb.TrainerJob:
    return await wait_for(client, job_id, lambda j: j.state in TERMINAL, JOB_TIMEOUT_S, stack)


TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


def adapter_tensors(folder: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def worker_pids(job_dir: Path) -> list[int]:
    """Processes whose command line names the job folder (its training process)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(job_dir).encode() in (proc / "cmdline").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


# ---------------------------------------------------------------------------------------------------- success


async def test_a_job_trains_and_registers_its_adapter(
    trainer_stack: TrainerStack, client: TrainerClient, corpus: Path
) -> None:
    job = await client.submit(job_spec(trainer_stack, corpus, "author"), request_id="success-1")
    assert (await client.submit(job_spec(trainer_stack, corpus, "author"), request_id="success-1")).job_id == job.job_id
    assert job.spec.hyperparameters.optimizer == "adamw_torch" and job.estimate.vram_bytes > 0
    events = [event async for event in client.watch(job.job_id, tenant=TENANT)]
    done = await client.get(job.job_id, tenant=TENANT)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    states = [state_name(e.state) for e in events if e.type == pb.JOB_EVENT_TYPE_STATE_CHANGED]
    assert states[-4:] == ["waiting_for_gpu", "running", "finalizing", "succeeded"]
    steps = [e.progress.step for e in events if e.type == pb.JOB_EVENT_TYPE_STEP]
    assert steps == list(range(1, 21))
    assert [e.checkpoint.step for e in events if e.type == pb.JOB_EVENT_TYPE_CHECKPOINT_SAVED] == [5, 10, 15, 20]

    adapter = done.adapter
    folder = trainer_stack.trainer.adapters / "author" / "1"
    assert (adapter.name, adapter.version, Path(adapter.path)) == ("author", 1, folder)
    for name in ("adapter_config.json", "adapter_model.safetensors", "baton-adapter.json", "registry.json"):
        assert (folder / name).is_file(), name
    assert (folder / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and adapter.loss_plot_path
    metadata = json.loads((folder / "baton-adapter.json").read_text())
    assert metadata["base_model_hash"] == adapter.base_model_hash and len(adapter.base_model_hash) == 64
    assert adapter.data_hash == done.dataset.data_hash and adapter.steps == 20 and adapter.tokens_seen > 0
    assert adapter.eval_loss_after < adapter.eval_loss_before  # it learned something about the author
    assert adapter.hot_load_error.startswith("no inference service")
    assert done.dataset.documents == 24 and done.dataset.eval_documents == 5 and done.progress.total_steps == 20

    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"http://127.0.0.1:{trainer_stack.trainer.metrics_port}/metrics")).text
    assert 'baton_trainer_jobs{state="succeeded"} 1.0' in metrics
    assert 'baton_trainer_checkpoints_total{reason="final"} 1.0' in metrics


# ---------------------------------------------------------------------------------------------------- kill -9


async def test_kill_9_of_the_service_mid_job_resumes_from_the_last_checkpoint(
    trainer_stack: TrainerStack, client: TrainerClient, corpus: Path
) -> None:
    reference = trainer_stack.trainer.adapters / "author" / "1"
    if not reference.is_dir():
        pytest.fail("needs the uninterrupted run of test_a_job_trains_and_registers_its_adapter (run the module)")
    trainer = trainer_stack.trainer
    job = await client.submit(job_spec(trainer_stack, corpus, "author-killed"))
    await wait_for(client, job.job_id, lambda j: j.last_checkpoint.step >= 10 and j.progress.step >= 12,
                   JOB_TIMEOUT_S, trainer_stack)  # fmt: skip
    job_dir = trainer.home / "trainer" / "jobs" / job.job_id
    assert worker_pids(job_dir)
    trainer.kill()
    # PR_SET_PDEATHSIG: the kernel kills the training process with its service.
    await asyncio.to_thread(wait_until, lambda: not worker_pids(job_dir), 10, "the training process's death")

    trainer.restart()
    async with TrainerClient(trainer.target) as fresh:
        done = await finished(fresh, job.job_id, trainer_stack)
        events = [e async for e in fresh.watch(job.job_id, tenant=TENANT, after_seq=1)]
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert done.progress.resumes >= 1
    resumed = [e.message for e in events if e.message.startswith("resumed from step")]
    assert resumed and int(resumed[0].split()[3]) >= 10, resumed
    ours, theirs = adapter_tensors(Path(done.adapter.path)), adapter_tensors(reference)
    assert ours.keys() == theirs.keys()
    import torch

    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------- yield


async def test_a_yield_request_checkpoints_releases_and_the_job_continues(
    trainer_stack: TrainerStack, client: TrainerClient, corpus: Path
) -> None:
    job = await client.submit(job_spec(trainer_stack, corpus, "author-yield", steps=40, every=100))
    running = await wait_for(client, job.job_id, lambda j: j.progress.step >= 3, JOB_TIMEOUT_S, trainer_stack)
    assert running.lease_epoch > 0
    chat = LeaseRequest("test/chat", LeaseKind.SERVING, vram_bytes=1 << 30, priority=50)
    async with LeaseClient(trainer_stack.scheduler.target) as leases:
        asked = time.monotonic()
        lease = await asyncio.wait_for(leases.acquire(chat), 20)  # the scheduler's yield deadline
        handover_s = time.monotonic() - asked
        paused = await client.get(job.job_id, tenant=TENANT)
        assert paused.state == pb.JOB_STATE_PAUSED, state_name(paused.state)
        assert paused.last_checkpoint.reason == pb.CHECKPOINT_REASON_YIELD and paused.progress.preemptions == 1
        assert paused.lease_epoch == 0
        await wait_for(client, job.job_id, lambda j: j.queue_position == 1, 5, trainer_stack)  # queued for the GPU
        await asyncio.sleep(1.0)
        assert (await client.get(job.job_id, tenant=TENANT)).progress.step == paused.progress.step  # no GPU, no work
        await lease.release()
    done = await finished(client, job.job_id, trainer_stack)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert done.progress.resumes >= 1 and done.adapter.steps == 40
    print(f"yield: lease handed over {handover_s:.2f} s after the request")


# ---------------------------------------------------------------------------------------------------- bad input


async def test_bad_input_is_refused_or_fails_the_job_with_what_to_fix(
    trainer_stack: TrainerStack, client: TrainerClient, corpus: Path
) -> None:
    data = trainer_stack.trainer.data

    async def refused(spec: pb.TrainerJobSpec, reason: str) -> InvalidArgument:
        with pytest.raises(InvalidArgument) as caught:
            await client.submit(spec)
        assert caught.value.reason == reason, caught.value.message
        return caught.value

    missing = job_spec(trainer_stack, corpus, "bad")
    missing.base_model_path = str(trainer_stack.model.parent / "no-such-model")
    assert "no such folder" in (await refused(missing, "BASE_MODEL_MISSING")).message
    too_long = job_spec(trainer_stack, corpus, "bad")
    too_long.hyperparameters.seq_len = 4096
    assert "at most 1024" in (await refused(too_long, "SEQ_LEN_TOO_LONG")).message
    unknown = job_spec(trainer_stack, corpus, "bad")
    unknown.lora.target_modules.extend(["q_proj", "attn.c_proj"])
    error = await refused(unknown, "UNKNOWN_TARGET_MODULES")
    assert error.metadata["unknown"] == "attn.c_proj" and "q_proj" in error.metadata["linear_modules"].split(",")
    empty_file = data / "empty.jsonl"
    empty_file.write_text("\n")
    await refused(job_spec(trainer_stack, empty_file, "bad"), "EMPTY_DATASET")
    outside = job_spec(trainer_stack, corpus, "bad")
    outside.jsonl.path = str(trainer_stack.model / "config.json")
    await refused(outside, "DATASET_PATH_INVALID")

    broken = data / "broken.jsonl"
    lines = [json.dumps({"text": "Брыздень шмуркает."}, ensure_ascii=False)] * 6
    lines[1], lines[4] = '{"text": "unterminated', '{"messages": "not a list"}'
    broken.write_text("\n".join(lines) + "\n", encoding="utf-8")
    error = await refused_validate(client, job_spec(trainer_stack, broken, "bad"))
    assert error.reason == "BAD_JSONL" and error.metadata["lines"] == "2,5" and "line 2" in error.message
    blank = data / "blank-texts.jsonl"
    blank.write_text('{"text": ""}\n{"text": "   "}\n')
    jobs = [await client.submit(job_spec(trainer_stack, path, "bad")) for path in (broken, blank)]
    broken_job, blank_job = [await finished(client, j.job_id, trainer_stack) for j in jobs]
    assert broken_job.state == pb.JOB_STATE_FAILED and broken_job.error.reason == "BAD_JSONL"
    assert broken_job.error.metadata["lines"] == "2,5" and "line 5" in broken_job.error.message
    assert blank_job.state == pb.JOB_STATE_FAILED and blank_job.error.reason == "EMPTY_DATASET"
    assert not (trainer_stack.trainer.adapters / "bad").exists()


async def refused_validate(client: TrainerClient, spec: pb.TrainerJobSpec) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        await client.submit(spec, validate_only=True)
    return caught.value


# ---------------------------------------------------------------------------------------------------- cancel


async def test_cancel_during_training_leaves_the_registry_consistent(
    trainer_stack: TrainerStack, client: TrainerClient, corpus: Path
) -> None:
    job = await client.submit(job_spec(trainer_stack, corpus, "author-cancelled", steps=200, every=2))
    await wait_for(client, job.job_id, lambda j: j.last_checkpoint.step >= 2, JOB_TIMEOUT_S, trainer_stack)
    job_dir = trainer_stack.trainer.home / "trainer" / "jobs" / job.job_id
    cancelled = await client.cancel(job.job_id, tenant=TENANT)
    assert cancelled.state == pb.JOB_STATE_CANCELLED and cancelled.cancel_requested
    assert not worker_pids(job_dir) and not (job_dir / "checkpoints").exists()
    name_folder = trainer_stack.trainer.adapters / "author-cancelled"
    assert not name_folder.exists() or not any(name_folder.iterdir())
    async with LeaseClient(trainer_stack.scheduler.target) as leases:
        state = await leases.gpu_state()
    assert not [h for h in state.holders if h.holder_id.startswith(f"trainer/{job.job_id}")]
    with pytest.raises(BatonError) as caught:
        await client.get(job.job_id, tenant="mallory")
    assert caught.value.reason == "JOB_NOT_FOUND"
    listed = await client.list(tenant=TENANT, states=[pb.JOB_STATE_CANCELLED])
    assert [j.job_id for j in listed.jobs] == [job.job_id]


# ---------------------------------------------------------------------------------------------------- the CLI


async def test_baton_train_a_folder_then_baton_adapters(trainer_stack: TrainerStack, tmp_path: Path) -> None:
    from tests.fixtures.trainer import author_text

    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    for index in range(10):
        (folder / ("sub" if index % 2 else "") / f"note-{index}.md").write_text(author_text(100 + index))
    (folder / "ignored.pdf").write_bytes(b"%PDF")
    env = {
        **os.environ,
        "BATON_HOME": str(trainer_stack.trainer.home),
        "BATON_TRAINER_ADDR": trainer_stack.trainer.target,
    }
    command = [sys.executable, "-m", "baton.cli.main", "train", str(folder), "--name", "cli-views", "--base-model",
               str(trainer_stack.model), "--steps", "6", "--seq-len", "64", "--batch", "4", "--grad-accum", "1",
               "--eval-fraction", "0.2", "--checkpoint-every", "3", "--no-hot-load"]  # fmt: skip
    trained = await asyncio.to_thread(
        subprocess.run, command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S
    )
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert "data: 10 documents from 10 files" in trained.stdout
    assert "adapter cli-views version 1:" in trained.stdout and "eval perplexity" in trained.stdout
    assert "6/6" in trained.stderr  # the progress bar reached the end
    listed = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "baton.cli.main", "adapters"], cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    names = [line.split()[0] for line in listed.stdout.splitlines()[1:]]
    assert "cli-views" in names and "author" in names, listed.stdout


# ---------------------------------------------------------------------------------------------------- hot-load


async def test_a_finished_adapter_is_hot_loaded_into_inference(
    trainer_stack: TrainerStack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A second trainer, without a lease, next to an hf inference service that shares its adapter registry."""
    from baton.clients.inference import InferenceClient
    from tests.fixtures.inference import InferenceHandle
    from tests.fixtures.trainer import TrainerHandle

    registry = tmp_path_factory.mktemp("shared-adapters")
    inference = InferenceHandle("hf", tmp_path_factory.mktemp("hot-inference"), trainer_stack.model, registry, None)
    trainer = TrainerHandle(tmp_path_factory.mktemp("hot-trainer"), None)
    trainer.extra_args = ["--adapter-root", str(registry), "--inference-addr", inference.target]
    try:
        await asyncio.to_thread(inference.start)  # it runs its own event loop while it waits for the engine
        trainer.start()
        dataset = author_jsonl(trainer.data / "author.jsonl", 12, seed=3)
        async with TrainerClient(trainer.target) as client, InferenceClient(inference.target) as served:
            job = await client.submit(job_spec(trainer_stack, dataset, "hot", steps=4, every=2))
            done = await client.wait(job.job_id, tenant=TENANT, timeout_s=JOB_TIMEOUT_S)
            assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
            assert done.adapter.hot_loaded and not done.adapter.hot_load_error
            assert done.lease_epoch == 0 and Path(done.adapter.path) == registry / "hot" / "1"
            loaded = {adapter.name: adapter for adapter in await served.list_adapters()}
            assert "hot" in loaded, loaded
            answer = await served.complete(chat=[("user", "Привет!")], adapter="hot", temperature=0.0, max_tokens=4)
            assert answer.token_ids
    finally:
        trainer.stop()
        inference.stop()
