"""The planner's VRAM estimate against the measured peak on a GPU (goal: within 15 %).

Builds a ~1.5B-parameter Qwen3 with random bf16 weights from a config (hidden 2048, 16 layers, 16 query / 8 KV heads
of 128, MLP 6144, vocabulary 32768), then, for two sequence lengths, runs ``services.trainer.memory_probe`` — three
optimizer steps of the trainer's own code — in a child process and compares ``torch.cuda.max_memory_allocated``
with ``baton.planner.training.training_memory`` for the same settings (without the CUDA context and the allocator's
slack, which max_memory_allocated does not count; the reserved peak is printed beside them). QLoRA (NF4, paged
8-bit AdamW) when bitsandbytes imports — the GPU image lacks it: carry its wheel with ``--bnb-wheel`` as for
train_gpu.py — else bf16 LoRA only, and the table says QLoRA was not measured.

    python3 benchmarks/gpu/planner_check.py [--bnb-wheel .whl/bitsandbytes-….whl]   # on the GPU machine
    .venv/bin/python benchmarks/gpu/planner_check.py --dry-run                        # here: a tiny model on the CPU

Prints a table and a JSON line; writes $OUT/planner_check.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.gpu.train_gpu import install_errors_stand_in, install_wheel  # noqa: E402

SHAPE = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 8,
         "head_dim": 128, "intermediate_size": 6144, "vocab_size": 32768}  # fmt: skip
TINY = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "intermediate_size": 256, "vocab_size": 1024}  # fmt: skip
GOAL = 0.15


def main() -> int:
    if sys.argv[1:2] == ["--child"]:  # the probe, in its own process
        install_errors_stand_in()
        from services.trainer.memory_probe import main as probe_main

        return probe_main(sys.argv[2:])
    args = _parser().parse_args()
    device = "cpu" if args.dry_run else "cuda"
    with tempfile.TemporaryDirectory(prefix="planner-check-") as temp:
        root = Path(temp)
        env = dict(os.environ)
        if args.bnb_wheel:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [install_wheel(args.bnb_wheel, root / "site"), str(REPO)]))
        else:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        model = _build(root / "model", TINY if args.dry_run else SHAPE)
        qlora = _bitsandbytes_imports(env)
        rows = [_check(model, seq, device, qlora, env, args.dry_run) for seq in args.seq_lens]
    _print(rows, qlora)
    out = os.environ.get("OUT")
    if out:
        Path(out, "planner_check.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU (checks the script)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--bnb-wheel", type=Path, help="a bitsandbytes wheel to install for the children")
    return parser


def _build(folder: Path, shape: dict[str, int]) -> Path:
    """Random bf16 weights from a config, with the tiny kit's tokenizer files (the probe reads no text)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    install_errors_stand_in()
    from baton.models.tiny import build_tiny_model

    kit = build_tiny_model(folder.parent / "kit")
    config = Qwen3Config(**shape, max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("cpu"):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(kit / name, folder / name)
    return folder


def _bitsandbytes_imports(env: dict[str, str]) -> bool:
    probe = subprocess.run([sys.executable, "-c", "import bitsandbytes"], env=env, capture_output=True, timeout=120)
    return probe.returncode == 0


def _check(model: Path, seq: int, device: str, qlora: bool, env: dict[str, str], dry_run: bool) -> dict[str, Any]:
    from baton.planner.models import ModelArch
    from baton.planner.training import TrainingJob, training_memory

    method = "nf4" if qlora else "none"
    dtype = "float32" if dry_run else "bfloat16"
    optimizer = "paged_adamw_8bit" if qlora and not dry_run else "adamw_torch"
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", "--model", str(model), "--method", method,
        "--device", device, "--dtype", dtype, "--optimizer", optimizer, "--seq-len", str(seq), "--steps", "3",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"the probe failed at seq {seq}:\n{done.stderr[-3000:]}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    arch = ModelArch.from_config(json.loads((model / "config.json").read_text(encoding="utf-8")), name="check")
    job = TrainingJob(method="qlora" if qlora else "lora", compute_dtype=dtype, seq_len=seq, optimizer=optimizer)
    plan = training_memory(arch, job, cpu=device == "cpu")
    tensors = plan.total_bytes - plan.get("CUDA context") - plan.get("allocator slack")
    peak = measured["cuda_peak_allocated_bytes"] if device == "cuda" else measured["peak_over_baseline_bytes"]
    return {
        "method": "QLoRA (NF4)" if qlora else "LoRA (bf16)" if not dry_run else "LoRA (fp32, CPU)",
        "seq_len": seq,
        "predicted_bytes": tensors,
        "measured_bytes": peak,
        "ratio": peak / tensors,
        "within_goal": abs(peak / tensors - 1) <= GOAL,
        "predicted_with_slack_bytes": plan.total_bytes - plan.get("CUDA context"),
        "measured_reserved_bytes": measured["cuda_peak_reserved_bytes"],
        "tokens_per_s": measured["tokens_per_s"],
        "items": {item.name: item.bytes for item in plan.items},
    }


def _print(rows: list[dict[str, Any]], qlora: bool) -> None:
    gib = 1 << 30
    print("| method | seq | predicted GiB | measured GiB | measured / predicted | within 15 % | reserved GiB |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for row in rows:
        print(f"| {row['method']} | {row['seq_len']} | {row['predicted_bytes'] / gib:.2f} | "
              f"{row['measured_bytes'] / gib:.2f} | {row['ratio']:.3f} | {'yes' if row['within_goal'] else 'NO'} | "
              f"{row['measured_reserved_bytes'] / gib:.2f} |")  # fmt: skip
    if not qlora:
        print("QLoRA NOT measured: bitsandbytes does not import (carry its wheel with --bnb-wheel)")
    print(json.dumps(rows))


if __name__ == "__main__":
    sys.exit(main())
