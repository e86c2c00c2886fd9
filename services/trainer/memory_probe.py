"""Measure the peak memory of a few training steps with the trainer's own code: the ground truth the planner's
estimates are checked against (tests/integration/test_planner_measured.py, benchmarks/gpu/planner_check.py).

Run it as its own process, so that nothing else has touched the heap::

    python -m services.trainer.memory_probe --model DIR --method nf4 --seq-len 512 --micro-batch 2 --steps 3

It loads the model, adds the LoRA and the optimizer exactly as a job would (``TrainingRun.setup``), then resets the
peak counters and runs ``--steps`` optimizer steps on random token blocks. On a CPU the peak is the process's
high-water RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) minus its RSS before the model was loaded, so it
counts what training allocates — weights, LoRA, optimizer, activations, logits — and not the Python runtime; glibc's
heap is set to return freed tensors at once (see ``_track_live_memory``). On a GPU it is
``torch.cuda.max_memory_allocated``. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.glibc_default_heap:
        _track_live_memory()
    import torch

    from baton.runtime.files import model_config
    from services.trainer.dataset import BuiltDataset, DatasetStats
    from services.trainer.run_spec import JobSpec
    from services.trainer.training import TrainingRun

    config = model_config(args.model)
    vocab = int(config.get("text_config", config)["vocab_size"])
    spec = JobSpec.from_json(_spec_json(args))
    blocks = _random_blocks(vocab, args.seq_len, args.micro_batch * args.steps, seed=0)
    stats = DatasetStats(0, 0, 0, len(blocks), 0, len(blocks) * args.seq_len, 0, "probe", "text")  # type: ignore[arg-type]
    data = BuiltDataset(train=blocks, eval=[], stats=stats, pad_token_id=0)
    torch.set_num_threads(args.threads)
    cuda = spec.device == "cuda"
    _import_training_libraries(config)
    baseline = _rss_bytes("VmRSS")
    with tempfile.TemporaryDirectory(prefix="baton-probe-") as job_dir:
        run = TrainingRun(spec, data, Path(job_dir), emit=lambda _event: None, should_stop=lambda: False)
        run.setup()
        _release_free_memory()
        after_setup = _rss_bytes("VmRSS")
        _reset_peaks(cuda)
        started = time.perf_counter()
        for _ in range(args.steps):
            run.step_once()
        seconds = time.perf_counter() - started
        peak_rss = _rss_bytes("VmHWM")
        result: dict[str, Any] = {
            "baseline_rss_bytes": baseline,
            "after_setup_rss_bytes": after_setup,
            "peak_rss_bytes": peak_rss,
            "peak_over_baseline_bytes": peak_rss - baseline,
            "cuda_peak_allocated_bytes": int(torch.cuda.max_memory_allocated()) if cuda else 0,
            "cuda_peak_reserved_bytes": int(torch.cuda.max_memory_reserved()) if cuda else 0,
            "steps": args.steps,
            "tokens_per_s": args.steps * args.micro_batch * args.seq_len / seconds,
            "loss": run.history.steps[-1]["loss"] if run.history.steps else None,
        }
    print(json.dumps(result))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.trainer.memory_probe",
        description="Peak memory of a few training steps (the trainer's code, random data); prints JSON.",
    )
    parser.add_argument("--model", type=Path, required=True, help="a local model folder (config, tokenizer, weights)")
    parser.add_argument("--method", choices=("nf4", "none"), default="nf4", help="nf4 = QLoRA, none = plain LoRA")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="[fp32 on cpu]")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (the optimizer allocates on the first)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--optimizer", default=None, help="[adamw_torch on cpu, paged_adamw_8bit on cuda]")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--glibc-default-heap",
        action="store_true",
        help="keep glibc's dynamic mmap threshold (RSS then also counts freed blocks the heap keeps)",
    )
    return parser


def _spec_json(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "job_id": "probe",
        "name": "probe",
        "base_model_path": str(args.model),
        "dataset": {},
        "device": args.device,
        "lora": {"rank": args.rank, "dropout": args.dropout},
        "quantization": {"method": args.method, "compute_dtype": args.dtype},
        "hyper": {
            "seq_len": args.seq_len,
            "micro_batch_size": args.micro_batch,
            "grad_accumulation_steps": 1,
            "max_steps": args.steps,
            "gradient_checkpointing": not args.no_gradient_checkpointing,
            "optimizer": args.optimizer,
            "checkpoint_every_steps": 10**9,
        },
    }


def _random_blocks(vocab: int, seq_len: int, count: int, *, seed: int) -> list[Any]:
    from services.trainer.dataset import Block

    rng = random.Random(seed)
    blocks = []
    for _ in range(count):
        ids = [rng.randrange(vocab) for _ in range(seq_len)]
        blocks.append(Block(input_ids=ids, labels=list(ids)))
    return blocks


def _import_training_libraries(config: dict[str, Any]) -> None:
    """Import what loading and training import lazily, so the baseline holds the libraries and not the job."""
    import bitsandbytes.nn  # noqa: F401
    import peft  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model(**config))]
    del model_class
    _release_free_memory()


def _track_live_memory() -> None:
    """Make RSS follow the live tensors, as ``max_memory_allocated`` does on a GPU.

    glibc raises its mmap threshold after each large free (up to 32 MiB), so freed activations stay in the heap and
    RSS shows heap fragmentation on top of the tensors (measured: 1.6-2.2x the live peak on tiny models). A fixed
    threshold (which also switches the dynamic one off) gives every tensor above 128 KiB its own mapping, returned
    to the OS when freed."""
    m_mmap_threshold = -3
    with contextlib.suppress(OSError):  # not glibc: RSS then counts the heap's freed blocks too
        ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 128 * 1024)


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_free_memory() -> None:
    """Hand freed heap back to the OS, so the loader's temporaries do not count as training memory."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: the baseline is a little high, the check still holds
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peaks(cuda: bool) -> None:
    Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    sys.exit(main())
