"""The hf engine alone, in-process: does its batching keep up with transformers' own batched ``generate``?

No service, no gRPC: ``HfEngine.generate`` driven directly, so the figure is the engine's scheduling and batching,
not the transport (``bench_inference.py`` measures the service end to end). Per repeat, on the same chat prompt,
greedy, ``ignore_eos``, --max-tokens tokens:

- engine, 1 stream and 8 concurrent streams: aggregate tokens/s;
- baselines in the same repeat: ``model.generate`` on 1 prompt and on a batch of the same 8 prompts (no padding).

Ratios are paired within a repeat, medians over --repeat. Goal (issue 17): 8 streams >= 5x one stream, and >= 1.0x
``generate`` on a batch of 8.

    .venv/bin/python benchmarks/bench_hf_engine.py                                  # the tiny Qwen3, built here
    .venv/bin/python benchmarks/bench_hf_engine.py --model smollm2-135m-instruct    # prepared by `make models`
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from baton.models.tiny import CHAT_PROMPTS, build_tiny_model, chat_prompt_ids
from benchmarks.common import median, print_table
from services.inference.engine import EngineConfig, EngineRequest, Sampling
from services.inference.engines.hf_engine import HfEngine

STREAMS = 8


def model_folder(name: str, root: Path) -> Path:
    if name == "tiny":
        return build_tiny_model(root / "tiny-qwen3", seed=0)
    from baton.models.pretrained import models_dir, prepare

    return prepare(name, models_dir(Path(__file__).resolve().parents[1] / "var"))


async def engine_tps(engine: HfEngine, ids: list[int], streams: int, max_tokens: int) -> float:
    async def one(index: int) -> int:
        sampling = Sampling(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        request = EngineRequest(f"r{index}-{time.monotonic_ns()}", ids, sampling)
        return sum([len(delta.token_ids) async for delta in engine.generate(request)])

    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(index) for index in range(streams))))
    return tokens / (time.perf_counter() - started)


def generate_tps(model: Any, tokenizer: Any, ids: list[int], batch: int, max_tokens: int) -> float:
    import torch

    input_ids = torch.tensor([ids] * batch)
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
            max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    return batch * max_tokens / (time.perf_counter() - started)


async def run(args: argparse.Namespace, folder: Path) -> list[dict[str, float]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    # A base model without a chat template (Gemma 3 270M) gets the prompt as plain text.
    prompt = CHAT_PROMPTS[0]
    ids = chat_prompt_ids(tokenizer, prompt) if tokenizer.chat_template else tokenizer(prompt).input_ids
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    config = EngineConfig(
        model_path=folder, device="cpu", dtype="float32", max_model_len=len(ids) + args.max_tokens + 8,
        max_concurrent_requests=STREAMS,
    )  # fmt: skip
    engine = HfEngine(config)
    await engine.start()
    repeats = []
    try:
        await engine_tps(engine, ids, STREAMS, 4)  # warm-up, both sides
        generate_tps(model, tokenizer, ids, STREAMS, 4)
        for repeat in range(args.repeat):
            measured = {
                "engine_1": await engine_tps(engine, ids, 1, args.max_tokens),
                "engine_8": await engine_tps(engine, ids, STREAMS, args.max_tokens),
                "generate_1": generate_tps(model, tokenizer, ids, 1, args.max_tokens),
                "generate_8": generate_tps(model, tokenizer, ids, STREAMS, args.max_tokens),
            }
            print(f"  repeat {repeat + 1}/{args.repeat}: " + ", ".join(f"{k} {v:.0f}" for k, v in measured.items()))
            repeats.append(measured)
    finally:
        await engine.shutdown()
    return repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="tiny", help="tiny (built here) or a catalogue name prepared by `make models`"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (engine and baseline alike)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hf-engine-") as root:
        repeats = asyncio.run(run(args, model_folder(args.model, Path(root))))

    def ratio(top: str, bottom: str) -> float:
        return median([repeat[top] / repeat[bottom] for repeat in repeats])

    def tps(key: str) -> float:
        return median([repeat[key] for repeat in repeats])

    print_table(
        f"hf engine in-process, {args.model}, greedy, {args.max_tokens} tokens, {args.repeat} repeats (medians; "
        "ratios paired per repeat)",
        ["measure", "tokens/s", "ratio", "ratio ="],
        [
            ["generate, 1 prompt (baseline)", tps("generate_1"), 1.0, "-"],
            ["generate, batch of 8 (baseline)", tps("generate_8"), 1.0, "-"],
            ["engine, 1 stream", tps("engine_1"), ratio("engine_1", "generate_1"), "engine / generate 1"],
            ["engine, 8 streams", tps("engine_8"), ratio("engine_8", "generate_8"), "engine / generate batch 8"],
            ["engine, 8 streams vs 1", "-", ratio("engine_8", "engine_1"), "8 streams / 1 stream"],
        ],
    )
    for label, value, goal in (
        ("8 streams / 1 stream", ratio("engine_8", "engine_1"), 5.0),
        ("8 streams / generate batch of 8", ratio("engine_8", "generate_8"), 1.0),
    ):
        print(f"  goal: {label} >= {goal:g}x -> {'met' if value >= goal else 'NOT met'} ({value:.2f}x)")


if __name__ == "__main__":
    main()
