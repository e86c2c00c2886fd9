"""baton/models/token_nll.py: the next-token NLL without the model's logits tensor must be the model's own
cross-entropy — values and gradients — and must refuse the models whose logits are more than hidden @ weight.T."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen3Config, Qwen3ForCausalLM

from baton.models.token_nll import IGNORE_INDEX, LogitsHead, _LinearCrossEntropy, _Workspace, next_token_nll

VOCAB = 300


def small_lm(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen3ForCausalLM(config)
    model.requires_grad_(False)
    return model


def with_lora(model: Any) -> Any:
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:  # nonzero, so that the gradients of every LoRA matrix are
            torch.nn.init.normal_(parameter, std=0.1)
    return peft_model


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX  # a prompt that is not scored
    labels[1, 9:] = IGNORE_INDEX
    return ids, mask, labels


def reference_nll(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return nll.view(targets.shape)


def test_the_fused_function_gives_cross_entropy_and_its_gradient() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(40, 8)
    targets = torch.randint(0, 40, (10,))
    targets[[2, 7]] = IGNORE_INDEX
    upstream = torch.randn(10)

    ours = _LinearCrossEntropy.apply(hidden, weight, targets, _Workspace())
    (ours * upstream).sum().backward()
    our_grad, hidden.grad = hidden.grad, None
    expected = torch.nn.functional.cross_entropy(
        hidden @ weight.T, targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    (expected * upstream).sum().backward()

    assert torch.allclose(ours, expected, atol=1e-5)
    assert torch.equal(ours[[2, 7]], torch.zeros(2))
    assert torch.allclose(our_grad, hidden.grad, atol=1e-5)


def test_a_lora_model_gets_the_same_loss_and_gradients_as_from_its_logits() -> None:
    model = with_lora(small_lm())
    model.eval()  # no dropout: both passes must see the same network
    head = LogitsHead.of(model)
    assert head is not None
    ids, mask, labels = batch()
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]

    def loss_and_grads(nll: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        nll.sum().backward()
        grads = [parameter.grad.clone() for parameter in trainable]
        model.zero_grad(set_to_none=True)
        return nll.detach(), grads

    ours, our_grads = loss_and_grads(head.token_nll(ids, mask, labels))
    theirs, their_grads = loss_and_grads(reference_nll(model, ids, mask, labels))
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(our_grads, their_grads, strict=True))
    with torch.inference_mode():  # scoring: no gradient kept, same numbers
        assert torch.allclose(head.token_nll(ids, mask, labels), theirs, atol=1e-5)
        # what a model without a plain head gets: its own logits, the same numbers
        assert torch.allclose(next_token_nll(model, None, ids, mask, labels), theirs, atol=1e-5)
        assert torch.equal(next_token_nll(model, head, ids, mask, labels), head.token_nll(ids, mask, labels))
    with model.disable_adapter(), torch.inference_mode():  # the base alone, as `baton eval views` scores it
        base = reference_nll(model, ids, mask, labels)
        assert torch.allclose(head.token_nll(ids, mask, labels), base, atol=1e-5)
        assert not torch.allclose(base, theirs, atol=1e-3)


def test_finding_the_head_draws_nothing_from_the_rng_of_a_seeded_run() -> None:
    model = with_lora(small_lm())
    model.train()  # LoRA dropout on: a check in training mode would draw masks
    before = torch.get_rng_state()
    assert LogitsHead.of(model) is not None
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training


def test_models_whose_logits_are_more_than_the_product_keep_their_own_forward() -> None:
    biased = small_lm()
    biased.lm_head = torch.nn.Linear(32, VOCAB, bias=True).requires_grad_(False)
    assert LogitsHead.of(biased) is None

    trained_head = small_lm()
    trained_head.lm_head.weight.requires_grad_(True)
    assert LogitsHead.of(trained_head) is None

    scaled = small_lm()  # a model that scales its logits (as Cohere's and Granite's do) fails the check
    scaled.lm_head.register_forward_hook(lambda module, args, output: output * 2.0)
    assert LogitsHead.of(scaled) is None


@pytest.mark.parametrize("rows", [3, 7])
def test_the_workspace_is_reused_not_reallocated(rows: int) -> None:
    workspace = _Workspace()
    big = workspace.logits(8, 5, torch.device("cpu"))
    small = workspace.logits(rows, 5, torch.device("cpu"))
    assert small.data_ptr() == big.data_ptr() and small.shape == (rows, 5)
