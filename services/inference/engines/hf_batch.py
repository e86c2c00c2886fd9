"""Decode batches for the hf engine: many sequences' KV caches held as one, one forward per step for all of them.

The design is TGI's first one (``CausalLMBatch.concatenate`` / ``filter``), on transformers' own ``DynamicCache``:
the requests that arrive together are prefilled together (left-padded into one forward: the weights are read once
for all of them, where a CPU's decode and short prefills are bound by reading them), then that cache joins the
running batch. Caches of different lengths are left-padded to the longest and concatenated along the batch
dimension; a finished row is dropped, and the columns only padding used are trimmed away, so the batch is always as
long as its longest row. The 2-D attention mask hides the padding and ``position_ids`` carry each row's true
position, so every row computes what it would alone (up to float rounding in the batched matrix products).

transformers' continuous batching (``generate_batch``, paged attention) was read and not used: one sampling config
per manager, no per-request seeds, penalties, stop strings or top-k logprobs, and no LoRA per request — all of which
the engine contract needs.

Sliding-window layers (Gemma 3) keep only the last ``window - 1`` positions. While a row is shorter than that their
cache is an ordinary one and can be padded like the others; a row about to reach it leaves the shared batch and goes
on alone, where transformers' own window bookkeeping applies unchanged. Cache layers of any other kind are never
padded: such a model decodes each request on its own, as before batching.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

NO_WINDOW = 1 << 62  # "the cache has no sliding window": any length fits


def cache_window(cache: DynamicCache) -> int:
    """The longest a row may grow in a shared batch: NO_WINDOW, a sliding window's limit, or 0 (never share)."""
    window = NO_WINDOW
    for layer in cache.layers:
        if type(layer) is DynamicSlidingWindowLayer:
            # After a step the layer would hold length + 1 positions; more than window - 1 and it crops.
            window = min(window, layer.sliding_window - 2)
        elif type(layer) is not DynamicLayer:
            return 0
    return window


@dataclass(eq=False)
class DecodeBatch:
    """Rows decoding together. ``rows`` are the engine's sequences; the rest is what the forward pass needs."""

    rows: list[Any]
    cache: DynamicCache
    mask: torch.Tensor  # [rows, length]: 1 for a real position, 0 for left padding
    positions: list[int]  # each row's true length = the position of the token it feeds next
    window: int  # see cache_window
    shared: bool = True  # False once a row outgrew the window: it decodes alone from then on
    _next_mask: torch.Tensor | None = field(default=None, repr=False)  # step_inputs' grown mask, for stepped

    @classmethod
    def of_one(cls, row: Any, cache: DynamicCache, length: int) -> DecodeBatch:
        window = cache_window(cache)
        mask = torch.ones((1, length), dtype=torch.long, device=_device(cache))
        return cls([row], cache, mask, [length], window, shared=length <= window)

    @classmethod
    def of_prefill(cls, rows: list[Any], cache: DynamicCache, mask: torch.Tensor) -> DecodeBatch:
        """Rows prefilled together, left-padded to the longest prompt (``prefill_inputs``)."""
        window = cache_window(cache)
        return cls(rows, cache, mask, mask.sum(dim=1).tolist(), window, shared=mask.shape[1] <= window)

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def can_take(self, other: DecodeBatch, limit: int) -> bool:
        return self.shared and other.shared and len(self.rows) + len(other.rows) <= limit

    def merge(self, other: DecodeBatch) -> None:
        """Take ``other``'s rows: both left-padded to the longer, then concatenated."""
        length = max(self.length, other.length)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, length), _pad_left(theirs.keys, length)])
            mine.values = torch.cat([_pad_left(mine.values, length), _pad_left(theirs.values, length)])
            _sync_window_length(mine)
        self.mask = torch.cat([_pad_left(self.mask, length, dim=1), _pad_left(other.mask, length, dim=1)])
        self._next_mask = None
        self.rows += other.rows
        self.positions += other.positions
        self.window = min(self.window, other.window)

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows, then trim the leading columns that no kept row uses."""
        if indices == list(range(len(self.rows))):
            return
        if not indices:
            self.rows, self.positions = [], []  # the engine drops an empty batch
            return
        self._next_mask = None
        index = torch.tensor(indices, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.shape[1] - mask.sum(dim=1).max())  # the longest kept row has no padding
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
            _sync_window_length(layer)
        self.rows = [self.rows[i] for i in indices]
        self.positions = [self.positions[i] for i in indices]

    def split_off(self, index: int) -> DecodeBatch:
        """Row ``index`` as a batch of its own, its padding stripped (the row stays here too: ``keep`` drops it)."""
        pad = self.length - self.positions[index]
        cache = copy.copy(self.cache)  # the same kind of cache (its flags), with layers of its own
        cache.layers = []
        for layer in self.cache.layers:
            alone = copy.copy(layer)
            alone.keys = layer.keys[index : index + 1, :, pad:].clone()
            alone.values = layer.values[index : index + 1, :, pad:].clone()
            _sync_window_length(alone)
            cache.layers.append(alone)
        mask = torch.ones((1, self.positions[index]), dtype=torch.long, device=self.mask.device)
        return DecodeBatch([self.rows[index]], cache, mask, [self.positions[index]], self.window, shared=False)

    def step_inputs(self, last_tokens: list[int], *, sdpa: bool = False) -> dict[str, torch.Tensor]:
        """The forward's inputs for one new token per row. Rows without padding need no mask: the plain path (one
        row alone, as generate() runs it; position ids when rows differ). ``sdpa``: the padding mask goes in as
        the 4-D boolean mask SDPA takes (a decoding row attends to every real position before it), which
        transformers uses as given — building it from the 2-D mask each step was a tenth of a tiny model's step.
        """
        device = self.mask.device
        input_ids = torch.tensor([[token] for token in last_tokens], device=device)
        self._next_mask = self._grown_mask()
        if all(position == self.length for position in self.positions):
            if len(self.rows) == 1:
                return {"input_ids": input_ids}
            return {"input_ids": input_ids, "position_ids": torch.full_like(input_ids, self.length)}
        position_ids = torch.tensor([[position] for position in self.positions], device=device)
        mask = self._next_mask[:, None, None, :].bool() if sdpa else self._next_mask
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}

    def stepped(self) -> None:
        """Every row fed one token: the cache grew by one column."""
        self.mask = self._next_mask if self._next_mask is not None else self._grown_mask()
        self._next_mask = None
        self.positions = [position + 1 for position in self.positions]

    def _grown_mask(self) -> torch.Tensor:
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.mask.device)
        return torch.cat([self.mask, ones], dim=1)

    def outgrown(self) -> list[int]:
        """Rows of a shared batch that the next step would take past the sliding window."""
        if not self.shared:
            return []
        return [index for index, position in enumerate(self.positions) if position > self.window]


def prefill_inputs(prompts: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One forward's inputs for several prompts: left-padded to the longest, the mask hiding the padding, each
    row's positions counted from its first real token."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}


def prefill_groups(lengths: list[int], max_tokens: int, window: int) -> list[list[int]]:
    """Indices of prompts to prefill together, longest first: a group's padded size (count x longest) stays within
    ``max_tokens``, its shortest prompt is at least half its longest (padding is computed and thrown away), and
    its longest fits the shared batch's window (else the prompt is prefilled alone)."""
    groups: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        group = groups[-1] if groups else None
        longest = lengths[group[0]] if group else 0
        if group is None or longest > window or (len(group) + 1) * longest > max_tokens or 2 * lengths[index] < longest:
            groups.append([index])
        else:
            group.append(index)
    return groups


def _pad_left(tensor: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=tensor.dtype, device=tensor.device), tensor], dim=dim)


def _sync_window_length(layer: Any) -> None:
    # A sliding layer shorter than its window counts its positions in ``cumulative_length``: padding included now.
    if type(layer) is DynamicSlidingWindowLayer:
        layer.cumulative_length = int(layer.keys.shape[-2])


def _device(cache: DynamicCache) -> torch.device:
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            return layer.keys.device
    return torch.device("cpu")
