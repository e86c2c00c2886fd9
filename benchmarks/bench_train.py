"""The trainer's training loop against a plain ``transformers.Trainer`` + PEFT run: tokens/s and peak memory.

One run builds a tiny Qwen3 with the kit (``baton.models.tiny``, hidden 128, 4 layers, ~1M parameters) and a
generated corpus (one made-up author's sentences, JSONL ``{"text"}`` lines) in a temporary folder, then trains
the same LoRA (rank, alpha, dropout, targets: every attention and MLP projection) on the same packed blocks
(--seq-len, --batch sequences per micro-batch, --accumulation micro-batches per step, --steps optimizer steps,
AdamW, cosine schedule with warm-up, gradient checkpointing, float32) in three configurations:

- ``hf`` — the baseline: ``transformers.Trainer`` on a ``peft`` LoRA model, written the way its documentation
  writes it. It trains on the very blocks our dataset builder makes (``services.trainer.dataset``), so the
  tokenisation and packing are not part of the comparison, only the loop.
- ``lora`` — ours, plain LoRA: ``python -m services.trainer.worker JOB_DIR`` with a spec.json (quantization none),
  exactly the process the trainer service starts.
- ``qlora`` — ours, QLoRA: the same with the base in 4-bit NF4 (bitsandbytes, double quantisation, float32
  compute on the CPU), as the service runs it by default.

Every configuration runs in a child process of its own (started fresh, so imports and allocator state never carry
over from another configuration) and reports its steps in the worker contract's ``events.jsonl`` format; the
baseline child writes the same ``step`` events from a ``TrainerCallback``. Figures:

- tokens/s: tokens (attention-mask ones) of steps 2..N divided by the wall time from the end of step 1 to the end
  of step N. Step 1 is left out: it carries one-off costs (lazy kernel set-up, the first allocation of every
  buffer). The window holds all the per-step work of each loop — batching, forward, backward, optimizer, the
  scheduler and the per-step loss report — and nothing else (no evaluation: eval_fraction 0; no periodic
  checkpoint).
- tokens/CPU-s: the same tokens over the child's CPU seconds in the same window (sampled from /proc/<pid>/stat
  whenever a step event appears, every 20 ms). The 2-core machines here are shared: when other processes take
  the cores, wall time stretches and CPU time mostly does not, so with one thread this is the steadier figure.
- peak RSS: the child's ``ru_maxrss`` from ``os.wait4`` on that child alone — the whole process life: imports,
  model load, quantisation, training and (ours) writing the final adapter, checkpoint and loss plot.
- wall: child start → exit (imports, model load, dataset, training, output), for scale.
- the loss of step 1 and of step N, to show that the three runs train alike (the data order differs: each loop
  shuffles with its own generator; ours warms up from lr/(w+1), the Trainer from 0).

Ratios are each configuration / the baseline of the same repeat; the configurations of a repeat run one after
another in an order that rotates between repeats, and the table shows medians over --repeat. Torch threads:
--threads (default 1) for every child through ``OMP_NUM_THREADS``: at this model size a second thread gains
little, and on a loaded 2-core machine it only spins (measured: the same run 2-4x slower with 2 threads while
other tests ran). The defaults take about 3-4 minutes of a quiet 2-core machine; the load average is printed.

    .venv/bin/python benchmarks/bench_train.py [--steps 12] [--repeat 3] [--seq-len 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
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

from benchmarks.common import median, print_table

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
BASELINE = "hf"
CHILD_TIMEOUT_S = 900.0
POLL_S = 0.02  # how often a running child's events and CPU time are looked at
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Config:
    """One column of the comparison: which loop trains, and whether the base is 4-bit."""

    name: str
    loop: str  # "ours" (the worker) | "hf" (transformers.Trainer)
    quantization: str  # "none" | "nf4"
    label: str


CONFIGS = {
    "hf": Config("hf", "hf", "none", "HF Trainer + PEFT LoRA (baseline)"),
    "hf-qlora": Config("hf-qlora", "hf", "nf4", "HF Trainer + PEFT QLoRA (NF4)"),
    "lora": Config("lora", "ours", "none", "ours, LoRA"),
    "qlora": Config("qlora", "ours", "nf4", "ours, QLoRA (NF4)"),
}
DENSE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------------------ the data

# One made-up author: invented words and fixed turns of phrase, so the LoRA has something to learn.
_WORDS = {
    "subj": ["the old glimmerwick", "Captain Purslane", "my copper fennet", "a sleepy droverkin", "Aunt Quillory"],
    "verb": ["trundles", "hums", "skitters", "wobbles", "ponders", "clatters"],
    "place": ["by the crooked bridge", "under the lantern oak", "in the fennet woods", "past the quiet mill"],
    "adv": ["softly", "sideways", "before the kettle sings", "with great ceremony", "for no reason at all"],
    "obj": ["a brass teapot", "the last marmalade", "an old song", "three buttons", "a folded map"],
}
_TEMPLATES = (
    "{subj} {verb} {place}, and nobody knows why.",
    "Ah, {subj} {verb} {adv} again, as if looking for {obj}.",
    "{subj}, I tell you, {verb} {place}, and it is wonderful.",
    "When {subj} {verb} {adv}, the whole world smells of {obj}.",
    "Still {subj} {verb} {place}, never letting go of {obj}.",
)


def write_corpus(path: Path, *, documents: int, sentences: int, seed: int) -> Path:
    """JSONL ``{"text"}`` lines of generated prose, deterministic for a seed."""
    rng = random.Random(seed)
    lines = []
    for _ in range(documents):
        text = " ".join(
            rng.choice(_TEMPLATES).format(**{key: rng.choice(options) for key, options in _WORDS.items()})
            for _ in range(sentences)
        )
        lines.append(json.dumps({"text": text}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def job_spec(
    model: Path,
    corpus: Path,
    *,
    quantization: str,
    device: str,
    compute_dtype: str,
    targets: Sequence[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """A resolved spec.json (the parent/child contract), every field filled: what both loops read."""
    return {
        "job_id": "bench",
        "name": "bench",
        "base_model_path": str(model),
        "dataset": {"kind": "jsonl", "path": str(corpus), "format": "text", "train_on_prompt": False},
        "lora": {"rank": args.rank, "alpha": 2.0 * args.rank, "dropout": 0.05, "target_modules": list(targets),
                 "target_experts": False, "train_router": False, "use_rslora": False},
        "quantization": {"method": quantization, "double_quant": True, "compute_dtype": compute_dtype},
        "hyper": {
            "learning_rate": 2e-4, "warmup_ratio": 0.1, "warmup_steps": None, "lr_schedule": "cosine",
            "seq_len": args.seq_len, "micro_batch_size": args.batch, "grad_accumulation_steps": args.accumulation,
            "max_steps": args.steps, "epochs": None, "eval_fraction": 0.0, "eval_every_steps": 0,
            "checkpoint_every_steps": 0, "keep_checkpoints": 1, "seed": 0,
            "gradient_checkpointing": args.gradient_checkpointing == "on", "optimizer": "adamw_torch",
            "weight_decay": 0.0, "max_grad_norm": 1.0,
        },
        "device": device,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ the children


@dataclass
class ChildResult:
    """What one child process reported (its step events) and what the kernel says it cost."""

    config: str
    exit_code: int
    peak_rss_bytes: int
    wall_s: float
    steps: list[dict[str, Any]]
    log: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and len(self.steps) >= 2

    @property
    def tokens_per_s(self) -> float:
        """Steps 2..N: tokens over the time from the end of step 1 to the end of step N."""
        first, last = self.steps[0], self.steps[-1]
        seconds = last["time_unix_s"] - first["time_unix_s"]
        return (last["tokens_seen"] - first["tokens_seen"]) / seconds if seconds > 0 else float("nan")

    @property
    def tokens_per_cpu_s(self) -> float:
        """The same window over the child's CPU seconds: what contention from other processes does not inflate."""
        first, last = self.steps[0], self.steps[-1]
        seconds = last["cpu_s"] - first["cpu_s"]
        return (last["tokens_seen"] - first["tokens_seen"]) / seconds if seconds > 0 else float("nan")

    @property
    def step_s(self) -> float:
        first, last = self.steps[0], self.steps[-1]
        return (last["time_unix_s"] - first["time_unix_s"]) / max(1, len(self.steps) - 1)

    @property
    def peak_device_bytes(self) -> int:
        """The loop's own peak as its step events report it (torch.cuda.max_memory_allocated on a GPU)."""
        return max(int(step.get("peak_memory_bytes") or 0) for step in self.steps)


def run_child(config: str, command: list[str], job_dir: Path, env: dict[str, str], timeout_s: float) -> ChildResult:
    """Start ``command`` and wait for exactly that child with ``os.wait4`` (its own rusage, not all children's).

    While it runs, the child's CPU time is sampled from /proc each time a new ``step`` event appears in its
    events.jsonl, so every step event gets a ``cpu_s`` beside its wall-clock ``time_unix_s``.
    """
    log_path = job_dir / "child.log"
    events = EventTail(job_dir / "events.jsonl")
    cpu_at_step: dict[int, float] = {}
    started = time.perf_counter()
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while True:
        for step in events.new_steps():
            cpu_at_step[step] = process_cpu_s(process.pid)
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            process.kill()
            pid, status, usage = os.wait4(process.pid, 0)
            break
        time.sleep(POLL_S)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    wall = time.perf_counter() - started
    steps = read_steps(job_dir / "events.jsonl")
    for step in steps:
        step["cpu_s"] = cpu_at_step.get(step["step"], float("nan"))  # nan: the child ended before we saw it
    return ChildResult(
        config,
        process.returncode,
        usage.ru_maxrss * 1024,  # Linux reports KiB
        wall,
        steps,
        log_path.read_text(encoding="utf-8", errors="replace"),
    )


class EventTail:
    """The step numbers of complete ``step`` lines appended to events.jsonl since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new_steps(self) -> list[int]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next call
        self.offset += len(complete)
        steps = []
        for line in complete.splitlines():
            if b'"step"' in line:
                event = json.loads(line)
                if event.get("type") == "step":
                    steps.append(int(event["step"]))
        return steps


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc; fields 14 and 15 of its stat line)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 onwards
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def read_steps(path: Path) -> list[dict[str, Any]]:
    steps = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a truncated last line of a killed child
            if event.get("type") == "step":
                steps.append(event)
    return steps


def child_env(threads: int, extra_path: str = "") -> dict[str, str]:
    path = os.pathsep.join(p for p in (extra_path, str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }


def prepare_job(root: Path, name: str, spec: dict[str, Any]) -> Path:
    """A fresh job folder holding spec.json, as the service prepares one."""
    folder = root / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return folder


# ------------------------------------------------------------------------------------- the baseline (a child)


def run_hf_baseline(job_dir: Path) -> int:
    """Train the spec's LoRA with ``transformers.Trainer`` on our dataset builder's blocks; write step events.

    Imports the dataset builder only for the blocks; everything that trains is transformers + peft, configured
    from the spec the way their documentation does it (QLoRA: BitsAndBytesConfig + prepare_model_for_kbit_training).
    """
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from services.trainer.dataset import build_dataset, load_tokenizer, model_max_positions, source_from_spec

    spec = json.loads((job_dir / "spec.json").read_text(encoding="utf-8"))
    hyper, lora, quant = spec["hyper"], spec["lora"], spec["quantization"]
    model_path = Path(spec["base_model_path"])
    data = build_dataset(
        source_from_spec(spec["dataset"]),
        load_tokenizer(model_path),
        seq_len=hyper["seq_len"],
        eval_fraction=hyper["eval_fraction"],
        seed=hyper["seed"],
        max_positions=model_max_positions(model_path),
    )
    cuda = spec["device"] == "cuda"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[quant["compute_dtype"]]
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    kwargs: dict[str, Any] = {"local_files_only": True, **dtype_kwarg(dtype)}
    if quant["method"] == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=quant["double_quant"],
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
    if quant["method"] != "nf4":
        model.to(device)
    model.config.use_cache = False
    gc_kwargs = {"use_reentrant": False}
    if quant["method"] == "nf4":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=hyper["gradient_checkpointing"],
            gradient_checkpointing_kwargs=gc_kwargs,
        )
    torch.manual_seed(hyper["seed"])
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora["rank"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=list(lora["target_modules"]),
            task_type="CAUSAL_LM",
        ),
    )
    blocks = [{"input_ids": block.input_ids, "labels": block.labels} for block in data.train]
    events = (job_dir / "events.jsonl").open("a", encoding="utf-8")

    class StepEvents(TrainerCallback):
        """One ``step`` event per optimizer step, in the worker's format, when the step's loss is logged."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                event = {
                    "type": "step",
                    "step": state.global_step,
                    "loss": float(logs["loss"]),
                    "tokens_seen": int(state.num_input_tokens_seen),
                    "peak_memory_bytes": peak_memory_bytes(device),
                    "time_unix_s": time.time(),
                }
                events.write(json.dumps(event) + "\n")
                events.flush()

    arguments = TrainingArguments(
        output_dir=str(job_dir / "hf-output"),
        per_device_train_batch_size=hyper["micro_batch_size"],
        gradient_accumulation_steps=hyper["grad_accumulation_steps"],
        max_steps=hyper["max_steps"],
        learning_rate=hyper["learning_rate"],
        lr_scheduler_type=hyper["lr_schedule"],
        warmup_steps=_warmup_steps(hyper),
        weight_decay=hyper["weight_decay"],
        max_grad_norm=hyper["max_grad_norm"],
        optim="adamw_torch",  # ours runs torch's AdamW too (transformers 5 would pick the fused one by default)
        gradient_checkpointing=hyper["gradient_checkpointing"],
        gradient_checkpointing_kwargs=gc_kwargs,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not cuda,
        seed=hyper["seed"],
        logging_steps=1,  # ours reports every step's loss too
        include_num_input_tokens_seen="non_padding",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=blocks,
        data_collator=PadCollator(data.pad_token_id),
        callbacks=[StepEvents()],
    )
    trainer.train()
    events.close()
    return 0


class PadCollator:
    """Right-pad a micro-batch to its longest block, like ours: pad tokens get attention 0 and label -100."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(row["input_ids"]) for row in rows)
        padded = [(row, width - len(row["input_ids"])) for row in rows]
        return {
            "input_ids": torch.tensor([row["input_ids"] + [self.pad] * n for row, n in padded]),
            "labels": torch.tensor([row["labels"] + [-100] * n for row, n in padded]),
            "attention_mask": torch.tensor([[1] * (width - n) + [0] * n for _, n in padded]),
        }


def _warmup_steps(hyper: dict[str, Any]) -> int:
    """The same warm-up length ours derives from warmup_ratio (ceil(ratio x steps))."""
    import math

    if hyper.get("warmup_steps") is not None:
        return int(hyper["warmup_steps"])
    return min(hyper["max_steps"], math.ceil(hyper["warmup_ratio"] * hyper["max_steps"]))


def peak_memory_bytes(device: Any) -> int:
    """torch's peak allocation on a GPU; the process's peak RSS on the CPU — what our loop reports."""
    import resource

    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56; a GPU image may have either."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


# ----------------------------------------------------------------------------------------------- the comparison


@dataclass
class Summary:
    """Medians over the repeats of one configuration, and its ratios against the baseline of the same repeat."""

    config: Config
    runs: list[ChildResult] = field(default_factory=list)
    tps_ratio: list[float] = field(default_factory=list)
    cpu_ratio: list[float] = field(default_factory=list)
    rss_ratio: list[float] = field(default_factory=list)
    device_ratio: list[float] = field(default_factory=list)

    def ok_runs(self) -> list[ChildResult]:
        return [run for run in self.runs if run.ok]

    def med(self, attribute: str) -> float:
        values = [float(getattr(run, attribute)) for run in self.ok_runs()]
        return median(values) if values else float("nan")

    def loss(self, index: int) -> float:
        values = [run.steps[index]["loss"] for run in self.ok_runs()]
        return median(values) if values else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.name,
            "label": self.config.label,
            "runs_ok": len(self.ok_runs()),
            "runs": len(self.runs),
            "tokens_per_s": self.med("tokens_per_s"),
            "tokens_per_s_vs_baseline": median(self.tps_ratio) if self.tps_ratio else None,
            "tokens_per_cpu_s": self.med("tokens_per_cpu_s"),
            "tokens_per_cpu_s_vs_baseline": median(self.cpu_ratio) if self.cpu_ratio else None,
            "step_s": self.med("step_s"),
            "peak_rss_bytes": self.med("peak_rss_bytes"),
            "peak_rss_vs_baseline": median(self.rss_ratio) if self.rss_ratio else None,
            "peak_device_bytes": self.med("peak_device_bytes"),
            "peak_device_vs_baseline": median(self.device_ratio) if self.device_ratio else None,
            "wall_s": self.med("wall_s"),
            "loss_first": self.loss(0),
            "loss_last": self.loss(-1),
        }


def pair_with_baseline(summaries: dict[str, Summary], baseline: str, repeat: int) -> None:
    """Ratios of each configuration's repeat ``repeat`` to the baseline's run of the same repeat."""
    base = summaries[baseline].runs[repeat] if len(summaries[baseline].runs) > repeat else None
    if base is None or not base.ok:
        return
    for summary in summaries.values():
        run = summary.runs[repeat] if len(summary.runs) > repeat else None
        if run is None or not run.ok:
            continue
        summary.tps_ratio.append(run.tokens_per_s / base.tokens_per_s)
        summary.cpu_ratio.append(run.tokens_per_cpu_s / base.tokens_per_cpu_s)
        summary.rss_ratio.append(run.peak_rss_bytes / base.peak_rss_bytes)
        if base.peak_device_bytes:
            summary.device_ratio.append(run.peak_device_bytes / base.peak_device_bytes)


def rotated(names: Sequence[str], repeat: int) -> list[str]:
    """The configurations in an order that moves by one each repeat: no configuration always runs first."""
    shift = repeat % len(names)
    return [*names[shift:], *names[:shift]]


def report_failures(summaries: dict[str, Summary]) -> None:
    for summary in summaries.values():
        for run in summary.runs:
            if not run.ok:
                tail = "\n    ".join(run.log.strip().splitlines()[-15:])
                print(f"\n{run.config}: exit {run.exit_code}, {len(run.steps)} step events; log tail:\n    {tail}")


def run_all(args: argparse.Namespace, root: Path) -> dict[str, Summary]:
    started = time.perf_counter()
    model = bench_model(args.model, root, args.seq_len)
    corpus = write_corpus(root / "corpus.jsonl", documents=args.documents, sentences=8, seed=0)
    print(f"model and corpus ready in {time.perf_counter() - started:.1f} s ({root})", flush=True)
    names = list(args.configs)
    summaries = {name: Summary(CONFIGS[name]) for name in names}
    env = child_env(args.threads)
    for repeat in range(args.repeat):
        for name in rotated(names, repeat):
            config = CONFIGS[name]
            spec = job_spec(
                model,
                corpus,
                quantization=config.quantization,
                device="cpu",
                compute_dtype="float32",
                targets=DENSE_TARGETS,
                args=args,
            )
            job_dir = prepare_job(root / "jobs", f"{name}-{repeat}", spec)
            result = run_child(name, child_command(config, job_dir), job_dir, env, CHILD_TIMEOUT_S)
            summaries[name].runs.append(result)
            print(progress_line(result, repeat), flush=True)
        pair_with_baseline(summaries, BASELINE, repeat)
    return summaries


def bench_model(name: str, root: Path, seq_len: int) -> Path:
    """The tiny random Qwen3 (built here), or a real pretrained model from baton's catalogue (prepared once into
    BATON_MODELS_DIR, the cache ``make models`` fills)."""
    if name != "tiny":
        from baton.models.pretrained import models_dir, prepare

        return prepare(name, models_dir(REPO_ROOT / "var"))
    from baton.models.tiny import build_tiny_model

    return build_tiny_model(
        root / "tiny-qwen3",
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=384,
        max_position_embeddings=max(1024, seq_len),
    )


def child_command(config: Config, job_dir: Path) -> list[str]:
    if config.loop == "ours":
        return [sys.executable, "-m", "services.trainer.worker", str(job_dir)]
    return [sys.executable, str(Path(__file__).resolve()), "--baseline-child", str(job_dir)]


def progress_line(result: ChildResult, repeat: int) -> str:
    if not result.ok:
        return f"  repeat {repeat + 1}: {result.config:9s} FAILED (exit {result.exit_code})"
    return (
        f"  repeat {repeat + 1}: {result.config:9s} {result.tokens_per_s:6.0f} tokens/s "
        f"{result.tokens_per_cpu_s:6.0f} tokens/CPU-s  "
        f"peak RSS {result.peak_rss_bytes / MIB:6.0f} MiB  wall {result.wall_s:5.1f} s  "
        f"loss {result.steps[0]['loss']:.3f} → {result.steps[-1]['loss']:.3f}"
    )


def print_summary(summaries: dict[str, Summary], args: argparse.Namespace, baseline: str) -> None:
    rows = []
    for summary in summaries.values():
        data = summary.to_json()
        rows.append(
            [
                summary.config.label,
                data["tokens_per_s"],
                _ratio(data["tokens_per_s_vs_baseline"]),
                data["tokens_per_cpu_s"],
                _ratio(data["tokens_per_cpu_s_vs_baseline"]),
                data["step_s"] * 1000,
                data["peak_rss_bytes"] / MIB,
                _ratio(data["peak_rss_vs_baseline"]),
                data["wall_s"],
                f"{data['loss_first']:.3f} → {data['loss_last']:.3f}",
                f"{data['runs_ok']}/{data['runs']}",
            ]
        )
    tokens_per_step = args.seq_len * args.batch * args.accumulation
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    title = (
        f"Training {args.model} on the CPU: {args.steps} steps of {args.batch}x{args.accumulation} sequences of "
        f"{args.seq_len} tokens ({tokens_per_step} tokens/step), LoRA rank {args.rank}, {args.threads} thread(s), "
        f"load average {load}; medians over {args.repeat} repeats; ratios vs {CONFIGS[baseline].label}, same repeat"
    )
    vs = f"vs {baseline}"
    header = ["configuration", "tokens/s", vs, "tokens/CPU-s", vs, "ms/step", "peak RSS MiB", vs, "wall s"]
    print_table(title, [*header, "loss step 1 → N", "ok"], rows)


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="tiny",
        help="tiny (a random ~1M-parameter Qwen3 built here) or a real model: smollm2-135m-instruct, gemma3-270m",
    )
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (>= 2)")
    parser.add_argument("--repeat", type=int, default=3, help="repeats of every configuration (medians reported)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--documents", type=int, default=400, help="generated corpus documents (8 sentences each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every child (OMP_NUM_THREADS)")
    parser.add_argument("--gradient-checkpointing", choices=("on", "off"), default="on")
    parser.add_argument(
        "--configs",
        type=lambda v: v.split(","),
        default=["hf", "lora", "qlora"],
        help=f"comma-separated, from {','.join(CONFIGS)}; the baseline hf always runs",
    )
    parser.add_argument("--json", type=Path, help="also write the summary as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (model, job folders, logs)")
    parser.add_argument("--baseline-child", type=Path, help=argparse.SUPPRESS)  # the hf child's entry point
    args = parser.parse_args()
    if args.baseline_child:
        sys.exit(run_hf_baseline(args.baseline_child))
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown or args.steps < 2:
        parser.error(f"unknown configurations {unknown}" if unknown else "--steps must be at least 2")
    args.configs = [BASELINE, *[name for name in args.configs if name != BASELINE]]
    root = Path(tempfile.mkdtemp(prefix="baton-bench-train-"))
    try:
        summaries = run_all(args, root)
        report_failures(summaries)
        print_summary(summaries, args, BASELINE)
        if args.json:
            args.json.write_text(json.dumps([s.to_json() for s in summaries.values()], indent=2) + "\n")
    finally:
        if args.keep:
            print(f"\nkept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
