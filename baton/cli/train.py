"""``baton train DATA --name NAME`` and ``baton adapters``: submit a training job and watch it; list the registry.

There is no gateway route for training yet, so ``baton train`` talks to the trainer's gRPC API directly
(BATON_TRAINER_ADDR) and must share BATON_HOME with it: the data is staged under BATON_HOME/trainer/uploads/ (the
trainer reads datasets only inside its allowed roots, BATON_HOME by default). DATA is a JSONL file ({"text"} or chat
{"messages"} lines) or a folder whose .txt and .md files become one document each. ``baton adapters`` reads
BATON_HOME/adapters/<name>/<version>/ and needs no service.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

DEFAULT_TRAINER = os.environ.get("BATON_TRAINER_ADDR", "127.0.0.1:50063")
TEXT_SUFFIXES = (".txt", ".md")
_HYPER_FLAGS = {  # argparse destination → TrainerHyperparameters field
    "steps": "max_steps",
    "epochs": "epochs",
    "seq_len": "seq_len",
    "lr": "learning_rate",
    "batch": "micro_batch_size",
    "grad_accum": "grad_accumulation_steps",
    "eval_fraction": "eval_fraction",
    "checkpoint_every": "checkpoint_every_steps",
}


def _home() -> Path:
    return Path(os.environ.get("BATON_HOME", "var")).resolve()


# ---------------------------------------------------------------------------------------------------- data


def stage_dataset(data: Path, home: Path) -> tuple[Path, str]:
    """The JSONL file the trainer will read (inside BATON_HOME) and a line for people about what it holds."""
    uploads = home / "trainer" / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    if data.is_dir():
        files = sorted(p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        lines = [json.dumps({"text": text}, ensure_ascii=False) for text in texts if text.strip()]
        if not lines:
            raise SystemExit(f"baton train: {data} holds no non-empty .txt or .md files")
        payload = ("\n".join(lines) + "\n").encode("utf-8")
        target = uploads / f"{hashlib.sha256(payload).hexdigest()[:16]}-{data.name or 'texts'}.jsonl"
        if not target.exists():
            _write_atomically(target, payload)
        return target, f"{len(lines)} documents from {len(files)} files in {data}"
    if not data.is_file():
        raise SystemExit(f"baton train: {data} is neither a JSONL file nor a folder of .txt/.md files")
    if data.is_relative_to(home):
        return data, f"{data}"
    digest = hashlib.sha256(data.read_bytes()).hexdigest()[:16]
    target = uploads / f"{digest}-{data.name}"
    if not target.exists():
        _write_atomically(target, data.read_bytes())
    return target, f"{data} (staged as {target})"


def _write_atomically(path: Path, payload: bytes) -> None:
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    staging.write_bytes(payload)
    staging.replace(path)


# ---------------------------------------------------------------------------------------------------- train


def build_spec(args: argparse.Namespace, dataset: Path) -> Any:
    from baton.v1 import trainer_pb2 as pb

    base_model = args.base_model or os.environ.get("BATON_BASE_MODEL") or os.environ.get("BATON_INFERENCE_MODEL_PATH")
    if not base_model:
        raise SystemExit("baton train: which base model? pass --base-model /path/to/model (or set BATON_BASE_MODEL)")
    hyper = pb.TrainerHyperparameters(seed=args.seed)
    for flag, field in _HYPER_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            setattr(hyper, field, value)
    lora = pb.TrainerLoraSettings(target_modules=args.target or [])
    if args.rank is not None:
        lora.rank = args.rank
    if args.strength is not None:
        lora.strength = args.strength
    if args.top_layers is not None:
        lora.top_layers = args.top_layers
    method = {"nf4": pb.TRAINER_QUANT_METHOD_NF4, "none": pb.TRAINER_QUANT_METHOD_NONE}[args.quant]
    spec = pb.TrainerJobSpec(
        name=args.name,
        tenant=args.tenant,
        base_model_path=str(Path(base_model).expanduser().resolve()),
        jsonl=pb.JsonlDataset(path=str(dataset)),
        lora=lora,
        quantization=pb.TrainerQuantizationSettings(method=method),
        hyperparameters=hyper,
        hot_load=not args.no_hot_load,
    )
    if args.priority is not None:
        spec.gpu.priority = args.priority
    return spec


def train(args: argparse.Namespace) -> None:
    from baton.runtime.errors import Unavailable

    try:
        if args.cancel:
            asyncio.run(_cancel(args))
            return
        if args.attach:
            sys.exit(asyncio.run(_follow(args, args.attach)))
        if not args.data or not args.name:
            raise SystemExit("baton train: give DATA and --name (or --attach/--cancel JOB_ID)")
        dataset, what = stage_dataset(Path(args.data).expanduser().resolve(), _home())
        print(f"data: {what}")
        sys.exit(asyncio.run(_submit_and_follow(args, build_spec(args, dataset))))
    except Unavailable as error:
        sys.exit(
            f"baton train: {error.message}\nis the trainer running at {args.trainer}? (baton serve trainer; "
            "BATON_TRAINER_ADDR)"
        )


async def _submit_and_follow(args: argparse.Namespace, spec: Any) -> int:
    from baton.clients.trainer import TrainerClient

    async with TrainerClient(args.trainer) as client:
        job = await client.submit(spec, request_id=str(uuid.uuid4()), validate_only=args.validate_only)
    if args.validate_only:
        stats = job.dataset
        print(f"valid: {stats.documents} documents ({stats.train_documents} train, {stats.eval_documents} eval), "
              f"{stats.train_tokens} training tokens in {stats.train_blocks} blocks, {job.progress.total_steps} steps; "
              f"estimated peak VRAM {job.estimate.vram_bytes / (1 << 30):.1f} GiB")  # fmt: skip
        return 0
    print(f"job {job.job_id}: {job.spec.name}, rank {job.spec.lora.rank}, seq_len {job.spec.hyperparameters.seq_len}, "
          f"estimated peak VRAM {job.estimate.vram_bytes / (1 << 30):.1f} GiB")  # fmt: skip
    if args.detach:
        print(f"follow it with: baton train --attach {job.job_id}")
        return 0
    return await _follow(args, job.job_id)


async def _follow(args: argparse.Namespace, job_id: str) -> int:
    from tqdm import tqdm

    from baton.clients.trainer import TrainerClient, state_name
    from baton.v1 import trainer_pb2 as pb

    async with TrainerClient(args.trainer) as client:
        with tqdm(desc="queued", unit="step", dynamic_ncols=True) as bar:
            timing = False
            try:
                async for event in client.watch(job_id, tenant=args.tenant):
                    if event.type == pb.JOB_EVENT_TYPE_STEP and not timing:
                        bar.reset(total=event.progress.total_steps or None)  # its rate: training, not the waits
                        timing = True
                    _draw(bar, event, state_name(event.state), pb)
            except (KeyboardInterrupt, asyncio.CancelledError):
                bar.close()
                print(f"\ndetached: job {job_id} keeps running on the trainer; follow it again with "
                      f"`baton train --attach {job_id}`, stop it with `baton train --cancel {job_id}`")  # fmt: skip
                return 130
        job = await client.get(job_id, tenant=args.tenant)
    return _summarise(job, pb)


def _draw(bar: Any, event: Any, state: str, pb: Any) -> None:
    progress = event.progress
    if progress.total_steps:
        bar.total = progress.total_steps
    bar.n = progress.step
    bar.set_description(state, refresh=False)
    postfix = {}
    if progress.HasField("loss"):
        postfix["loss"] = f"{progress.loss:.4f}"
    if progress.HasField("eval_loss"):
        postfix["eval"] = f"{progress.eval_loss:.4f}"
    if progress.tokens_per_s:
        postfix["tok/s"] = f"{progress.tokens_per_s:.0f}"
    if progress.HasField("eta_s"):
        postfix["eta"] = _duration(progress.eta_s)
    bar.set_postfix(postfix, refresh=False)
    bar.refresh()
    if event.message and event.type != pb.JOB_EVENT_TYPE_STEP and event.type != pb.JOB_EVENT_TYPE_SNAPSHOT:
        bar.write(f"  {event.message}")


def _summarise(job: Any, pb: Any) -> int:
    if job.state == pb.JOB_STATE_SUCCEEDED:
        adapter = job.adapter
        print(f"adapter {adapter.name} version {adapter.version}: {adapter.path}")
        if adapter.HasField("eval_perplexity_before") and adapter.HasField("eval_perplexity_after"):
            before, after = adapter.eval_perplexity_before, adapter.eval_perplexity_after
            change = (after - before) / before
            print(f"eval perplexity {before:.2f} → {after:.2f} ({change:+.1%}); {adapter.steps} steps, "
                  f"{adapter.tokens_seen} tokens; loss curves: {adapter.loss_plot_path}")  # fmt: skip
        print("hot-loaded into inference" if adapter.hot_loaded else f"not hot-loaded: {adapter.hot_load_error}")
        return 0
    if job.state == pb.JOB_STATE_FAILED:
        print(f"failed ({job.error.reason}): {job.error.message}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} ended {pb.JobState.Name(job.state)}")
    return 1


async def _cancel(args: argparse.Namespace) -> None:
    from baton.clients.trainer import TrainerClient, state_name

    async with TrainerClient(args.trainer) as client:
        job = await client.cancel(args.cancel, tenant=args.tenant)
    print(f"job {job.job_id}: {state_name(job.state)}" + (" (stopping)" if not job.finished_unix_s else ""))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else (
        f"{seconds // 60}:{seconds % 60:02d}"
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------- adapters


def adapters(args: argparse.Namespace) -> None:
    from services.trainer.registry import AdapterRegistry

    root = _home() / "adapters"
    versions = [v for v in AdapterRegistry(root).all_versions() if not args.name or v.name == args.name]
    if args.json:
        print(json.dumps([{"name": v.name, "version": v.version, "path": str(v.path), **v.metadata,
                           "registry": v.registry} for v in versions], indent=1, ensure_ascii=False))  # fmt: skip
        return
    if not versions:
        print(f"no adapters in {root} (train one: baton train DATA --name NAME)")
        return
    print(
        f"{'name':<24}{'ver':>4}  {'created':<17}{'steps':>7}{'tokens':>10}  {'eval ppl before → after':<26}base model"
    )
    for v in versions:
        meta = v.metadata
        created = v.registry.get("registered_unix_s") or meta.get("created_unix_s") or 0
        when = datetime.datetime.fromtimestamp(float(created)).strftime("%Y-%m-%d %H:%M") if created else "-"
        before, after = meta.get("eval_perplexity_before"), meta.get("eval_perplexity_after")
        ppl = f"{before:.2f} → {after:.2f}" if before is not None and after is not None else "-"
        base = Path(str(meta.get("base_model_path", "-"))).name
        print(f"{v.name:<24}{v.version:>4}  {when:<17}{meta.get('steps', '-')!s:>7}{meta.get('tokens_seen', '-')!s:>10}"
              f"  {ppl:<26}{base}")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- wiring


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train",
        help="train a LoRA adapter (QLoRA) on a JSONL file or a folder of texts, with a progress bar",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data", nargs="?", help='a JSONL file ({"text"} or {"messages"} lines) or a folder')
    parser.add_argument("--name", help="adapter name (a-z0-9._-): registered as adapters/NAME/<next version>")
    parser.add_argument("--base-model", help="local model folder [env BATON_BASE_MODEL, BATON_INFERENCE_MODEL_PATH]")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: one epoch)")
    parser.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    parser.add_argument("--rank", type=int, help="LoRA rank (default 16)")
    parser.add_argument(
        "--strength",
        type=float,
        help="share of the trained update the adapter keeps, (0, 1] (default 1); 0.5 forgets less general text",
    )
    parser.add_argument(
        "--top-layers",
        type=float,
        help="share of the model's layers, from the top, whose update the adapter keeps, (0, 1] (default 1); "
        "the layers below return to the base model",
    )
    parser.add_argument(
        "--target", action="append", help="a LoRA target module (repeat; default: q,k,v,o,gate,up,down)"
    )
    parser.add_argument("--seq-len", type=int, help="tokens per training sequence (default min(1024, the model's))")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 2e-4)")
    parser.add_argument("--batch", type=int, help="sequences per forward pass (default 1)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 8)")
    parser.add_argument("--eval-fraction", type=float, help="documents held out for evaluation (default 0.05)")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed: the same seed and data give the same adapter")
    parser.add_argument("--quant", choices=["nf4", "none"], default="nf4", help="nf4 = QLoRA (default), none = LoRA")
    parser.add_argument("--priority", type=int, help="GPU lease priority (default: the trainer's, below serving)")
    parser.add_argument("--no-hot-load", action="store_true", help="do not ask inference to load the adapter")
    parser.add_argument("--validate-only", action="store_true", help="check the job and the data, train nothing")
    parser.add_argument("--detach", action="store_true", help="submit and return (no progress bar)")
    parser.add_argument("--attach", metavar="JOB_ID", help="follow a job already submitted")
    parser.add_argument("--cancel", metavar="JOB_ID", help="cancel a job")
    parser.add_argument("--tenant", default=os.environ.get("BATON_TENANT", "default"), help="tenant [env BATON_TENANT]")
    parser.add_argument("--trainer", default=DEFAULT_TRAINER, help="trainer address host:port [env BATON_TRAINER_ADDR]")
    parser.set_defaults(run=train)

    listing = commands.add_parser("adapters", help="list the adapter registry (BATON_HOME/adapters) with metadata")
    listing.add_argument("name", nargs="?", help="only this adapter's versions")
    listing.add_argument("--json", action="store_true", help="everything, as JSON")
    listing.set_defaults(run=adapters)
