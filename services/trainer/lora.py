"""The model side of a training run: the base model (NF4 4-bit with bitsandbytes, or plain) on the job's device,
the LoRA plan resolved against the model (defaults, MoE experts and routers), peft's wrapping, the interpolation
toward the base, and the optimizer."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from baton.runtime.errors import FailedPrecondition, InvalidArgument
from services.trainer.run_spec import HyperSpec, JobSpec, LoraSpec, QuantSpec

# The attention and MLP projections of Llama/Qwen/Mistral-style models: the default LoRA targets.
DEFAULT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROUTER_NAMES = ("gate", "router")  # a MoE block's router, next to its `experts`
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


@dataclass(frozen=True)
class LoraPlan:
    """What peft is asked to adapt, as found in this model."""

    target_modules: list[str] | str
    target_parameters: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    exclude_modules: str | None = None
    notes: list[str] = field(default_factory=list)


def resolve_dtype(quant: QuantSpec) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[quant.compute_dtype]


def load_base_model(spec: JobSpec) -> torch.nn.Module:
    """The base model on the job's device: NF4 4-bit with bitsandbytes (QLoRA), or plain in the compute dtype."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the bars would fill the worker's log; events report progress
    dtype = resolve_dtype(spec.quantization)
    device = torch_device(spec.device)
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if spec.quantization.method == "nf4":
        kwargs["quantization_config"] = _nf4_config(spec.quantization, dtype)
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(str(spec.base_model_path), **kwargs)
    if spec.quantization.method != "nf4":
        model.to(device)
    _keep_cpu_4bit_layout_trainable(model)
    model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    return model


def _keep_cpu_4bit_layout_trainable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference during evaluation.

    On a CPU with AVX512-BF16, a Linear4bit forward in eval mode repacks its weight into an inference layout for
    good, and later training forwards then run a kernel without autograd (gradients stop flowing through the frozen
    layers: "gemv_4bit: an autograd kernel was not registered"). It would also make a run's numbers depend on
    whether an evaluation happened before a step, so a resumed run would drift from an uninterrupted one.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def torch_device(name: str) -> torch.device:
    if name == "cuda":
        if not torch.cuda.is_available():
            raise FailedPrecondition(
                "the job asks for cuda but torch sees no GPU here; use device cpu", reason="NO_GPU"
            )
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _nf4_config(quant: QuantSpec, dtype: torch.dtype) -> Any:
    try:
        import bitsandbytes  # noqa: F401  (the import is the check)
        from transformers import BitsAndBytesConfig
    except ImportError as error:
        raise FailedPrecondition(
            f"NF4 needs bitsandbytes, which does not import here ({error}); install it or use quantization none",
            reason="QUANT_UNSUPPORTED",
        ) from error
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names (``q_proj``) of the model's linear layers (bitsandbytes' 4-bit ones are nn.Linear subclasses),
    without the output head and MoE routers — the names peft's target_modules may use."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    routers = set(_router_paths(model))
    names = {
        path.rsplit(".", 1)[-1]
        for path, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head and path not in routers
    }
    return sorted(names)


def _experts_paths(model: torch.nn.Module) -> list[str]:
    return [path for path, _ in model.named_modules() if path.rsplit(".", 1)[-1] == "experts"]


def _router_paths(model: torch.nn.Module) -> list[str]:
    found = []
    for path, module in model.named_modules():
        children = dict(module.named_children())
        if "experts" in children:
            found += [f"{path}.{name}" if path else name for name in ROUTER_NAMES if name in children]
    return found


def plan_lora(model: torch.nn.Module, lora: LoraSpec) -> LoraPlan:
    """Resolve the LoRA targets against the model: defaults, validation, MoE experts and router options."""
    linear = linear_module_names(model)
    notes: list[str] = []
    if lora.target_modules == ("all-linear",):
        targets: list[str] | str = "all-linear"
    elif lora.target_modules:
        unknown = sorted(set(lora.target_modules) - set(linear))
        if unknown:
            raise InvalidArgument(
                f"target modules {', '.join(unknown)} are not linear layers of this model; "
                f"choose from {', '.join(linear)} (or all-linear), or leave target_modules empty for the defaults",
                reason="UNKNOWN_TARGET_MODULES",
                metadata={"unknown": ",".join(unknown), "valid": ",".join(linear)},
            )
        targets = sorted(lora.target_modules)
    else:
        targets = [name for name in DEFAULT_PROJECTIONS if name in linear] or linear
    experts = _experts_paths(model)
    plan = LoraPlan(targets, notes=notes)
    if not experts:
        if lora.target_experts or lora.train_router:
            notes.append("target_experts/train_router ignored: the model has no mixture-of-experts layers")
        return plan
    return _moe_plan(model, lora, plan, experts)


def _moe_plan(model: torch.nn.Module, lora: LoraSpec, plan: LoraPlan, experts: list[str]) -> LoraPlan:
    modules = dict(model.named_modules())
    fused = sorted(
        {
            f"{path.rsplit('.', 2)[-2]}.experts.{name}" if "." in path else f"experts.{name}"
            for path in experts
            for name, param in modules[path].named_parameters(recurse=False)
            if param.dim() == 3
        }
    )
    notes = list(plan.notes)
    target_parameters: list[str] = []
    # Experts as separate nn.Linear layers (older layouts) match the projection names: keep them out unless asked.
    exclude = None if lora.target_experts else r".*\.experts\..*"
    if lora.target_experts and fused:
        # transformers 5 fuses the experts into 3-D parameters (not nn.Linear): peft adapts them by parameter name.
        target_parameters = fused
        notes.append(f"LoRA on the fused expert weights {', '.join(fused)} (peft target_parameters)")
    modules_to_save = sorted({path.rsplit(".", 1)[-1] for path in _router_paths(model)}) if lora.train_router else []
    if lora.train_router:
        # The router is small and not a LoRA target: a full trainable copy is saved with the adapter.
        notes.append(f"router trained in full and saved with the adapter ({', '.join(modules_to_save)})")
    return LoraPlan(plan.target_modules, target_parameters, modules_to_save, exclude, notes)


def _fused_expert_dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    """Half-precision fused MoE expert weights (3-D parameters; bitsandbytes does not quantise them)."""
    half = (torch.bfloat16, torch.float16)
    return {name: p.dtype for name, p in model.named_parameters() if p.ndim >= 3 and p.dtype in half}


def _restore_dtypes(model: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    # prepare_model_for_kbit_training casts every non-quantised parameter to fp32. For a MoE model whose experts are
    # fused 3-D tensors (transformers 5) that is most of the model: "QLoRA" would then need more memory than bf16
    # LoRA. The experts are frozen, so they go back to their half precision.
    for name, parameter in model.named_parameters():
        if name in dtypes and not parameter.requires_grad:
            parameter.data = parameter.data.to(dtypes[name])


def wrap_with_lora(model: torch.nn.Module, spec: JobSpec, plan: LoraPlan) -> Any:
    """prepare_model_for_kbit_training (NF4) or gradient checkpointing (plain), then peft's LoRA on the plan."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    gc_kwargs = {"use_reentrant": False}  # the non-reentrant form keeps dropout's RNG replay exact
    if spec.quantization.method == "nf4":
        fused = _fused_expert_dtypes(model)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=spec.hyper.gradient_checkpointing,
            gradient_checkpointing_kwargs=gc_kwargs,
        )
        _restore_dtypes(model, fused)
    elif spec.hyper.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    config = LoraConfig(
        r=spec.lora.rank,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=plan.target_modules,
        target_parameters=plan.target_parameters or None,
        modules_to_save=plan.modules_to_save or None,
        exclude_modules=plan.exclude_modules,
        use_rslora=spec.lora.use_rslora,
        task_type=TaskType.CAUSAL_LM,
    )
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = str(spec.base_model_path)
    return peft_model


def interpolate_toward_base(model: torch.nn.Module, strength: float, top_layers: float = 1.0) -> int:
    """Scale every LoRA B matrix by ``strength``: the adapter's update B·A becomes strength × the trained one.

    That is a weight-space interpolation between the base model (0) and the trained adapter (1), as WiSE-FT does
    between a model and its fine-tuned copy. A fine-tuned model overshoots toward its small corpus; part of the way
    back keeps most of what it learned and forgets less of everything else (measured on the bundled corpus: see
    docs/demo.md, "The demo's numbers"). Scaling B rather than lora_alpha keeps adapter_config.json as trained and
    serves the same in every engine. Returns how many matrices were scaled.

    ``top_layers`` below 1 keeps the update of that share of the decoder's layers, counted from the top, and sets
    the B matrices of the layers beneath to zero: those layers are the base model's again. (Measured there too: the
    lower half's update carried most of the forgetting and little of the author's stance.) A LoRA module outside
    the numbered layers keeps ``strength``.
    """
    first_kept = first_kept_layer(model, top_layers)
    scaled = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                layer = layer_index(name)
                param.mul_(0.0 if layer is not None and layer < first_kept else strength)
                scaled += 1
    return scaled


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(parameter_name: str) -> int | None:
    """The decoder layer a parameter belongs to ("...model.layers.7.self_attn.q_proj.lora_B..." -> 7), if any."""
    match = _LAYER.search(parameter_name)
    return int(match.group(1)) if match else None


def first_kept_layer(model: torch.nn.Module, top_layers: float) -> int:
    """The lowest layer whose update ``top_layers`` keeps: 18 layers and 0.5 keep 9-17; 1 keeps them all."""
    layers = {index for name, _ in model.named_parameters() if (index := layer_index(name)) is not None}
    count = max(layers) + 1 if layers else 0
    return count - max(1, round(count * top_layers)) if count else 0


def make_optimizer(name: str, params: list[torch.nn.Parameter], hyper: HyperSpec, device: str) -> Any:
    if name not in OPTIMIZERS:
        raise InvalidArgument(
            f"optimizer {name!r} is unknown; use one of {', '.join(OPTIMIZERS)}", reason="UNKNOWN_OPTIMIZER"
        )
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=hyper.learning_rate, weight_decay=hyper.weight_decay)
    if device != "cuda":
        raise InvalidArgument(
            f"optimizer {name} (bitsandbytes) needs a GPU; use adamw_torch on the CPU", reason="UNKNOWN_OPTIMIZER"
        )
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}.get(
        name, bnb.optim.PagedAdamW32bit
    )
    return cls(params, lr=hyper.learning_rate, weight_decay=hyper.weight_decay)
