"""Inference on a real GPU: a ~0.5B Qwen3 with random bf16 weights and a rank-16 LoRA, through transformers + peft
(always) and vLLM (when it is installed). Self-contained: torch, transformers and peft; the repository's tiny-model
kit only for the tokenizer; vLLM optional. See benchmarks/gpu/README.md for running it on a lent GPU machine.

What it builds (in a temporary folder, seeded): the kit's byte-level BPE tokenizer and ChatML template, and a
``Qwen3ForCausalLM`` shaped like Qwen3-0.6B (28 layers, hidden 1024, 16 query / 8 KV heads of 128) with a wider MLP
(4096) to make up for the kit's 1,024-token vocabulary: ~0.53B parameters, initialised on the GPU, saved as bf16
safetensors. Two rank-16 LoRA adapters on every projection, random (``init_lora_weights=False``, then N(0, 0.02)
so that they change the output without blowing it up), saved with ``save_pretrained``.

What it measures (greedy, EOS ignored, --max-tokens tokens, a kit chat prompt; medians over --repeat):
- hf (transformers + peft, what the hf engine does on CUDA): model load from disk to the GPU; the first adapter
  (wrap in a PeftModel, then load_adapter, as the engine does); hot-load of another adapter (load_adapter, then
  delete_adapter, --load-rounds times); TTFT (generate of 1 token); tokens/s for 1 sequence, 8 sequences in one
  batched ``generate``, and 8 sequences advanced one forward each per round (the hf engine's scheme: one KV cache
  per request); the yield: the whole PeftModel to CPU and back (``.to``), with the adapter's greedy output compared
  before and after; peak VRAM (``torch.cuda.max_memory_allocated``).
- vllm (``AsyncLLM`` with enable_lora and enable_sleep_mode, if importable): engine start; LoRA hot-load
  (``add_lora`` after ``remove_lora``); tokens/s for 1 and 8 concurrent requests (base and the two adapters);
  sleep level 1 and wake times, device memory freed by the sleep; the adapter's output right after the wake
  (vllm#53888 says it may stop applying) and after removing and adding it again (what the vllm engine does).

Results print as a table and a JSON blob; with $OUT set they are written to $OUT/inference_gpu.json.

    python benchmarks/gpu/inference_gpu.py [--max-tokens 64] [--repeat 3] [--vllm auto|on|off]
    python benchmarks/gpu/inference_gpu.py --dry-run          # no GPU: the kit's tiny model on the CPU, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import types
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM's default fork would copy a process that has already used CUDA; spawn is what the vllm engine uses too.
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines would bury the table

import torch

from benchmarks.common import percentile, print_table

GIB = 1 << 30
LORA_RANK = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = ("a", "b")


@dataclass(frozen=True)
class Shape:
    """The model built on the GPU (the dry run uses the kit's tiny defaults instead)."""

    hidden_size: int = 1024
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 4096
    max_position_embeddings: int = 4096


@dataclass(frozen=True)
class Setup:
    device: torch.device
    dtype: torch.dtype
    model_dir: Path
    adapter_dirs: dict[str, Path]
    prompt_ids: list[int]
    params: int


# ---------------------------------------------------------------------------------------------- small helpers


def import_kit() -> types.ModuleType:
    """``baton.models.tiny``. It takes only two exception classes from ``baton.runtime.errors``, which imports gRPC;
    a GPU image without gRPC gets plain stand-ins for that one module, so the kit still loads."""
    try:
        import baton.models.tiny as kit
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith(("grpc", "google")):
            raise
        stand_in = types.ModuleType("baton.runtime.errors")
        stand_in.InvalidArgument = type("InvalidArgument", (ValueError,), {})  # type: ignore[attr-defined]
        stand_in.FailedPrecondition = type("FailedPrecondition", (RuntimeError,), {})  # type: ignore[attr-defined]
        sys.modules["baton.runtime.errors"] = stand_in
        import baton.models.tiny as kit
    return kit


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56; the GPU image may have either."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of ``work`` with the device's queue drained before and after."""
    sync(device)
    started = time.perf_counter()
    result = work()
    sync(device)
    return time.perf_counter() - started, result


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- building


def build(root: Path, device: torch.device, dtype: torch.dtype, shape: Shape | None) -> Setup:
    """The model folder (the kit's tiny model when ``shape`` is None) and the two adapters."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kit = import_kit()
    tiny = kit.build_tiny_model(root / "tiny-qwen3")  # its tokenizer (and, for a dry run, the model itself)
    if shape is None:
        model_dir = tiny
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **dtype_kwarg(dtype)).to(device)
    else:
        model_dir = root / "qwen3-gpu"
        model = build_big_model(kit, tiny, model_dir, shape, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    adapter_dirs = save_random_adapters(model, model_dir, root / "adapters")
    del model
    free_device_memory(device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompt_ids = kit.chat_prompt_ids(tokenizer, kit.CHAT_PROMPTS[0])
    return Setup(device, dtype, model_dir, adapter_dirs, prompt_ids, params)


def build_big_model(
    kit: types.ModuleType, tiny: Path, folder: Path, shape: Shape, device: torch.device, dtype: torch.dtype
) -> Any:
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, folder / name)
    tokenizer = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    eos, pad = tokenizer.token_to_id(kit.IM_END), tokenizer.token_to_id(kit.ENDOFTEXT)
    config = Qwen3Config(
        vocab_size=tokenizer.get_vocab_size(),  # no padding rows: a random model would sample them
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds instead of a minute of CPU normal_()
        model = Qwen3ForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=[eos, pad], pad_token_id=pad)
    model.save_pretrained(str(folder))
    return model


def save_random_adapters(model: Any, model_dir: Path, root: Path) -> dict[str, Path]:
    """Rank-16 LoRAs on every projection, random but small; the base model is wrapped in place (then dropped)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=LORA_RANK,
        lora_alpha=2 * LORA_RANK,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = str(model_dir)
    folders = {}
    for seed, name in enumerate(ADAPTERS, start=1):
        generator = torch.Generator(device=model.device).manual_seed(seed)
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_" in param_name:
                    param.normal_(0.0, 0.02, generator=generator)
        folders[name] = root / name
        peft_model.save_pretrained(str(folders[name]))
    return folders


# ---------------------------------------------------------------------------------------------- hf


def greedy(model: Any, setup: Setup, batch: int, new_tokens: int) -> Any:
    ids = torch.tensor([setup.prompt_ids] * batch, device=setup.device)
    with torch.inference_mode():
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # EOS suppressed: the services' ignore_eos
            pad_token_id=model.generation_config.pad_token_id,
        )[:, ids.shape[1] :]


def generate_tps(model: Any, setup: Setup, batch: int, new_tokens: int, repeat: int) -> float:
    seconds = [timed(setup.device, lambda: greedy(model, setup, batch, new_tokens))[0] for _ in range(repeat)]
    return batch * new_tokens / median(seconds)


def rounds_tps(model: Any, setup: Setup, sequences: int, new_tokens: int) -> float:
    """The hf engine's scheme: each sequence has its own KV cache; a round advances each by one forward pass, and
    the round's tokens reach the host (to be streamed) before the next round."""
    ids = torch.tensor([setup.prompt_ids], device=setup.device)

    def run() -> None:
        caches: list[Any] = [None] * sequences
        tokens: list[Any] = [ids] * sequences
        for _ in range(new_tokens):
            for index in range(sequences):
                out = model(input_ids=tokens[index], past_key_values=caches[index], use_cache=True, logits_to_keep=1)
                caches[index] = out.past_key_values
                tokens[index] = out.logits[:, -1:].argmax(-1)
            torch.cat(tokens).tolist()

    with torch.inference_mode():
        seconds, _ = timed(setup.device, run)
    return sequences * new_tokens / seconds


def hf_phase(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    device, n = setup.device, args.max_tokens
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    load_s, model = timed(
        device,
        lambda: AutoModelForCausalLM.from_pretrained(
            str(setup.model_dir), **dtype_kwarg(setup.dtype), device_map=str(device)
        ),
    )
    model.eval()
    model.requires_grad_(False)
    greedy(model, setup, 8, 8)  # warm-up: kernels chosen, allocator primed
    out: dict[str, Any] = {"load_s": load_s}
    out["ttft_s"] = median([timed(device, lambda: greedy(model, setup, 1, 1))[0] for _ in range(args.repeat)])
    out["tokens_per_s_1"] = generate_tps(model, setup, 1, n, args.repeat)
    out["tokens_per_s_8_batched"] = generate_tps(model, setup, 8, n, args.repeat)
    out["tokens_per_s_8_rounds"] = rounds_tps(model, setup, 8, n)

    def wrap_and_load() -> Any:
        config = PeftConfig.from_pretrained(str(setup.adapter_dirs["a"]))
        config.inference_mode = True
        peft_model = PeftModel(model, config, adapter_name="a")
        peft_model.load_adapter(str(setup.adapter_dirs["a"]), adapter_name="a", is_trainable=False)
        return peft_model.eval()

    out["adapter_first_load_s"], peft_model = timed(device, wrap_and_load)
    hot: list[float] = []
    for _ in range(args.load_rounds):
        path = str(setup.adapter_dirs["b"])
        hot.append(timed(device, lambda p=path: peft_model.load_adapter(p, adapter_name="b", is_trainable=False))[0])
        peft_model.delete_adapter("b")  # "a" stays the active one
    out["adapter_hot_load_s"], out["adapter_hot_load_p90_s"] = median(hot), percentile(hot, 90)
    peft_model.set_adapter("a")
    out["tokens_per_s_1_adapter"] = generate_tps(peft_model, setup, 1, n, args.repeat)
    reference = greedy(peft_model, setup, 1, n).tolist()
    with peft_model.disable_adapter():
        out["adapter_changes_output"] = greedy(peft_model, setup, 1, n).tolist() != reference
    out.update(hf_yield(peft_model, setup, reference))
    if device.type == "cuda":
        out["peak_vram_bytes"] = torch.cuda.max_memory_allocated(device)
    return out  # the models go with this frame; the caller frees the device memory


def hf_yield(peft_model: Any, setup: Setup, reference: list[list[int]]) -> dict[str, Any]:
    """The hf engine's yield on CUDA: the whole model (LoRA layers included) to host memory and back."""
    device = setup.device

    def offload() -> None:
        peft_model.to("cpu")
        free_device_memory(device)

    out: dict[str, Any] = {"offload_s": timed(device, offload)[0]}
    if device.type == "cuda":
        out["vram_allocated_while_offloaded_bytes"] = torch.cuda.memory_allocated(device)
    out["restore_s"] = timed(device, lambda: peft_model.to(device))[0]
    after = greedy(peft_model, setup, 1, len(reference[0])).tolist()
    out["adapter_output_unchanged_after_restore"] = after == reference
    return out


# ---------------------------------------------------------------------------------------------- vllm


def vllm_phase(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    wanted = args.vllm == "on" or (args.vllm == "auto" and setup.device.type == "cuda")
    if not wanted:
        return {"status": f"skipped (--vllm {args.vllm} on {setup.device.type})"}
    try:
        import vllm
    except Exception as error:  # not installed, or installed for another platform
        return {"status": f"skipped: vllm does not import ({type(error).__name__}: {error})"}
    try:
        return {"status": "ok", "version": vllm.__version__, **asyncio.run(vllm_measure(setup, args))}
    except Exception as error:  # a failed vLLM run must not hide the hf results
        return {"status": f"failed: {type(error).__name__}: {error}"}
    finally:
        gc.collect()  # AsyncLLM.__del__ shuts down again; at interpreter exit that fails with a traceback


async def vllm_measure(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    cuda = setup.device.type == "cuda"
    engine_args = AsyncEngineArgs(
        model=str(setup.model_dir),
        dtype="bfloat16" if setup.dtype == torch.bfloat16 else "float32",
        max_model_len=1024,
        max_num_seqs=16,
        seed=0,
        enable_lora=True,
        max_lora_rank=LORA_RANK,
        max_loras=2,
        enable_sleep_mode=cuda,  # vLLM refuses sleep mode on CPU
        gpu_memory_utilization=args.vllm_memory_utilization,
        kv_cache_memory_bytes=None if cuda else GIB // 2,
        enforce_eager=args.vllm_enforce_eager,
        disable_log_stats=True,
    )
    started = time.perf_counter()
    engine = AsyncLLM.from_engine_args(engine_args)
    out: dict[str, Any] = {"start_s": time.perf_counter() - started}
    loras = {name: LoRARequest(name, index, str(setup.adapter_dirs[name])) for index, name in enumerate(ADAPTERS, 1)}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    prompt = TokensPrompt(prompt_token_ids=setup.prompt_ids)

    async def one(lora: Any) -> tuple[float, list[int]]:
        """(seconds to the first token, token ids) of one greedy request."""
        sent, first, tokens = time.perf_counter(), 0.0, []
        async for output in engine.generate(prompt, params, uuid.uuid4().hex, lora_request=lora):
            first = first or time.perf_counter()
            tokens = list(output.outputs[0].token_ids)
        return first - sent, tokens

    async def tps(count: int) -> float:
        mix = [None, loras["a"], loras["b"]]
        started = time.perf_counter()
        results = await asyncio.gather(*(one(mix[i % len(mix)] if count > 1 else None) for i in range(count)))
        return sum(len(tokens) for _, tokens in results) / (time.perf_counter() - started)

    try:
        started = time.perf_counter()
        await engine.add_lora(loras["a"])
        out["lora_first_load_s"] = time.perf_counter() - started
        hot = []
        for _ in range(args.load_rounds):
            await engine.remove_lora(loras["b"].lora_int_id)
            started = time.perf_counter()
            await engine.add_lora(loras["b"])
            hot.append(time.perf_counter() - started)
        out["lora_hot_load_s"], out["lora_hot_load_p90_s"] = median(hot), percentile(hot, 90)
        await tps(8)  # warm-up
        out["ttft_s"] = median([(await one(None))[0] for _ in range(args.repeat)])
        out["tokens_per_s_1"] = median([await tps(1) for _ in range(args.repeat)])
        out["tokens_per_s_8"] = median([await tps(8) for _ in range(args.repeat)])
        _, reference = await one(loras["a"])
        out["adapter_changes_output"] = (await one(None))[1] != reference
        if cuda:
            out.update(await vllm_sleep_wake(engine, one, loras["a"], reference, setup.device))
        else:
            out["sleep"] = "not measured: vLLM has no sleep mode on CPU (the vllm engine restarts instead)"
    finally:
        engine.shutdown()
    return out


async def vllm_sleep_wake(
    engine: Any, one: Callable[[Any], Any], lora: Any, reference: list[int], device: torch.device
) -> dict[str, Any]:
    """Sleep level 1 and wake; the adapter's output right after the wake and after removing and adding it again."""
    free_before, _ = torch.cuda.mem_get_info(device)  # device-wide: vLLM's memory lives in its engine process
    started = time.perf_counter()
    await engine.sleep(1)
    out: dict[str, Any] = {"sleep_level1_s": time.perf_counter() - started}
    out["sleep_freed_bytes"] = torch.cuda.mem_get_info(device)[0] - free_before
    started = time.perf_counter()
    await engine.wake_up()
    out["wake_s"] = time.perf_counter() - started
    out["adapter_output_unchanged_after_wake"] = (await one(lora))[1] == reference
    started = time.perf_counter()
    await engine.remove_lora(lora.lora_int_id)
    await engine.add_lora(lora)
    out["adapter_readd_s"] = time.perf_counter() - started
    out["adapter_output_unchanged_after_readd"] = (await one(lora))[1] == reference
    return out


# ---------------------------------------------------------------------------------------------- report


def environment(device: torch.device) -> dict[str, Any]:
    import peft
    import transformers

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


ROWS: tuple[tuple[str, str, str, float], ...] = (
    # label, hf key, vllm key, scale (1000 = shown in ms)
    ("engine start / model load, s", "load_s", "start_s", 1.0),
    ("first adapter load, ms", "adapter_first_load_s", "lora_first_load_s", 1000.0),
    ("adapter hot-load, median ms", "adapter_hot_load_s", "lora_hot_load_s", 1000.0),
    ("adapter hot-load, p90 ms", "adapter_hot_load_p90_s", "lora_hot_load_p90_s", 1000.0),
    ("TTFT (1 sequence), ms", "ttft_s", "ttft_s", 1000.0),
    ("tokens/s, 1 sequence", "tokens_per_s_1", "tokens_per_s_1", 1.0),
    ("tokens/s, 1 sequence with the adapter", "tokens_per_s_1_adapter", "", 1.0),
    ("tokens/s, 8 sequences (batched / concurrent)", "tokens_per_s_8_batched", "tokens_per_s_8", 1.0),
    ("tokens/s, 8 sequences, hf engine's rounds", "tokens_per_s_8_rounds", "", 1.0),
    ("yield: offload to CPU / sleep level 1, s", "offload_s", "sleep_level1_s", 1.0),
    ("wake: back to the GPU / wake_up, s", "restore_s", "wake_s", 1.0),
    ("adapter re-add after wake, ms", "", "adapter_readd_s", 1000.0),
    ("VRAM freed by the yield, GiB", "", "sleep_freed_bytes", 1.0 / GIB),
    ("VRAM left while yielded, GiB", "vram_allocated_while_offloaded_bytes", "", 1.0 / GIB),
    ("peak VRAM allocated, GiB", "peak_vram_bytes", "", 1.0 / GIB),
)
CHECKS = (
    ("adapter changes the output", "adapter_changes_output", "adapter_changes_output"),
    ("adapter output unchanged after the wake", "adapter_output_unchanged_after_restore",
     "adapter_output_unchanged_after_wake"),
    ("... after removing and adding it again", "", "adapter_output_unchanged_after_readd"),
)  # fmt: skip


def cell(results: dict[str, Any], key: str, scale: float = 1.0) -> object:
    value = results.get(key) if key else None
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    return value * scale


def report(results: dict[str, Any]) -> None:
    hf, vllm = results["hf"], results["vllm"]
    rows = [[label, cell(hf, h, scale), cell(vllm, v, scale)] for label, h, v, scale in ROWS]
    rows += [[label, cell(hf, h), cell(vllm, v)] for label, h, v in CHECKS]
    model = results["model"]
    print_table(
        f"{results['environment']['device']}: Qwen3 {model['params'] / 1e6:.0f}M random {model['dtype']}, rank-"
        f"{LORA_RANK} LoRA, greedy {results['max_tokens']} tokens, medians over {results['repeat']} "
        f"(vllm: {vllm['status']})",
        ["measure", "hf (transformers+peft)", "vllm"],
        rows,
    )


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="no GPU needed: the kit's tiny model on the CPU")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per sequence (EOS ignored)")
    parser.add_argument("--repeat", type=int, default=3, help="repeats of each timing (medians)")
    parser.add_argument("--load-rounds", type=int, default=5, help="adapter hot-loads timed")
    parser.add_argument("--layers", type=int, default=Shape.num_layers, help="decoder layers of the GPU model")
    parser.add_argument("--vllm", choices=("auto", "on", "off"), default="auto", help="auto: if CUDA and importable")
    parser.add_argument("--vllm-memory-utilization", type=float, default=0.3, help="vLLM gpu_memory_utilization")
    parser.add_argument("--vllm-enforce-eager", action="store_true", help="vLLM without CUDA graphs / compile")
    parser.add_argument("--out", type=Path, default=None, help="JSON file [$OUT/inference_gpu.json if $OUT is set]")
    args = parser.parse_args()
    if args.dry_run:
        args.max_tokens, args.repeat, args.load_rounds = min(args.max_tokens, 16), 1, 2
        torch.set_num_threads(1)  # the tiny model's matrices are too small for a second thread to help
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run it on a GPU machine, or pass --dry-run to exercise the code on the CPU")
    out_path = args.out or (Path(os.environ["OUT"]) / "inference_gpu.json" if os.environ.get("OUT") else None)

    started = time.perf_counter()
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    shape = None if args.dry_run else Shape(num_layers=args.layers)
    root = Path(tempfile.mkdtemp(prefix="inference-gpu-"))
    try:
        build_s, setup = timed(device, lambda: build(root, device, dtype, shape))
        print(f"built a {setup.params / 1e6:.0f}M-parameter model and {len(ADAPTERS)} adapters in {build_s:.1f} s")
        results: dict[str, Any] = {
            "environment": environment(device),
            "model": {"params": setup.params, "dtype": str(dtype).removeprefix("torch."), "build_s": build_s,
                      "shape": "kit tiny (dry run)" if shape is None else vars(shape)},
            "max_tokens": args.max_tokens,
            "repeat": args.repeat,
        }  # fmt: skip
        results["hf"] = hf_phase(setup, args)
        free_device_memory(device)  # vLLM sizes its cache from the free memory
        print(f"hf done at {time.perf_counter() - started:.0f} s", flush=True)
        results["vllm"] = vllm_phase(setup, args)
        results["total_s"] = time.perf_counter() - started
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(results)
    blob = json.dumps(results, indent=2, sort_keys=True, default=str)
    print(blob)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(blob + "\n", encoding="utf-8")
        print(f"written to {out_path}")


if __name__ == "__main__":
    main()
