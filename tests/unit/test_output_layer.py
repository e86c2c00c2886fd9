"""The weight-first output layer: the same logits as nn.Linear (up to float rounding) for every row count, the
same parameters (a tied embedding stays tied), swapped in only where it pays."""

from __future__ import annotations

import pytest
import torch

from baton.models import output_layer
from baton.models.output_layer import MAX_WEIGHT_FIRST_ROWS, WeightFirstLinear, use_weight_first_output_layer


@pytest.mark.parametrize(
    "shape", [(1, 1, 48), (2, 1, 48), (8, 1, 48), (1, 5, 48), (3, 7, 48), (MAX_WEIGHT_FIRST_ROWS + 1, 48)]
)
@pytest.mark.parametrize("bias", [False, True])
def test_the_logits_equal_nn_linear_for_any_rows(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 300, bias=bias)
    swapped = WeightFirstLinear.sharing(plain)
    x = torch.randn(*shape)
    expected, got = plain(x), swapped(x)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert swapped.weight is plain.weight and swapped.bias is plain.bias


def test_a_big_output_layer_is_swapped_and_stays_tied(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         tie_word_embeddings=True)  # fmt: skip
    model = Qwen3ForCausalLM(config).eval()
    ids = torch.randint(0, 512, (4, 6))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert not use_weight_first_output_layer(model), "a small head is left as it is"
    monkeypatch.setattr(output_layer, "MIN_WEIGHT_FIRST_BYTES", 0)
    assert use_weight_first_output_layer(model)
    head = model.get_output_embeddings()
    assert type(head) is WeightFirstLinear and head.weight is model.get_input_embeddings().weight
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, logits_to_keep=1).logits[:, -1], expected[:, -1])
    assert not use_weight_first_output_layer(model), "swapped once"
