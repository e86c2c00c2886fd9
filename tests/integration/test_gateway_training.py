"""Training, adapters and the GPU through the gateway, against real processes: a scheduler (the CPU poses as the
GPU), the embedder (MiniLM), the inference service (hf engine, the tiny Qwen3, holding a SERVING lease), the trainer
with its real training process (sharing BATON_HOME with the gateway, as under `baton up`), and two gateways — one
with gpu_policy=preempt, one with gpu_policy=queue.

The stack starts with the model awake and holding the GPU, so the first job can only train once the gateway's
arbiter has put the idle model to sleep (serving_idle_s=2): every job here exercises that hand-over.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from baton.models.tiny import CHAT_PROMPTS
from baton.runtime import errors
from tests.conftest import SchedulerHandle
from tests.fixtures.gateway import GatewayHandle
from tests.fixtures.inference import InferenceHandle
from tests.fixtures.trainer import TrainerHandle, author_text

pytestmark = pytest.mark.integration

JOB_TIMEOUT_S = 300.0
PHRASE = "amber foxes read maps"
# Small and quick: plain LoRA (no NF4) on 64-token blocks, 4 sequences a step.
FAST = {"quantization": "none", "seq_len": 64, "micro_batch_size": 4, "grad_accumulation_steps": 1,
        "learning_rate": 3e-3, "eval_fraction": 0.2, "seed": 1}  # fmt: skip


@dataclass
class TrainingStack:
    scheduler: SchedulerHandle
    inference: InferenceHandle
    trainer: TrainerHandle
    gateway: GatewayHandle
    queue_gateway: GatewayHandle
    base_model: str

    def openai(self, tenant: str, *, gateway: GatewayHandle | None = None) -> openai.OpenAI:
        gw = gateway or self.gateway
        return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key(tenant), max_retries=0)

    def logs(self) -> str:
        return f"--- trainer\n{self.trainer.log_tail()}\n--- inference\n{self.inference.log_tail()}"


@pytest.fixture(scope="module")
def stack(embedder_service, tiny_llm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainingStack]:
    home = tmp_path_factory.mktemp("g1-home")  # shared by the gateway and the trainer, as under `baton up`
    scheduler = SchedulerHandle(
        home=tmp_path_factory.mktemp("g1-scheduler"), extra_args=["--ttl-s", "3", "--yield-deadline-s", "30"]
    ).start()
    inference = InferenceHandle("hf", tmp_path_factory.mktemp("g1-inference"), tiny_llm, home / "adapters", scheduler)
    (home / "adapters").mkdir()
    started: list[object] = [scheduler]
    try:
        inference.start()
        started.append(inference)
        trainer = TrainerHandle(home, scheduler, ["--inference-addr", inference.target])
        trainer.start()
        started.append(trainer)
        wiring = ["--inference-addr", inference.target, "--trainer-addr", trainer.target]
        wiring += ["--scheduler-addr", scheduler.target, "--serving-idle-s", "2"]
        gateway = GatewayHandle(home, tmp_path_factory.mktemp("g1-allowed"), embedder_service.grpc_target, wiring)
        gateway.start()
        started.append(gateway)
        queue_args = [*wiring, "--gpu-policy", "queue", "--queue-max-wait-s", "1", "--serving-idle-s", "0"]
        queue_gateway = GatewayHandle(
            tmp_path_factory.mktemp("g1-queue-home"), tmp_path_factory.mktemp("g1-q"), embedder_service.grpc_target,
            queue_args,
        )  # fmt: skip
        queue_gateway.start()
        started.append(queue_gateway)
        yield TrainingStack(scheduler, inference, trainer, gateway, queue_gateway, tiny_llm.name)
    finally:
        for handle in reversed(started):
            handle.stop()  # type: ignore[attr-defined]


def new_tenant() -> str:
    return f"train-{uuid.uuid4().hex[:8]}"


def phrase_jsonl(path: Path) -> Path:
    """Chat lines teaching the model to answer every CHAT_PROMPTS entry with PHRASE."""
    lines = [
        json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": PHRASE}]})
        for p in CHAT_PROMPTS * 4
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def wait_job(stack: TrainingStack, tenant: str, job_id: str, predicate: object, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    with stack.gateway.client(tenant) as client:
        while True:
            job = client.training_job(job_id)
            if predicate(job):  # type: ignore[operator]
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} stuck in {job['state']}: {job.get('error')}\n{stack.logs()}")
            time.sleep(0.25)


def greedy(client: openai.OpenAI, model: str, prompt: str) -> str:
    completion = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0,
        extra_body={"baton": {"rag": False}},
    )  # fmt: skip
    return completion.choices[0].message.content or ""


# ------------------------------------------------------------------------------------------------ adapters


def test_a_trained_adapter_is_listed_served_and_changes_the_answer(stack: TrainingStack, tmp_path: Path) -> None:
    tenant, other = new_tenant(), new_tenant()
    chat = stack.openai(tenant)
    before = greedy(chat, stack.base_model, CHAT_PROMPTS[0])
    name = f"views-{tenant}"
    with stack.gateway.client(tenant) as client:
        job = client.submit_training(name, jsonl=phrase_jsonl(tmp_path / "phrase.jsonl"), format="messages",
                                     rank=8, max_steps=30, **FAST)  # fmt: skip
        assert job["state"] == "queued" and job["id"].startswith("job-")
        assert job["spec"]["jsonl"]["path"].startswith(str(stack.gateway.home / "training-data" / tenant))
        events = []
        done = client.wait_training(job["id"], on_event=events.append)
        assert done["state"] == "succeeded", f"{done.get('error')}\n{stack.logs()}"
        assert events[0]["type"] == "snapshot" and events[-1]["state"] == "succeeded"
        assert any(e["type"] == "step" and e["progress"]["step"] >= 1 for e in events)
        seqs = [e["seq"] for e in events if e["seq"]]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        adapter = done["adapter"]
        assert adapter["name"] == name and adapter["version"] == 1 and adapter["hot_loaded"] is True
        listed = client.adapters()["adapters"]
        assert [(a["name"], a["version"], a["served"]) for a in listed] == [(name, 1, True)]
        # Resuming a stream after an event replays only the later ones.
        replay = list(client.watch_training(job["id"], after_seq=seqs[-2]))
        assert [e["seq"] for e in replay] == [seqs[-1]]

    models = {m.id for m in chat.models.list()}
    assert name in models and stack.base_model in models
    after = greedy(chat, name, CHAT_PROMPTS[0])
    assert after != before, "chatting with the trained adapter must change the answer"

    with stack.gateway.client(other) as foreign:
        assert foreign.adapters()["adapters"] == []
        assert foreign.training_jobs()["jobs"] == []
        for call in (foreign.training_job, foreign.cancel_training, lambda i: list(foreign.watch_training(i))):
            with pytest.raises(errors.NotFound):
                call(job["id"])
        # The adapter is the tenant's: another tenant neither sees it nor chats with it, nor trains under its name.
        with pytest.raises(errors.AlreadyExists):
            foreign.submit_training(name, jsonl=phrase_jsonl(tmp_path / "theirs.jsonl"), format="messages", **FAST)
    foreign_chat = stack.openai(other)
    assert name not in {m.id for m in foreign_chat.models.list()}
    with pytest.raises(openai.NotFoundError):
        greedy(foreign_chat, name, CHAT_PROMPTS[0])


def test_a_job_trains_on_the_tenants_ingested_documents(stack: TrainingStack) -> None:
    tenant = new_tenant()
    with stack.gateway.client(tenant) as client:
        texts = [(f"note-{i}.txt", author_text(i, sentences=12)) for i in range(12)]
        client.upload_texts(texts, collection="notes")
        job = client.submit_training(f"docs-{tenant}", collections=["notes"], max_steps=3, hot_load=False, **FAST)
        done = wait_job(stack, tenant, job["id"], lambda j: j["terminal"], JOB_TIMEOUT_S)
        assert done["state"] == "succeeded", f"{done.get('error')}\n{stack.logs()}"
        assert done["dataset"]["documents"] == 12 and done["spec"]["documents"]["collections"] == ["notes"]
        # Another collection of this tenant holds nothing: the trainer says so, as a 422 from the gateway.
        with pytest.raises(errors.InvalidArgument):
            client.submit_training(f"none-{tenant}", collections=["empty"], validate_only=True, **FAST)


def test_cancel_and_the_errors_of_the_training_routes(stack: TrainingStack, tmp_path: Path) -> None:
    tenant = new_tenant()
    with stack.gateway.client(tenant) as client:
        job = client.submit_training(f"cancel-{tenant}", jsonl=phrase_jsonl(tmp_path / "p.jsonl"), max_steps=5000,
                                     **FAST)  # fmt: skip
        cancelled = client.cancel_training(job["id"])
        assert cancelled["state"] == "cancelled" or cancelled["cancel_requested"]
        done = wait_job(stack, tenant, job["id"], lambda j: j["terminal"], 120)
        assert done["state"] == "cancelled"
        with pytest.raises(errors.NotFound):
            client.training_job("job-does-not-exist")
        for bad in ({"name": "Bad Name!"}, {"name": "ok", "rank": 0}, {"name": "ok", "max_steps": -1}):
            response = httpx.post(
                f"{stack.gateway.url}/v1/training/jobs", json=bad, headers=stack.gateway.headers(tenant)
            )
            assert response.status_code == 422, response.text
        assert httpx.post(f"{stack.gateway.url}/v1/training/jobs", json={"name": "x"}).status_code == 401
        assert httpx.get(f"{stack.gateway.url}/v1/gpu").status_code == 401
        assert httpx.get(f"{stack.gateway.url}/v1/adapters").status_code == 401
        empty = httpx.post(
            f"{stack.gateway.url}/v1/training/jobs", files={"file": ("e.jsonl", b"")}, data={"name": "empty"},
            headers=stack.gateway.headers(tenant),
        )  # fmt: skip
        assert empty.status_code == 400, empty.text


# ------------------------------------------------------------------------------------------------ busy GPU


def test_busy_gpu_preempt_and_queue_policies(stack: TrainingStack, tmp_path: Path) -> None:
    tenant, other = new_tenant(), new_tenant()
    with stack.gateway.client(tenant) as client:
        job = client.submit_training(f"long-{tenant}", jsonl=phrase_jsonl(tmp_path / "p.jsonl"), max_steps=400,
                                     checkpoint_every_steps=0, **FAST)  # fmt: skip
        wait_job(stack, tenant, job["id"], lambda j: j["state"] == "running" and j["progress"].get("step", 0) >= 2,
                 JOB_TIMEOUT_S)  # fmt: skip
        gpu = client.gpu()
        (holder,) = gpu["holders"]
        assert holder["kind"] == "training" and holder["job_id"] == job["id"]
        assert gpu["policy"] == {"gpu_policy": "preempt", "queue_max_wait_s": 30.0, "chat_eta_s": 0.0}
    with stack.gateway.client(other) as foreign:
        (hidden,) = foreign.gpu()["holders"]
        assert hidden["kind"] == "training" and hidden["job_id"] is None and hidden["description"] == ""

    # queue: the chat must not take the GPU from training; past the 1 s limit it is a 503 with Retry-After + ETA.
    queued = httpx.post(
        f"{stack.queue_gateway.url}/v1/chat/completions",
        json={"model": stack.base_model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
              "baton": {"rag": False}},
        headers=stack.queue_gateway.headers(tenant), timeout=60,
    )  # fmt: skip
    assert queued.status_code == 503, queued.text
    assert int(queued.headers["Retry-After"]) >= 1
    body = queued.json()["error"]
    assert body["code"] == "gpu_busy" and float(body["details"]["eta_s"]) != 0
    assert body["details"]["holder_kind"] == "training"
    assert stack.queue_gateway.client(tenant).gpu()["policy"]["gpu_policy"] == "queue"
    with pytest.raises(openai.APIStatusError) as refused:
        stack.openai(tenant, gateway=stack.queue_gateway).chat.completions.create(
            model=stack.base_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    assert refused.value.status_code == 503

    # preempt: the chat wakes the model, training checkpoints and pauses, then resumes when the model idles.
    answer = greedy(stack.openai(tenant), stack.base_model, "hello")
    assert isinstance(answer, str)
    paused = wait_job(stack, tenant, job["id"], lambda j: j["progress"].get("preemptions", 0) >= 1, 60)
    assert paused["progress"]["preemptions"] >= 1
    resumed = wait_job(
        stack, tenant, job["id"], lambda j: j["state"] == "running" and j["progress"].get("resumes", 0) >= 1, 120
    )
    assert resumed["progress"]["resumes"] >= 1
    with stack.gateway.client(tenant) as client:
        client.cancel_training(job["id"])  # 400 steps is more than this test needs
        assert wait_job(stack, tenant, job["id"], lambda j: j["terminal"], 120)["state"] == "cancelled"
