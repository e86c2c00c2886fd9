"""Next-token negative log-likelihoods of a causal LM without the model's own logits tensor.

A causal LM's last layer turns every position's hidden state into logits over the whole vocabulary, and for a small
model with a big vocabulary that layer is most of the work: Gemma 3 270M has 262,144 tokens, so one 256-token block
makes a 268 MB float32 logits tensor, and on a 2-core CPU the layer, the log-softmax over it and their backward take
~60 % of a training step. What the loss needs of that tensor is two numbers a position: the log-sum-exp of the row
and the target's logit. ``token_nll`` computes them into one workspace buffer that is reused from call to call (a
fresh tensor of that size costs its page faults on a CPU: zero-filling one ran at ~2.5 GB/s here), and in training
computes the gradient of the hidden states in the same pass (softmax minus one-hot, times the weight), so nothing of
vocabulary size is kept for backward. The arithmetic is the same as ``cross_entropy(model(...).logits)``; the
results agree to float rounding.

It applies when the logits are the plain product of the last hidden state and a frozen, bias-free weight (most
causal LMs; not Gemma 2's soft-capping nor a trained or adapted output layer). ``LogitsHead.of`` says whether a
model is such a one, checked on the model itself: the head's logits must equal the model's, else it returns None and
the caller keeps the model's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100  # the label of positions that are not scored (padding, prompts)
_CHECK_TOKENS = 8


def next_token_nll(
    model: Any, head: LogitsHead | None, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """NLL of ``labels[:, t + 1]`` given the tokens up to t, per position (batch, length - 1), 0 where the label is
    IGNORE_INDEX: through ``head`` (``LogitsHead.of(model)``) when there is one, else from the model's own logits."""
    if head is not None:
        return head.token_nll(input_ids, attention_mask, labels)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]
    # Rows of (token, vocabulary): ~3x faster on a CPU than cross_entropy's (batch, vocabulary, length) form.
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return nll.view(targets.shape)


@dataclass
class LogitsHead:
    """A causal LM split at its output layer: ``decoder(input_ids, attention_mask)`` gives the last hidden states and
    ``weight`` (vocabulary x hidden) turns them into logits."""

    decoder: torch.nn.Module
    weight: torch.Tensor
    workspace: _Workspace

    @classmethod
    def of(cls, model: Any) -> LogitsHead | None:
        """The split of ``model`` (a transformers causal LM, or a peft model around one), or None when its logits are
        more than ``hidden @ weight.T`` (a bias, soft-capping, scaling, a trainable or adapted head)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder = getattr(base, "model", None)
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        plain = type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
        if decoder is None or not plain or head.weight.dtype != torch.float32:
            return None
        split = cls(decoder, head.weight, _Workspace())
        return split if split._matches(model) else None

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def token_nll(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """NLL of ``labels[:, t + 1]`` given the tokens up to t, per position (batch, length - 1); 0 where the label
        is IGNORE_INDEX. Differentiable with respect to the decoder's trainable parameters when grad is enabled."""
        hidden = self.hidden(input_ids, attention_mask)[:, :-1]
        targets = labels[:, 1:]
        flat = hidden.reshape(-1, hidden.shape[-1])
        if torch.is_grad_enabled() and flat.requires_grad:
            nll = _LinearCrossEntropy.apply(flat, self.weight, targets.reshape(-1), self.workspace)
        else:
            nll = _nll_only(flat, self.weight, targets.reshape(-1), self.workspace)
        return nll.view(targets.shape)

    def _matches(self, model: Any) -> bool:
        """The split's log-probabilities equal the model's own on a few tokens (else the model does more). Run in eval
        mode: no dropout, so the check draws nothing from the RNG a seeded training run depends on."""
        vocab = self.weight.shape[0]
        ids = torch.arange(1, _CHECK_TOKENS + 1, device=self.weight.device).remainder(vocab).unsqueeze(0)
        mask = torch.ones_like(ids)
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                expected = next_token_nll(model, None, ids, mask, ids)
                ours = self.token_nll(ids, mask, ids)
        finally:
            model.train(training)
        return bool(torch.allclose(ours, expected, rtol=1e-4, atol=1e-4))


class _Workspace:
    """One (tokens x vocabulary) float32 buffer, grown when needed and reused: the logits never get a fresh tensor."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def logits(self, rows: int, vocab: int, device: torch.device) -> torch.Tensor:
        buffer = self._buffer
        if buffer is None or buffer.device != device or buffer.numel() < rows * vocab:
            self._buffer = buffer = torch.empty(rows * vocab, dtype=torch.float32, device=device)
        return buffer[: rows * vocab].view(rows, vocab)


def _logits_and_lse(
    hidden: torch.Tensor, weight: torch.Tensor, workspace: _Workspace
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = workspace.logits(hidden.shape[0], weight.shape[0], hidden.device)
    torch.mm(hidden.float(), weight.t(), out=logits)
    return logits, torch.logsumexp(logits, dim=-1)


def _scored_nll(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, workspace: _Workspace
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nll of every row, the scored rows, their targets, their logits, their log-sum-exp): unscored rows (padding,
    prompts) cost nothing."""
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    index = targets[rows].unsqueeze(1)
    logits, lse = _logits_and_lse(hidden.index_select(0, rows), weight, workspace)
    picked = logits.gather(1, index).squeeze(1)
    nll = torch.zeros(targets.shape[0], dtype=lse.dtype, device=lse.device).index_copy_(0, rows, lse - picked)
    return nll, rows, index, logits, lse


def _nll_only(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, workspace: _Workspace) -> torch.Tensor:
    return _scored_nll(hidden, weight, targets, workspace)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    """NLL per row of ``hidden @ weight.T``; the gradient of ``hidden`` is computed in the forward pass, while the
    logits are at hand, and kept (rows x hidden) instead of the logits (rows x vocabulary)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, workspace: _Workspace
    ) -> torch.Tensor:
        nll, rows, index, logits, lse = _scored_nll(hidden.detach(), weight, targets, workspace)
        # d nll / d logits = softmax - one_hot(target): computed in place, over the logits.
        probabilities = logits.sub_(lse.unsqueeze(1)).exp_()
        probabilities.scatter_add_(1, index, torch.full_like(index, -1, dtype=probabilities.dtype))
        grad_rows = (probabilities @ weight).to(hidden.dtype)
        ctx.save_for_backward(torch.zeros_like(hidden).index_copy_(0, rows, grad_rows))
        return nll

    @staticmethod
    def backward(ctx: Any, grad_nll: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:  # type: ignore[override]
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_nll.unsqueeze(1).to(grad_hidden.dtype), None, None, None
