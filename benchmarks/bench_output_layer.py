"""A decode step with the model's output layer as nn.Linear (the baseline) and weight first (what the hf engine
serves: ``baton.models.output_layer``), same weights, same process, alternated within each repeat.

Per repeat and row count: a prompt of --prompt random tokens is prefilled, then --steps decode steps of one token
per row are timed through transformers' forward with its cache (``logits_to_keep=1``, as the engine runs it).
Ratios are nn.Linear's time over weight-first's, paired per repeat, medians over --repeat.

    .venv/bin/python benchmarks/bench_output_layer.py                                  # Gemma 3 270M (make models)
    .venv/bin/python benchmarks/bench_output_layer.py --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from baton.models.output_layer import WeightFirstLinear
from benchmarks.common import median, print_table

ROWS = (1, 2, 8)


def step_ms(model: Any, rows: int, prompt: int, steps: int) -> float:
    import torch

    generator = torch.Generator().manual_seed(rows)
    ids = torch.randint(100, 1000, (rows, prompt), generator=generator)
    with torch.inference_mode():
        cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
        started = time.perf_counter()
        for _ in range(steps):
            token = torch.randint(100, 1000, (rows, 1), generator=generator)
            cache = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1).past_key_values
        return (time.perf_counter() - started) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m", help="a catalogue name prepared by `make models`")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=129, help="prompt tokens per row")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from baton.models.pretrained import models_dir, prepare

    torch.set_num_threads(args.threads)
    folder = prepare(args.model, models_dir(Path(__file__).resolve().parents[1] / "var"))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    plain = model.get_output_embeddings()
    heads = {"nn.Linear": plain, "weight first": WeightFirstLinear.sharing(plain)}
    times: dict[tuple[str, int], list[float]] = {}
    for repeat in range(args.repeat):
        for rows in ROWS:
            for name, head in heads.items():
                model.set_output_embeddings(head)
                times.setdefault((name, rows), []).append(step_ms(model, rows, args.prompt, args.steps))
        print(f"  repeat {repeat + 1}/{args.repeat} done")
    model.set_output_embeddings(plain)
    mib = plain.weight.numel() * plain.weight.element_size() / (1 << 20)
    table = []
    for rows in ROWS:
        base, fast = times[("nn.Linear", rows)], times[("weight first", rows)]
        ratio = median([b / f for b, f in zip(base, fast, strict=True)])
        table.append([f"{rows} row{'s' if rows > 1 else ''}", median(base), median(fast), ratio])
    print_table(
        f"one decode step, {args.model} (output layer {mib:.0f} MiB), {args.threads} threads, {args.repeat} repeats "
        "(medians; ratio = nn.Linear / weight first, paired per repeat)",
        ["rows", "nn.Linear ms (baseline)", "weight first ms", "speed-up"],
        table,
    )


if __name__ == "__main__":
    main()
