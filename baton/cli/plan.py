"""``baton plan``: what a job takes on your GPU — VRAM, host RAM, disk, time — and whether it fits.

No service is needed: the planner is a library. The model is a catalogue name or a local model folder (its
config.json is read); the GPU a catalogue name or your own figures. Choose jobs with --train, --rag and --serve
(all three when none is given); ``--scenario seed`` prints the bundled case (Qwen3-30B-A3B on an RTX PRO 6000).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import ValidationError

from baton.planner import catalog
from baton.planner.catalog import GIB, GpuSpec
from baton.planner.models import ModelArch
from baton.planner.plan import Report
from baton.planner.rag import RagJob
from baton.planner.report import render
from baton.planner.scenario import SCENARIOS, build_report, scenario
from baton.planner.serving import ServingJob
from baton.planner.training import DEFAULT_TARGETS, TrainingJob
from baton.runtime.files import model_config

EXAMPLES = """examples:
  baton plan --scenario seed                      the bundled case, as a report with tables
  baton plan --model qwen3-8b --gpu rtx-4090 --train --tokens 5M
  baton plan --model /models/Qwen3-14B --gpu-memory-gib 48 --serve --context 16384 --concurrency 8
  baton plan --rag --pages 200000 --embedding-model bge-m3 --json
"""


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "plan",
        help="what training, memory and serving take on your GPU, and whether they fit",
        description=__doc__,
        epilog=EXAMPLES + _catalogue_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenario", choices=SCENARIOS, help="a bundled scenario (other flags are ignored)")
    parser.add_argument("--model", default="qwen3-30b-a3b", help="catalogue name or a local model folder")
    parser.add_argument("--gpu", default="rtx-pro-6000", help="catalogue name (see below)")
    parser.add_argument(
        "--gpu-memory-gib", type=float, help="a custom GPU: memory in GiB, as nvidia-smi shows it (overrides --gpu)"
    )
    parser.add_argument("--gpu-bandwidth", type=float, default=1000, help="custom GPU: memory bandwidth, GB/s")
    parser.add_argument("--gpu-tflops", type=float, default=200, help="custom GPU: dense bf16 TFLOPS")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    jobs = parser.add_argument_group("jobs (all three when none is chosen)")
    jobs.add_argument("--train", action="store_true", help="a LoRA/QLoRA training job")
    jobs.add_argument("--rag", action="store_true", help="building the memory (RAG index)")
    jobs.add_argument("--serve", action="store_true", help="serving the model with adapters")
    _training_flags(parser.add_argument_group("training"))
    _rag_flags(parser.add_argument_group("memory (RAG)"))
    _serving_flags(parser.add_argument_group("serving"))
    parser.set_defaults(run=plan)


def _training_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--method", choices=("qlora", "lora"), default="qlora")
    group.add_argument("--rank", type=int, default=16)
    group.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="module names, or all-linear")
    group.add_argument("--target-experts", action="store_true", help="LoRA on MoE experts too")
    group.add_argument("--quantize-experts", action="store_true", help="plan for a trainer that quantises experts")
    group.add_argument("--seq-len", type=int, default=2048)
    group.add_argument("--batch", type=int, default=1, help="micro-batch size")
    group.add_argument("--grad-accum", type=int, default=8)
    group.add_argument("--no-gradient-checkpointing", action="store_true")
    group.add_argument("--optimizer", default="paged_adamw_8bit", help="adamw_torch, adamw_8bit, paged_adamw_8bit")
    group.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    group.add_argument("--tokens", type=_count, default=10_000_000, help="training tokens, e.g. 5M [10M]")
    group.add_argument("--epochs", type=float, default=1.0)


def _rag_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--pages", type=_count, default=1_000_000, help="pages of text, e.g. 1M")
    group.add_argument("--tokens-per-page", type=int, default=500)
    group.add_argument("--documents", type=_count, default=None, help="how many files [pages / 20]")
    group.add_argument("--embedding-model", default="multilingual-e5-large", help=", ".join(catalog.EMBEDDING_MODELS))
    group.add_argument("--chunk-tokens", type=int, default=None)
    group.add_argument("--overlap", type=int, default=64)
    group.add_argument("--bytes-per-token", type=float, default=3.5, help="UTF-8 bytes per token (Russian ~3.5)")


def _serving_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    group.add_argument("--weights", choices=("bfloat16", "fp8", "int4"), default="bfloat16")
    group.add_argument("--kv-dtype", choices=("bfloat16", "fp8"), default="bfloat16")
    group.add_argument("--context", type=int, default=32768, help="context length per sequence")
    group.add_argument("--concurrency", type=int, default=4, help="sequences served at once")
    group.add_argument("--adapters", type=int, default=4, help="adapters resident at once")


def plan(args: argparse.Namespace) -> None:
    try:
        report = scenario(args.scenario) if args.scenario else _report(args)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise SystemExit(f"baton plan: {problems} (see baton plan --help)") from None
    print(report.model_dump_json(indent=2) if args.json else render(report))


def _report(args: argparse.Namespace) -> Report:
    every = not (args.train or args.rag or args.serve)
    return build_report(
        load_model(args.model),
        _gpu(args),
        training=_training_job(args) if every or args.train else None,
        rag=_rag_job(args) if every or args.rag else None,
        serving=_serving_job(args) if every or args.serve else None,
    )


def load_model(name: str) -> ModelArch:
    """A catalogue name, or a local folder's config.json (the only file read)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return ModelArch.from_config(model_config(folder), name=folder.name)
    return catalog.model(name)


def _gpu(args: argparse.Namespace) -> GpuSpec:
    if args.gpu_memory_gib:
        return GpuSpec(
            name=f"custom {args.gpu_memory_gib:g} GiB",
            memory_bytes=int(args.gpu_memory_gib * GIB),
            bandwidth_gb_s=args.gpu_bandwidth,
            bf16_tflops=args.gpu_tflops,
        )
    return catalog.gpu(args.gpu)


def _training_job(args: argparse.Namespace) -> TrainingJob:
    return TrainingJob(
        method=args.method,
        rank=args.rank,
        targets=tuple(name.strip() for name in args.targets.split(",") if name.strip()),
        target_experts=args.target_experts,
        quantize_experts=args.quantize_experts,
        seq_len=args.seq_len,
        micro_batch=args.batch,
        grad_accumulation=args.grad_accum,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        optimizer=args.optimizer,
        compute_dtype=args.dtype,
        dataset_tokens=args.tokens,
        epochs=args.epochs,
    )


def _rag_job(args: argparse.Namespace) -> RagJob:
    return RagJob(
        pages=args.pages,
        tokens_per_page=args.tokens_per_page,
        documents=args.documents,
        embedding_model=args.embedding_model,
        chunk_tokens=args.chunk_tokens,
        overlap_tokens=args.overlap,
        text_bytes_per_token=args.bytes_per_token,
    )


def _serving_job(args: argparse.Namespace) -> ServingJob:
    return ServingJob(
        engine=args.engine,
        weights=args.weights,
        kv_dtype=args.kv_dtype,
        context_len=args.context,
        concurrent_seqs=args.concurrency,
        max_loras=args.adapters,
    )


def _count(text: str) -> int:
    """5M, 200k, 1.5G or a plain number."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (e.g. 5M, 200k, 1000)") from None


def _catalogue_text() -> str:
    models = ", ".join(catalog.MODEL_CONFIGS)
    gpus = "\n".join(
        f"  {key:14} {g.name}, {g.memory_gib:g} GiB, {g.bf16_tflops:g} TFLOPS" for key, g in catalog.GPUS.items()
    )
    return f"\nmodels: {models}\ngpus:\n{gpus}\n"
