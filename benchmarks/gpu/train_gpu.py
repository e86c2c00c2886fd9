"""Training on a real GPU: our (Q)LoRA loop against a plain ``transformers.Trainer`` + PEFT run on a ~1.9B-parameter
Qwen3-MoE-shaped model with random bf16 weights. See benchmarks/gpu/README.md for running it on a lent GPU machine.

What it builds (in a temporary folder, seeded, in a child process): the kit's byte-level BPE tokenizer and a
``Qwen3MoeForCausalLM`` from a ``Qwen3MoeConfig`` shaped like a small Qwen3-30B-A3B — hidden 2048, 12 layers,
16 query / 4 KV heads of 128, 32 experts of width 768 with 4 active per token: ~1.94B parameters, ~0.35B active
per token (the kit's 1,024-token vocabulary keeps the embeddings small) — initialised on the GPU and saved as bf16
safetensors. A generated corpus (``bench_train.write_corpus``) is packed into blocks by our dataset builder.

What it trains, each configuration in a child process of its own (--seq-len x --batch x --accumulation tokens per
step, --steps steps, LoRA rank 16 on q/k/v/o — in transformers 5 the experts are fused 3-D parameters, not
``nn.Linear``, so the attention projections are what "all projections" resolves to —, AdamW, cosine schedule,
gradient checkpointing, bf16 compute):

- ``hf`` — the baseline: ``transformers.Trainer`` on a ``peft`` LoRA of the bf16 model (``bf16=True``);
- ``lora`` — ours, plain LoRA: the worker contract (spec.json → ``services.trainer.worker`` → events.jsonl),
  exactly what the trainer service starts, with quantization none and compute dtype bfloat16;
- ``hf-qlora`` and ``qlora`` — the same two with the base in 4-bit NF4 (bitsandbytes, double quantisation, bf16
  compute; the Trainer side with ``prepare_model_for_kbit_training``, as PEFT documents it), only when
  bitsandbytes imports: the GPU image does not ship it (carry its wheel, ``--bnb-wheel``). Without it the table
  says that QLoRA was not measured. Expect the QLoRA rows to need *more* VRAM than bf16 LoRA on this model:
  bitsandbytes quantises ``nn.Linear`` layers only, so the fused experts (93 % of the parameters) stay unquantised,
  and ``prepare_model_for_kbit_training`` (ours and the baseline alike) casts every unquantised bf16 parameter to
  float32 — the experts double in size and their matmuls run in float32.

Figures per configuration (the child's own step events; the baseline's come from a ``TrainerCallback``):
tokens/s over steps 2..N (end of step 1 → end of step N, wall clock; step 1 holds one-off kernel set-up), ms per
step, peak VRAM (``torch.cuda.max_memory_allocated`` as the child reports it with each step), the child's peak host
RSS (``os.wait4``), wall time (start → exit), the loss of step 1 and of step N. Ratios: against ``hf`` in the same
repeat, and against the HF run of the same quantisation (``qlora`` / ``hf-qlora``). Results print as a table and a
JSON blob; with $OUT set (or --out) the JSON is written to ``train_gpu.json`` there.

The trainer's modules import ``baton.runtime.errors``, which needs gRPC's status protos; on an image without them
each child gives that one module plain stand-in classes with the same names and attributes (the worker's error
events then read the same).

    python benchmarks/gpu/train_gpu.py [--steps 20] [--repeat 1] [--bnb-wheel .whl/bitsandbytes-...whl]
    python benchmarks/gpu/train_gpu.py --dry-run      # no GPU: a tiny MoE on the CPU, same code path, ~1-2 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.bench_train import (
    CONFIGS,
    ChildResult,
    Summary,
    child_env,
    job_spec,
    median,
    pair_with_baseline,
    prepare_job,
    report_failures,
    rotated,
    run_child,
    write_corpus,
)
from benchmarks.common import print_table

GIB = 1 << 30
BASELINE = "hf"
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SAME_QUANT_BASELINE = {"lora": "hf", "qlora": "hf-qlora", "hf-qlora": "hf"}
CHILD_TIMEOUT_S = 400.0
ERROR_CLASSES = {  # baton.runtime.errors: class → (parent, default reason)
    "InvalidArgument": ("BatonError", "INVALID_ARGUMENT"),
    "EmptyInput": ("InvalidArgument", "EMPTY_INPUT"),
    "PayloadTooLarge": ("InvalidArgument", "PAYLOAD_TOO_LARGE"),
    "Unauthenticated": ("BatonError", "UNAUTHENTICATED"),
    "PermissionDenied": ("BatonError", "PERMISSION_DENIED"),
    "NotFound": ("BatonError", "NOT_FOUND"),
    "AlreadyExists": ("BatonError", "ALREADY_EXISTS"),
    "FailedPrecondition": ("BatonError", "FAILED_PRECONDITION"),
    "UpstreamFailed": ("FailedPrecondition", "UPSTREAM_FAILED"),
    "ResourceExhausted": ("BatonError", "RESOURCE_EXHAUSTED"),
    "Unavailable": ("BatonError", "UNAVAILABLE"),
    "DeadlineExceeded": ("BatonError", "DEADLINE_EXCEEDED"),
    "Cancelled": ("BatonError", "CANCELLED"),
    "Internal": ("BatonError", "INTERNAL"),
}


@dataclass(frozen=True)
class MoeShape:
    """The model built for the run (the dry run's is tiny)."""

    hidden_size: int = 2048
    num_layers: int = 12
    num_heads: int = 16
    num_kv_heads: int = 4
    head_dim: int = 128
    num_experts: int = 32
    experts_per_token: int = 4
    moe_intermediate_size: int = 768
    max_position_embeddings: int = 4096


TINY_SHAPE = MoeShape(
    hidden_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    num_experts=8,
    experts_per_token=2,
    moe_intermediate_size=128,
    max_position_embeddings=1024,
)


# ------------------------------------------------------------------------------------------- in every child


def install_errors_stand_in() -> bool:
    """Give ``baton.runtime.errors`` plain stand-ins when its gRPC imports are missing; True when it did."""
    try:
        import baton.runtime.errors  # noqa: F401  (the import is the check)

        return False
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith(("grpc", "google")):
            raise
    module = types.ModuleType("baton.runtime.errors")

    class BatonError(Exception):
        default_reason = "INTERNAL"

        def __init__(
            self,
            message: str,
            *,
            reason: str | None = None,
            metadata: dict[str, str] | None = None,
            retry_after_s: float | None = None,
        ) -> None:
            super().__init__(message)
            self.message = message
            self.reason = reason or self.default_reason
            self.metadata = dict(metadata or {})
            self.retry_after_s = retry_after_s

    module.BatonError = BatonError  # type: ignore[attr-defined]
    for name, (parent, reason) in ERROR_CLASSES.items():
        setattr(module, name, type(name, (getattr(module, parent),), {"default_reason": reason}))
    sys.modules["baton.runtime.errors"] = module
    return True


def child_main(role: str, folder: Path) -> int:
    stand_in = install_errors_stand_in()
    if role == "build":
        return build_model(folder, stand_in)
    if role == "ours":
        from services.trainer.worker import main as worker_main

        return worker_main(["worker", str(folder)])
    from benchmarks.bench_train import run_hf_baseline

    return run_hf_baseline(folder)


# ------------------------------------------------------------------------------------- building (a child)


def build_model(root: Path, stand_in: bool) -> int:
    """The model folder and build.json (parameters, versions, the card) from root/build-request.json."""
    import torch
    from tokenizers import Tokenizer
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    import baton.models.tiny as kit

    request = json.loads((root / "build-request.json").read_text(encoding="utf-8"))
    shape = MoeShape(**request["shape"])
    device = torch.device(request["device"])
    dtype = getattr(torch, request["dtype"])
    started = time.perf_counter()
    tiny = kit.build_tiny_model(root / "tiny-qwen3")  # for its tokenizer
    folder = root / "qwen3-moe"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, folder / name)
    tokenizer = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    config = Qwen3MoeConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.moe_intermediate_size * shape.experts_per_token,  # unused: every layer is sparse
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        num_experts=shape.num_experts,
        num_experts_per_tok=shape.experts_per_token,
        moe_intermediate_size=shape.moe_intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.token_to_id(kit.IM_END),
        pad_token_id=tokenizer.token_to_id(kit.ENDOFTEXT),
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds on a GPU instead of minutes of CPU normal_()
        model = Qwen3MoeForCausalLM(config).to(dtype)
    counts = parameter_counts(model, shape)
    model.save_pretrained(str(folder))
    del model
    info = {
        "model_path": str(folder),
        "shape": asdict(shape),
        "parameters": counts,
        "build_s": round(time.perf_counter() - started, 1),
        "device": describe_device(torch, device),
        "versions": versions(torch),
        "bitsandbytes": bitsandbytes_status(),
        "errors_stand_in": stand_in,
    }
    (root / "build.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return 0


def parameter_counts(model: Any, shape: MoeShape) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    return {
        "total": total,
        "experts": experts,
        "active_per_token": total - experts + experts * shape.experts_per_token // shape.num_experts,
    }


def describe_device(torch: Any, device: Any) -> dict[str, Any]:
    if device.type != "cuda":
        return {"type": "cpu", "name": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    props = torch.cuda.get_device_properties(device)
    return {
        "type": "cuda",
        "name": props.name,
        "memory_gib": round(props.total_memory / GIB, 1),
        "capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
    }


def versions(torch: Any) -> dict[str, str]:
    import peft
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__}
    found.update(transformers=transformers.__version__, peft=peft.__version__)
    return found


def bitsandbytes_status() -> dict[str, Any]:
    try:
        import bitsandbytes
    except Exception as error:  # ImportError, or its CUDA library failing to load
        return {"available": False, "detail": f"{type(error).__name__}: {error}"[:300]}
    return {"available": True, "version": bitsandbytes.__version__, "path": str(Path(bitsandbytes.__file__).parent)}


# ------------------------------------------------------------------------------------------- the parent


def install_wheel(wheel: Path, target: Path) -> str:
    """pip-install a carried wheel (bitsandbytes) into ``target`` for the children; returns the path to add."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-compile"]
    subprocess.run([*command, "--target", str(target), str(wheel)], check=True)
    return str(target)


def build(root: Path, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    shape = TINY_SHAPE if args.dry_run else MoeShape(num_layers=args.layers, num_experts=args.experts)
    request = {"shape": asdict(shape), "device": args.device, "dtype": args.dtype}
    (root / "build-request.json").write_text(json.dumps(request), encoding="utf-8")
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "build", str(root)]
    result = run_child("build", command, root, env, CHILD_TIMEOUT_S)
    if result.exit_code != 0 or not (root / "build.json").is_file():
        raise SystemExit(f"building the model failed (exit {result.exit_code}):\n{result.log[-3000:]}")
    return json.loads((root / "build.json").read_text(encoding="utf-8"))


def run_configs(
    args: argparse.Namespace, root: Path, info: dict[str, Any], env: dict[str, str], started: float
) -> tuple[dict[str, Summary], list[str]]:
    corpus = write_corpus(root / "corpus.jsonl", documents=args.documents, sentences=8, seed=0)
    # QLoRA first after the baseline: if --budget-s cuts the run short, the figure the issue asks for is in.
    names = [BASELINE, "qlora", "hf-qlora", "lora"] if info["bitsandbytes"]["available"] else [BASELINE, "lora"]
    summaries = {name: Summary(CONFIGS[name]) for name in names}
    skipped: list[str] = []
    for repeat in range(args.repeat):
        for name in rotated(names, repeat):
            if time.perf_counter() - started > args.budget_s:
                skipped.append(f"{name} (repeat {repeat + 1}): over --budget-s {args.budget_s:.0f}")
                continue
            config = CONFIGS[name]
            spec = job_spec(
                Path(info["model_path"]),
                corpus,
                quantization=config.quantization,
                device=args.device,
                compute_dtype=args.dtype,
                targets=ATTENTION_TARGETS,
                args=args,
            )
            job_dir = prepare_job(root / "jobs", f"{name}-{repeat}", spec)
            role = "ours" if config.loop == "ours" else "hf"
            command = [sys.executable, str(Path(__file__).resolve()), "--child", role, str(job_dir)]
            result = run_child(name, command, job_dir, env, CHILD_TIMEOUT_S)
            summaries[name].runs.append(result)
            print(progress_line(result, repeat), flush=True)
        pair_with_baseline(summaries, BASELINE, repeat)
    return summaries, skipped


def progress_line(result: ChildResult, repeat: int) -> str:
    if not result.ok:
        return f"  repeat {repeat + 1}: {result.config:9s} FAILED (exit {result.exit_code})"
    return (
        f"  repeat {repeat + 1}: {result.config:9s} {result.tokens_per_s:8.0f} tokens/s  "
        f"loop peak {result.peak_device_bytes / GIB:6.2f} GiB  peak RSS {result.peak_rss_bytes / GIB:5.2f} GiB  "
        f"wall {result.wall_s:5.1f} s  loss {result.steps[0]['loss']:.3f} → {result.steps[-1]['loss']:.3f}"
    )


def same_quant_ratios(summaries: dict[str, Summary]) -> dict[str, dict[str, float | None]]:
    """Per configuration: tokens/s and peak VRAM against the HF run of the same quantisation, paired by repeat."""
    found: dict[str, dict[str, float | None]] = {}
    for name, reference in SAME_QUANT_BASELINE.items():
        if name not in summaries or reference not in summaries:
            continue
        pairs = [
            (run, base)
            for run, base in zip(summaries[name].runs, summaries[reference].runs, strict=False)
            if run.ok and base.ok
        ]
        found[name] = {
            "baseline": reference,  # type: ignore[dict-item]
            "tokens_per_s": median([r.tokens_per_s / b.tokens_per_s for r, b in pairs]) if pairs else None,
            "peak_vram": median([r.peak_device_bytes / b.peak_device_bytes for r, b in pairs]) if pairs else None,
        }
    return found


def report(
    args: argparse.Namespace,
    info: dict[str, Any],
    summaries: dict[str, Summary],
    skipped: list[str],
    wall_s: float,
) -> dict[str, Any]:
    matched = same_quant_ratios(summaries)
    qlora = info["bitsandbytes"]["available"]
    note = (
        "QLoRA measured"
        if qlora
        else f"QLoRA NOT measured: bitsandbytes does not import here ({info['bitsandbytes']['detail']}); "
        "carry its wheel and pass --bnb-wheel"
    )
    results = []
    for name, summary in summaries.items():
        data = summary.to_json()
        data.pop("tokens_per_cpu_s", None)  # a GPU run waits on the device: CPU seconds say nothing here
        data.pop("tokens_per_cpu_s_vs_baseline", None)
        data["vs_same_quant_hf"] = matched.get(name)
        results.append(data)
    blob = {
        "benchmark": "train_gpu",
        "dry_run": args.dry_run,
        "device": info["device"],
        "versions": info["versions"],
        "bitsandbytes": info["bitsandbytes"],
        "errors_stand_in": info["errors_stand_in"],
        "model": {"shape": info["shape"], "parameters": info["parameters"], "build_s": info["build_s"]},
        "settings": {
            "steps": args.steps,
            "seq_len": args.seq_len,
            "micro_batch_size": args.batch,
            "grad_accumulation_steps": args.accumulation,
            "tokens_per_step": args.seq_len * args.batch * args.accumulation,
            "lora_rank": args.rank,
            "lora_targets": list(ATTENTION_TARGETS),
            "compute_dtype": args.dtype,
            "gradient_checkpointing": args.gradient_checkpointing,
            "repeat": args.repeat,
        },
        "qlora": note,
        "results": results,
        "skipped": skipped,
        "wall_s": round(wall_s, 1),
    }
    print_results(blob)
    return blob


def print_results(blob: dict[str, Any]) -> None:
    params = blob["model"]["parameters"]
    settings = blob["settings"]
    device = blob["device"]
    rows = []
    for data in blob["results"]:
        matched = data["vs_same_quant_hf"] or {}
        rows.append(
            [
                data["label"],
                data["tokens_per_s"],
                _ratio(data["tokens_per_s_vs_baseline"]),
                _ratio(matched.get("tokens_per_s")),
                data["step_s"] * 1000,
                data["peak_device_bytes"] / GIB,
                _ratio(data["peak_device_vs_baseline"]),
                _ratio(matched.get("peak_vram")),
                data["peak_rss_bytes"] / GIB,
                data["wall_s"],
                f"{data['loss_first']:.3f} → {data['loss_last']:.3f}",
                f"{data['runs_ok']}/{data['runs']}",
            ]
        )
    title = (
        f"Training on {device['name']} ({device['type']}): Qwen3-MoE {_count(params['total'])} parameters "
        f"({_count(params['active_per_token'])} active), {settings['steps']} steps of "
        f"{settings['micro_batch_size']}x{settings['grad_accumulation_steps']}x{settings['seq_len']} tokens, "
        f"LoRA rank {settings['lora_rank']} on q/k/v/o, {settings['compute_dtype']}; medians over "
        f"{settings['repeat']}; ratios vs hf and vs the HF run of the same quantisation, same repeat"
    )
    # The loops report torch's peak allocation on a GPU and the process's peak RSS on the CPU (a dry run).
    memory = "peak VRAM GiB" if device["type"] == "cuda" else "loop peak RSS GiB"
    header = ["configuration", "tokens/s", "vs hf", "vs HF same quant", "ms/step", memory, "vs hf",
              "vs HF same quant", "peak RSS GiB", "wall s", "loss step 1 → N", "ok"]  # fmt: skip
    print_table(title, header, rows)
    print(f"\n{blob['qlora']}")
    for line in blob["skipped"]:
        print(f"skipped: {line}")
    print(f"\nJSON:\n{json.dumps(blob, indent=2)}")


def _count(value: int) -> str:
    return f"{value / 1e9:.2f}B" if value >= 1e8 else f"{value / 1e6:.2f}M"


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="no GPU: a tiny MoE on the CPU, float32, 4 steps")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 20; dry run 4)")
    parser.add_argument("--repeat", type=int, default=1, help="repeats of every configuration (medians reported)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 1024; dry run 128)")
    parser.add_argument("--batch", type=int, help="sequences per micro-batch (default 4; dry run 2)")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--layers", type=int, default=MoeShape.num_layers, help="decoder layers of the MoE model")
    parser.add_argument("--experts", type=int, default=MoeShape.num_experts, help="experts per layer")
    parser.add_argument("--documents", type=int, help="generated corpus documents (default 2000; dry run 200)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every child (default 4; dry run 1)")
    parser.add_argument("--gradient-checkpointing", choices=("on", "off"), default="on")
    parser.add_argument("--bnb-wheel", type=Path, help="a bitsandbytes wheel to install for the children (QLoRA)")
    parser.add_argument("--budget-s", type=float, default=270.0, help="start no configuration after this many s")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (model, job folders, logs)")
    parser.add_argument("--child", nargs=2, metavar=("ROLE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        os._exit(child_main(args.child[0], Path(args.child[1])))  # skip the slow teardown; every file is closed
    defaults = {"steps": 20, "seq_len": 1024, "batch": 4, "documents": 2000, "threads": 4}
    if args.dry_run:
        defaults = {"steps": 4, "seq_len": 128, "batch": 2, "documents": 200, "threads": 1}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device, args.dtype = ("cpu", "float32") if args.dry_run else ("cuda", "bfloat16")
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="baton-train-gpu-"))
    try:
        extra = install_wheel(args.bnb_wheel, root / "site") if args.bnb_wheel else ""
        env = child_env(args.threads, extra)
        info = build(root, args, env)
        print(f"model built in {info['build_s']} s: {info['parameters']}", flush=True)
        summaries, skipped = run_configs(args, root, info, env, started)
        report_failures(summaries)
        blob = report(args, info, summaries, skipped, time.perf_counter() - started)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "train_gpu.json").write_text(json.dumps(blob, indent=2) + "\n", encoding="utf-8")
    finally:
        if args.keep:
            print(f"\nkept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
