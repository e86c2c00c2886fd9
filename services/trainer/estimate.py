"""The resource estimate of a training job: a simple, documented formula (the planner issue will refine it).

Peak GPU memory (the TRAINING lease asks for this unless the job overrides it)::

    weights      = linear params x (0.5 B for NF4 + quantisation constants: 0.127 bit/param with double
                   quantisation, 0.5 bit without) + the other params (embeddings, norms, lm_head stay unquantised)
                   x compute-dtype bytes;  without quantisation every param x compute-dtype bytes
    lora         = LoRA params x (4 B fp32 weight + 8 B Adam moments + 4 B gradient) = x 16 B,
                   LoRA params = rank x (in + out) summed over the adapted linear modules
    activations  = micro_batch x seq_len x hidden x 34 B x (dtype bytes / 2) per layer (Korthikanti et al., 2022,
                   without the attention-score term that flash/SDPA attention avoids); with gradient checkpointing
                   only each layer's input is kept (2 B x dtype/2 per element) plus one layer recomputed:
                   micro_batch x seq_len x hidden x (2 x layers + 34) x (dtype bytes / 2)
    logits       = micro_batch x seq_len x vocab x 8 B (fp32 logits and their gradient)
    overhead     = 512 MiB (CUDA context, allocator slack)

Host memory: on CPU the same sum plus 1.5 GiB (Python, torch, tokenizer, dataset); on a GPU 3 GiB plus the largest
weight shard (loaded through host memory). Disk: the adapter (LoRA params x 4 B) plus ``keep_checkpoints``
checkpoints (weights and two Adam moments: x 12 B each) plus 16 MiB of metadata, events and plots. Duration is
unknown (0) until the dataset is built and the first steps are timed.
"""

from __future__ import annotations

from services.trainer.basemodel import BaseModelFacts, LinearModule
from services.trainer.model import Estimate, JobSpec

MIB = 1 << 20
GIB = 1 << 30
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_ACTIVATION_BYTES_PER_ELEMENT_16BIT = 34
_CUDA_OVERHEAD = 512 * MIB


def adapted_modules(facts: BaseModelFacts, spec: JobSpec) -> list[LinearModule]:
    """The linear modules the job's LoRA covers (experts only with target_experts; never the router)."""
    lora = spec.lora
    if "all-linear" in lora.target_modules:
        chosen = [m for m in facts.linear_modules if m.name != "lm_head"]
    else:
        names = lora.target_modules or [n for n in DEFAULT_TARGETS if n in facts.linear_names]
        chosen = list({m.path: m for name in names for m in facts.matching(name)}.values())
    if not lora.target_experts:
        chosen = [m for m in chosen if ".experts." not in m.path]
    return chosen


def lora_params(facts: BaseModelFacts, spec: JobSpec) -> int:
    rank = spec.lora.rank or 16
    return sum(rank * (m.in_features + m.out_features) for m in adapted_modules(facts, spec))


def estimate(facts: BaseModelFacts, spec: JobSpec, *, device: str) -> Estimate:
    quant, hyper = spec.quantization, spec.hyperparameters
    dtype_bytes = _DTYPE_BYTES.get(quant.compute_dtype or "float32", 4)
    if quant.method == "none":
        weights = facts.total_params * dtype_bytes
    else:
        constants_bits = 0.127 if quant.double_quant else 0.5
        linear = facts.linear_params
        weights = int(linear * (0.5 + constants_bits / 8)) + (facts.total_params - linear) * dtype_bytes
    lora = lora_params(facts, spec)
    tokens = (hyper.micro_batch_size or 1) * (hyper.seq_len or 1024)
    per_element = _ACTIVATION_BYTES_PER_ELEMENT_16BIT * dtype_bytes / 2
    if hyper.gradient_checkpointing:
        activations = tokens * facts.hidden_size * (2 * facts.num_layers + 34) * dtype_bytes / 2
    else:
        activations = tokens * facts.hidden_size * facts.num_layers * per_element
    logits = tokens * facts.vocab_size * 8
    peak = int(weights + lora * 16 + activations + logits + _CUDA_OVERHEAD)
    ram = peak + int(1.5 * GIB) if device == "cpu" else 3 * GIB + facts.largest_shard_bytes
    disk = lora * 4 + (hyper.keep_checkpoints or 2) * lora * 12 + 16 * MIB
    return Estimate(vram_bytes=peak, ram_bytes=ram, disk_bytes=disk, duration_s=0.0)
