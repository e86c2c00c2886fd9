"""What the planner knows about a model: its architecture, read from the fields of a Hugging Face ``config.json``.

Everything is counted from the config alone (no weights), so a plan for a 60 GB model costs microseconds. Parameter
counts follow the standard decoder layout (Llama, Qwen2/3, Mistral, Mixtral, Qwen3-MoE): per layer the attention
projections q/k/v/o, then either a gated MLP (gate/up/down) or a mixture of experts (a router and ``num_experts``
gated MLPs, of which ``experts_per_token`` run per token), RMS norms; embeddings and the output head at the ends.
The bundled catalogue's totals are checked against the published sizes in tests/unit/test_planner.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from baton.runtime.errors import InvalidArgument

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}


class LinearShape(BaseModel):
    """One kind of linear layer: its name (as peft targets it), shape and how many the model has."""

    model_config = ConfigDict(frozen=True)

    name: str
    in_features: int
    out_features: int
    count: int  # instances in the whole model
    expert: bool = False  # inside a mixture-of-experts block (one per expert per MoE layer)

    @property
    def params(self) -> int:
        return self.in_features * self.out_features * self.count


class ModelArch(BaseModel):
    """A decoder-only language model's shape: the ``config.json`` fields the planner needs."""

    model_config = ConfigDict(frozen=True)

    name: str = Field("custom", description="A label for reports.")
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(0, ge=0, description="Width of the dense MLP (layers that are not MoE).")
    vocab_size: int = Field(gt=0)
    tie_word_embeddings: bool = False
    num_experts: int = Field(0, ge=0)
    experts_per_token: int = Field(0, ge=0)
    moe_intermediate_size: int = Field(0, ge=0)
    moe_layers: int = Field(0, ge=0, description="How many layers hold experts (the rest are dense).")
    shared_expert_intermediate_size: int = Field(0, ge=0)
    max_position_embeddings: int = Field(0, ge=0)
    weights_dtype: str = Field("bfloat16", description="The dtype of the published weights (torch_dtype).")
    fused_experts: bool = Field(
        True,
        description="Experts stored as one 3-D parameter per layer (transformers 5): bitsandbytes does not "
        "quantise them and peft does not target them by module name.",
    )

    @classmethod
    def from_config(cls, config: Mapping[str, Any], name: str = "custom") -> ModelArch:
        """Read a ``config.json`` dict (multimodal wrappers keep the language model's config in ``text_config``).
        Anything unusable is an INVALID_ARGUMENT (BAD_MODEL_CONFIG) that names the field."""
        try:
            return cls._from_config(config, name)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            raise InvalidArgument(f"config.json: {problems}", reason="BAD_MODEL_CONFIG") from None
        except (TypeError, ValueError, ZeroDivisionError, AttributeError) as error:
            raise InvalidArgument(
                f"config.json has a field of the wrong type or value ({error}); give the model's own config.json",
                reason="BAD_MODEL_CONFIG",
            ) from None

    @classmethod
    def _from_config(cls, config: Mapping[str, Any], name: str) -> ModelArch:
        text = config.get("text_config") or config
        try:
            hidden = int(text["hidden_size"])
            layers = int(text["num_hidden_layers"])
            heads = int(text["num_attention_heads"])
            vocab = int(text["vocab_size"])
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidArgument(
                f"config.json lacks a usable {error}: the planner needs hidden_size, num_hidden_layers, "
                "num_attention_heads and vocab_size (a decoder-only language model's config)",
                reason="BAD_MODEL_CONFIG",
            ) from None
        experts = int(text.get("num_experts") or text.get("num_local_experts") or text.get("n_routed_experts") or 0)
        return cls(
            name=name,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or hidden // heads),
            intermediate_size=int(text.get("intermediate_size") or 0),
            vocab_size=vocab,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            num_experts=experts,
            experts_per_token=int(text.get("num_experts_per_tok") or 0) if experts else 0,
            moe_intermediate_size=int(text.get("moe_intermediate_size") or text.get("intermediate_size") or 0)
            if experts
            else 0,
            moe_layers=_moe_layer_count(text, layers) if experts else 0,
            shared_expert_intermediate_size=int(text.get("shared_expert_intermediate_size") or 0),
            max_position_embeddings=int(text.get("max_position_embeddings") or 0),
            weights_dtype=str(
                text.get("torch_dtype") or config.get("torch_dtype") or config.get("dtype") or "bfloat16"
            ),
        )

    # ------------------------------------------------------------------------------------------------ shapes

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def dense_layers(self) -> int:
        return self.num_layers - self.moe_layers

    @property
    def is_moe(self) -> bool:
        return self.moe_layers > 0

    def linear_shapes(self) -> list[LinearShape]:
        """Every linear layer kind with its count (embeddings and the output head excluded)."""
        h, layers = self.hidden_size, self.num_layers
        shapes = [
            LinearShape(name="q_proj", in_features=h, out_features=self.q_dim, count=layers),
            LinearShape(name="k_proj", in_features=h, out_features=self.kv_dim, count=layers),
            LinearShape(name="v_proj", in_features=h, out_features=self.kv_dim, count=layers),
            LinearShape(name="o_proj", in_features=self.q_dim, out_features=h, count=layers),
        ]
        if self.dense_layers and self.intermediate_size:
            shapes += _gated_mlp(h, self.intermediate_size, self.dense_layers, expert=False)
        if self.moe_layers:
            shapes += _gated_mlp(h, self.moe_intermediate_size, self.moe_layers * self.num_experts, expert=True)
            if self.shared_expert_intermediate_size:
                shapes += _gated_mlp(h, self.shared_expert_intermediate_size, self.moe_layers, expert=False)
        return shapes

    # ------------------------------------------------------------------------------------------------ counts

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def router_params(self) -> int:
        return self.moe_layers * self.hidden_size * self.num_experts

    @property
    def norm_params(self) -> int:
        # Two RMS norms per layer, q/k norms (Qwen3; a few thousand values either way), the final norm.
        return self.num_layers * (2 * self.hidden_size + 2 * self.head_dim) + self.hidden_size

    @property
    def linear_params(self) -> int:
        return sum(shape.params for shape in self.linear_shapes())

    @property
    def expert_params(self) -> int:
        return sum(shape.params for shape in self.linear_shapes() if shape.expert)

    @property
    def total_params(self) -> int:
        return self.embedding_params + self.lm_head_params + self.linear_params + self.router_params + self.norm_params

    @property
    def active_params(self) -> int:
        """Parameters one token passes through (experts counted ``experts_per_token`` times, not all)."""
        if not self.is_moe:
            return self.total_params
        idle = self.num_experts - self.experts_per_token
        return self.total_params - self.expert_params * idle // self.num_experts

    @property
    def weights_dtype_bytes(self) -> int:
        return _DTYPE_BYTES.get(self.weights_dtype, 2)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV cache of one token: keys and values of every layer."""
        return 2 * self.num_layers * self.kv_dim * dtype_bytes


def _gated_mlp(hidden: int, width: int, count: int, *, expert: bool) -> list[LinearShape]:
    return [
        LinearShape(name="gate_proj", in_features=hidden, out_features=width, count=count, expert=expert),
        LinearShape(name="up_proj", in_features=hidden, out_features=width, count=count, expert=expert),
        LinearShape(name="down_proj", in_features=width, out_features=hidden, count=count, expert=expert),
    ]


def _moe_layer_count(text: Mapping[str, Any], layers: int) -> int:
    """Layers with experts: Qwen-MoE's ``decoder_sparse_step``/``mlp_only_layers``, DeepSeek's
    ``first_k_dense_replace``; Mixtral-style configs (no such fields) have experts in every layer."""
    dense_only = {int(i) for i in text.get("mlp_only_layers") or []}
    step = int(text.get("decoder_sparse_step") or 1)
    first_dense = int(text.get("first_k_dense_replace") or 0)
    return sum(1 for i in range(layers) if i not in dense_only and i >= first_dense and (i + 1) % step == 0)


def dtype_bytes(name: str) -> int:
    try:
        return _DTYPE_BYTES[name]
    except KeyError:
        raise InvalidArgument(
            f"dtype {name!r} is unknown; use one of {', '.join(_DTYPE_BYTES)}", reason="BAD_DTYPE"
        ) from None
