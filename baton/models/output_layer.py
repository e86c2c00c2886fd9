"""A causal LM's output layer for the few rows of a decode step, computed the way a CPU's BLAS does well.

The output layer turns each row's last hidden state into logits over the vocabulary: ``hidden @ weight.T``, with
``weight`` vocabulary × hidden — for Gemma 3 270M 262,144 × 640, 671 MB of float32 read for every step. A decode
step has one row per request; with two to a few dozen rows, the matrix product as ``nn.Linear`` asks for it (the
weight transposed, on the right) runs ~2x slower on this project's CPUs than the same product with the weight on
the left (``(weight @ hidden.T).T``): MKL's kernel for a handful of rows against a transposed operand copies and
re-packs the whole weight, where the weight-first product streams it once (measured in docs/inference.md). One row
alone is a matrix-vector product either way and keeps nn.Linear's path, so a lone request computes exactly what
``generate()`` does. A small output layer (SmolLM2's 108 MiB) gained little (1.03-1.11x): only one of at least
MIN_WEIGHT_FIRST_BYTES is swapped.
"""

from __future__ import annotations

from typing import Any

import torch

# Up to this many rows the weight-first product wins on a CPU; beyond, nn.Linear's GEMM amortises its packing.
MAX_WEIGHT_FIRST_ROWS = 64
# Below this the gain was too small to matter (benchmarks/bench_output_layer.py, a decode step of 2 and 8 rows:
# SmolLM2's 108 MiB head 1.03-1.11x; Gemma 3's 640 MiB head 1.4-1.9x).
MIN_WEIGHT_FIRST_BYTES = 256 << 20


class WeightFirstLinear(torch.nn.Linear):
    """``nn.Linear`` (same weight, same bias, same results up to float rounding) that computes ``x @ W.T`` as
    ``(W @ x.T).T`` for 2 to MAX_WEIGHT_FIRST_ROWS rows on a CPU."""

    @classmethod
    def sharing(cls, layer: torch.nn.Linear) -> WeightFirstLinear:
        """A WeightFirstLinear over ``layer``'s own parameters (no copy: a tied embedding stays tied)."""
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new.weight = layer.weight
        new.bias = layer.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if not 2 <= rows <= MAX_WEIGHT_FIRST_ROWS or x.device.type != "cpu" or x.dtype != self.weight.dtype:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1])
        # contiguous(): the caller gets the row-major layout nn.Linear returns (a few rows: a cheap copy).
        out = torch.mm(self.weight, flat.t()).t().contiguous()
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)


def use_weight_first_output_layer(model: Any) -> bool:
    """Swap ``model``'s output layer for a WeightFirstLinear over the same weight, when it is a plain nn.Linear on a
    CPU of at least MIN_WEIGHT_FIRST_BYTES. Returns whether it did."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.weight.device.type != "cpu":
        return False
    if head.weight.numel() * head.weight.element_size() < MIN_WEIGHT_FIRST_BYTES:
        return False
    model.set_output_embeddings(WeightFirstLinear.sharing(head))
    return True
