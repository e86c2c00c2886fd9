"""The training loop's pure parts: the step plan and data order (a function of seed and step), the learning-rate
schedule, and how LoRA targets are resolved against a model (defaults, unknown names, MoE experts and router)."""

from __future__ import annotations

import itertools
import json
import logging
import math
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from baton.runtime.errors import InvalidArgument
from services.trainer.lora import first_kept_layer, interpolate_toward_base, layer_index, plan_lora
from services.trainer.run_spec import HyperSpec, JobSpec, LoraSpec, lr_factor, plan_steps, warmup_steps


def test_plan_counts_steps_from_epochs_and_max_steps() -> None:
    hyper = HyperSpec(micro_batch_size=4, grad_accumulation_steps=2)
    assert plan_steps(100, hyper).total_steps == 13  # 25 micro-batches per epoch, 2 per step
    assert plan_steps(100, HyperSpec(micro_batch_size=4, grad_accumulation_steps=2, epochs=2.0)).total_steps == 25
    assert plan_steps(100, HyperSpec(micro_batch_size=4, grad_accumulation_steps=2, max_steps=5)).total_steps == 5
    only_steps = HyperSpec(micro_batch_size=4, grad_accumulation_steps=2, max_steps=40, epochs=None)
    assert plan_steps(100, only_steps).total_steps == 40  # max_steps alone: as many epochs as it takes
    capped = HyperSpec(micro_batch_size=4, grad_accumulation_steps=2, max_steps=40, epochs=1.0)
    assert plan_steps(100, capped).total_steps == 13  # both: the first reached


def test_data_order_is_a_function_of_seed_and_position() -> None:
    plan = plan_steps(10, HyperSpec(micro_batch_size=3, grad_accumulation_steps=1, max_steps=8))
    first_epoch = [plan.micro_batch(i, seed=5) for i in range(plan.micro_batches_per_epoch)]
    assert sorted(i for batch in first_epoch for i in batch) == list(range(10))  # every block once per epoch
    assert [plan.micro_batch(i, seed=5) for i in range(8)] == [plan.micro_batch(i, seed=5) for i in range(8)]
    second_epoch = [plan.micro_batch(i, seed=5) for i in range(4, 8)]
    assert second_epoch != first_epoch  # reshuffled per epoch
    assert plan.micro_batch(0, seed=5) != plan.micro_batch(0, seed=6) or plan.micro_batch(1, 5) != plan.micro_batch(
        1, 6
    )


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedule_warms_up_then_decays(schedule: str) -> None:
    factors = [lr_factor(step, warmup=4, total=20, schedule=schedule) for step in range(20)]
    assert 0 < factors[0] < factors[3] < 1  # no wasted first step
    assert factors[4] == 1.0
    if schedule == "constant":
        assert factors[-1] == 1.0
    else:
        assert all(a >= b for a, b in itertools.pairwise(factors[4:])) and 0 < factors[-1] < 0.1
    assert warmup_steps(HyperSpec(warmup_ratio=0.1), 20) == 2
    assert warmup_steps(HyperSpec(warmup_steps=7), 20) == 7


def test_spec_fills_missing_and_null_fields_with_defaults() -> None:
    spec = JobSpec.from_json(
        {
            "base_model_path": "/m",
            "dataset": {"kind": "jsonl", "path": "/d.jsonl"},
            "lora": {"rank": 4, "target_modules": ["q_proj"], "alpha": None},
            "hyper": {"seq_len": 64, "max_steps": None},
        }
    )
    assert spec.lora == LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj",))  # alpha: 2 x rank
    assert spec.hyper.seq_len == 64 and spec.hyper.max_steps is None and spec.hyper.learning_rate == 2e-4
    assert spec.quantization.method == "nf4" and spec.device == "cpu"
    assert spec.quantization.compute_dtype == "float32" and spec.hyper.optimizer == "adamw_torch"
    on_gpu = JobSpec.from_json({"base_model_path": "/m", "dataset": {}, "device": "cuda", "hyper": {"optimizer": ""}})
    assert on_gpu.quantization.compute_dtype == "bfloat16" and on_gpu.hyper.optimizer == "paged_adamw_8bit"


def dense_model() -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    return Qwen3ForCausalLM(config)


def moe_model() -> torch.nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    return Qwen3MoeForCausalLM(config)


class _Layered(torch.nn.Module):
    """Parameters named as peft names them: model.layers.N.<module>.lora_B.default.weight, and one outside."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"q_proj": _lora_pair()}) for _ in range(layers))
        self.head = _lora_pair()


def _lora_pair() -> torch.nn.ModuleDict:
    return torch.nn.ModuleDict({name: torch.nn.Linear(2, 2, bias=False) for name in ("lora_A", "lora_B")})


def test_top_layers_keep_the_upper_share_and_return_the_rest_to_the_base() -> None:
    assert layer_index("base_model.model.model.layers.17.mlp.down_proj.lora_B.default.weight") == 17
    assert layer_index("base_model.model.lm_head.weight") is None
    model = _Layered(18)
    assert (first_kept_layer(model, 1.0), first_kept_layer(model, 0.5), first_kept_layer(model, 0.01)) == (0, 9, 17)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    assert interpolate_toward_base(model, 0.5, top_layers=0.5) == 19  # 18 layers' B and the one outside
    for name, param in model.named_parameters():
        layer = layer_index(name)
        factor = 1.0 if "lora_B" not in name else 0.0 if layer is not None and layer < 9 else 0.5
        assert torch.equal(param, before[name] * factor), name


def test_default_targets_are_the_attention_and_mlp_projections() -> None:
    plan = plan_lora(dense_model(), LoraSpec())
    assert plan.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert not plan.target_parameters and not plan.modules_to_save


def test_unknown_target_modules_list_the_valid_ones() -> None:
    with pytest.raises(InvalidArgument) as caught:
        plan_lora(dense_model(), LoraSpec(target_modules=("q_proj", "query_key_value")))
    error = caught.value
    assert error.reason == "UNKNOWN_TARGET_MODULES" and error.metadata["unknown"] == "query_key_value"
    assert "choose from down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in error.message
    assert "lm_head" not in error.metadata["valid"]


def test_moe_experts_and_router_are_options() -> None:
    model = moe_model()
    attention_only = plan_lora(model, LoraSpec())
    assert attention_only.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]  # fused experts: not Linear
    assert not attention_only.target_parameters and not attention_only.modules_to_save
    everything = plan_lora(model, LoraSpec(target_experts=True, train_router=True))
    assert everything.target_parameters == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert everything.modules_to_save == ["gate"]
    dense = plan_lora(dense_model(), LoraSpec(target_experts=True))
    assert any("no mixture-of-experts" in note for note in dense.notes)


def test_moe_adapter_on_experts_and_router_trains() -> None:
    from peft import LoraConfig, get_peft_model

    model = moe_model()
    plan = plan_lora(model, LoraSpec(target_experts=True, train_router=True))
    config = LoraConfig(
        r=2,
        target_modules=plan.target_modules,
        target_parameters=plan.target_parameters,
        modules_to_save=plan.modules_to_save,
        exclude_modules=plan.exclude_modules,
    )
    peft_model = get_peft_model(model, config)
    trainable = [name for name, param in peft_model.named_parameters() if param.requires_grad]
    assert any("experts" in name and "lora_A" in name for name in trainable)
    assert any("mlp.gate.modules_to_save" in name for name in trainable)
    ids = torch.randint(0, 300, (1, 8))
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert math.isfinite(float(loss.detach()))


@pytest.fixture
def restored_process_state() -> Iterator[None]:
    """worker.main configures logging and installs signal handlers for its process: undo both for pytest."""
    handlers, level = logging.getLogger().handlers[:], logging.getLogger().level
    signals = {signum: signal.getsignal(signum) for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    yield
    logging.getLogger().handlers[:] = handlers
    logging.getLogger().setLevel(level)
    for signum, handler in signals.items():
        signal.signal(signum, handler)


def test_out_of_memory_becomes_an_error_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restored_process_state: None
) -> None:
    from services.trainer import worker

    def out_of_memory(*args: object) -> int:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(worker, "_run", out_of_memory)
    (tmp_path / "events.jsonl").write_bytes(b'{"type": "step", "st')  # a line cut short by a kill -9
    assert worker.main(["worker", str(tmp_path)]) == worker.EXIT_FAILED
    lines = (tmp_path / "events.jsonl").read_text(encoding="utf-8").splitlines()
    event = json.loads(lines[-1])  # starts on a line of its own
    assert event["type"] == "error" and event["reason"] == "OUT_OF_MEMORY"
    assert "Tried to allocate 2.00 GiB" in event["message"] and "lower micro_batch_size" in event["message"]


def test_qlora_keeps_fused_moe_experts_in_half_precision() -> None:
    """prepare_model_for_kbit_training casts every unquantised parameter to fp32; fused experts must not grow."""
    from peft import prepare_model_for_kbit_training
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from services.trainer.lora import _fused_expert_dtypes, _restore_dtypes

    config = Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    model.is_loaded_in_4bit = True
    fused = _fused_expert_dtypes(model)
    assert fused and all("experts" in name for name in fused)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    _restore_dtypes(model, fused)
    dtypes = {name: parameter.dtype for name, parameter in model.named_parameters()}
    assert all(dtypes[name] == torch.bfloat16 for name in fused)
