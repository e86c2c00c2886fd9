"""The (Q)LoRA training loop: a plain torch loop, so that a resumed run is exactly an uninterrupted one.

Why not ``transformers.Trainer``: resuming it replays the data loader and restores RNG states approximately, and
its hooks decide when to save. Here everything that shapes the result is explicit and in the checkpoint — the
adapter, the optimizer, the LR scheduler, the python/numpy/torch RNG states and the position in the data, which is
a pure function of (seed, step): micro-batch ``g`` of the whole run is slice ``g % per_epoch`` of the permutation
seeded by ``(seed, g // per_epoch)``. A run stopped after step N and resumed from its checkpoint takes the same
steps with the same numbers as one that never stopped (bit for bit on the same machine and thread count).

The loop knows nothing of processes or files beyond its job folder: it reports through an ``emit`` callback (the
worker writes events.jsonl) and asks ``should_stop`` after every optimizer step (the worker's signal flags). The job's
spec and its step plan are ``services.trainer.run_spec``; the model, LoRA and optimizer ``services.trainer.lora``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import resource
import shutil
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from baton.models.token_nll import LogitsHead, next_token_nll
from baton.runtime.errors import FailedPrecondition
from baton.runtime.files import fsync_dir, fsync_tree
from baton.runtime.logging import log_event
from services.trainer.dataset import IGNORE_INDEX, Block, BuiltDataset
from services.trainer.lora import (
    LoraPlan,
    interpolate_toward_base,
    load_base_model,
    make_optimizer,
    plan_lora,
    resolve_dtype,
    torch_device,
    wrap_with_lora,
)
from services.trainer.run_spec import JobSpec, lr_factor, plan_steps, warmup_steps

log = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], None]
StopCheck = Callable[[], str | None]  # "yield" | "shutdown" once a stop was asked for

CHECKPOINT_STATE = "trainer_state.pt"
CHECKPOINT_META = "checkpoint.json"
THROUGHPUT_WINDOW = 10  # steps averaged for tokens/s

# -------------------------------------------------------------------------------------------------- the run


@dataclass
class History:
    """Everything the loss plot and the metadata need, carried in every checkpoint so a resumed run has it all."""

    steps: list[dict[str, float]] = field(default_factory=list)  # step, loss, learning_rate, grad_norm, tokens_seen
    evals: list[dict[str, Any]] = field(default_factory=list)  # step, eval_loss, perplexity, which

    def base_eval(self) -> dict[str, Any] | None:
        return next((e for e in self.evals if e["which"] == "base"), None)

    def last_adapter_eval(self) -> dict[str, Any] | None:
        return next((e for e in reversed(self.evals) if e["which"] == "adapter"), None)


@dataclass
class TrainOutcome:
    status: Literal["done", "yielded"]
    step: int
    total_steps: int
    tokens_seen: int
    train_s: float
    history: History
    stop_reason: str | None = None


class TrainingRun:
    """One job's training: set up, resume if a checkpoint exists, step until done or told to stop."""

    def __init__(self, spec: JobSpec, data: BuiltDataset, job_dir: Path, emit: Emit, should_stop: StopCheck) -> None:
        self.spec = spec
        self.data = data
        self.checkpoints = job_dir / "checkpoints"
        self.emit = emit
        self.should_stop = should_stop
        self.plan = plan_steps(len(data.train), spec.hyper)
        self.device = torch_device(spec.device)
        self.dtype = resolve_dtype(spec.quantization)
        self.step = 0
        self.tokens_seen = 0
        self.train_s = 0.0
        self.history = History()
        self.lora_plan: LoraPlan | None = None
        self._interpolated = False
        self._recent: deque[tuple[int, float]] = deque(maxlen=THROUGHPUT_WINDOW)
        self.model: Any = None
        self.head: LogitsHead | None = None

    # ----------------------------------------------------------------------------------------------- set-up

    def setup(self) -> None:
        """Load the base, add the LoRA, build optimizer and scheduler; then restore the newest checkpoint."""
        hyper = self.spec.hyper
        _seed_everything(hyper.seed)
        base = load_base_model(self.spec)
        self.lora_plan = plan_lora(base, self.spec.lora)
        for note in self.lora_plan.notes:
            self._log(note)
        # LoRA's A matrices are drawn from torch's RNG: seeded right here, the same seed gives the same adapter.
        torch.manual_seed(hyper.seed)
        self.model = wrap_with_lora(base, self.spec, self.lora_plan)
        self.head = LogitsHead.of(self.model)  # the loss without the logits tensor, where the model allows
        self.params = [param for param in self.model.parameters() if param.requires_grad]
        self.optimizer = make_optimizer(hyper.optimizer, self.params, hyper, self.spec.device)
        warmup = warmup_steps(hyper, self.plan.total_steps)
        total, schedule = self.plan.total_steps, hyper.lr_schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup=warmup, total=total, schedule=schedule)
        )
        # float16 gradients underflow without loss scaling; bfloat16 and float32 need none.
        use_scaler = self.dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self._clean_stale_temporaries()
        self._resume()

    def _resume(self) -> None:
        for folder in reversed(self.complete_checkpoints()):
            try:
                self._load_checkpoint(folder)
            except (OSError, RuntimeError, KeyError, ValueError) as error:
                # A complete (renamed) checkpoint should always load; if one does not, an older one still helps.
                self._log(f"checkpoint {folder.name} does not load ({error}); trying an older one", level="warning")
                continue
            self.emit({"type": "resumed", "step": self.step, "from_checkpoint": str(folder)})
            log_event(log, "trainer.resumed", step=self.step, checkpoint=str(folder))
            return

    # ----------------------------------------------------------------------------------------------- the loop

    def train(self) -> TrainOutcome:
        """Step until the plan is done or ``should_stop`` says so; evaluate the base first and the adapter last."""
        if self._evaluates and self.history.base_eval() is None and not self._evaluate("base"):
            return self._stop()
        while self.step < self.plan.total_steps:
            if self.should_stop():
                return self._stop()
            self._optimizer_step()
            if self.should_stop():
                return self._stop()
            self._after_step()
        self.save_checkpoint("final")  # the update as trained: a resumed run interpolates again from it
        self._interpolate_toward_base()
        if self._evaluates and not self._has_final_eval() and not self._evaluate("adapter"):
            return self._stop()
        return TrainOutcome("done", self.step, self.plan.total_steps, self.tokens_seen, self.train_s, self.history)

    def _stop(self) -> TrainOutcome:
        reason = self.should_stop() or "shutdown"
        if not self._interpolated:  # after interpolation the "final" checkpoint already holds the trained update
            self.save_checkpoint(reason)
        return TrainOutcome(
            "yielded", self.step, self.plan.total_steps, self.tokens_seen, self.train_s, self.history, reason
        )

    def _interpolate_toward_base(self) -> None:
        """Keep ``strength`` of the trained update of the top ``top_layers``, once, after the last step (the final
        evaluation scores it)."""
        lora = self.spec.lora
        if self._interpolated or (lora.strength == 1.0 and lora.top_layers == 1.0):
            return
        scaled = interpolate_toward_base(self.model, lora.strength, lora.top_layers)
        self._interpolated = True
        kept = "" if lora.top_layers == 1.0 else f" (the top {lora.top_layers:g} of the layers; those below: 0)"
        self._log(f"adapter strength {lora.strength:g}{kept}: {scaled} LoRA B matrices scaled toward the base")

    @property
    def _evaluates(self) -> bool:
        """An eval split to score, and the job did not leave the scoring to a later evaluation (evaluate false)."""
        return bool(self.data.eval) and self.spec.hyper.evaluate

    def _has_final_eval(self) -> bool:
        last = self.history.last_adapter_eval()
        return last is not None and last["step"] == self.plan.total_steps

    def _after_step(self) -> None:
        hyper = self.spec.hyper
        last = self.step == self.plan.total_steps  # the final evaluation and checkpoint follow the loop
        every_eval = hyper.eval_every_steps if hyper.eval_every_steps is not None else hyper.checkpoint_every_steps
        if self._evaluates and every_eval and self.step % every_eval == 0 and not last:
            self._evaluate("adapter")
        if hyper.checkpoint_every_steps and self.step % hyper.checkpoint_every_steps == 0 and not last:
            self.save_checkpoint("periodic")

    def step_once(self) -> None:
        """One optimizer step outside ``train`` (the memory probe drives the loop itself)."""
        self._optimizer_step()

    def _optimizer_step(self) -> None:
        started = time.perf_counter()
        self.model.train()
        batches = [
            self._collate([self.data.train[i] for i in self.plan.micro_batch(index, self.spec.hyper.seed)])
            for index in range(self.step * self.plan.accumulation, (self.step + 1) * self.plan.accumulation)
        ]
        # Every labelled token of the step weighs the same, however the micro-batches split them.
        targets = max(1, sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in batches))
        learning_rate = self.scheduler.get_last_lr()[0]
        loss_sum = 0.0
        tokens = 0
        for batch in batches:
            with self._autocast():
                loss = self._summed_loss(batch) / targets
            loss_sum += float(loss.detach()) * targets
            tokens += int(batch["attention_mask"].sum())
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        grad_norm = self._clip_and_step()
        self.step += 1
        self.tokens_seen += tokens
        elapsed = time.perf_counter() - started
        self.train_s += elapsed
        self._recent.append((tokens, elapsed))
        self._report_step(loss_sum / targets, learning_rate, grad_norm)

    def _clip_and_step(self) -> float:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        limit = self.spec.hyper.max_grad_norm if self.spec.hyper.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, limit))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm

    def _report_step(self, loss: float, learning_rate: float, grad_norm: float) -> None:
        if not math.isfinite(loss):
            raise FailedPrecondition(
                f"training diverged: the loss is {loss} at step {self.step}; lower learning_rate or max_grad_norm, "
                "or use float32/bfloat16 compute",
                reason="LOSS_NOT_FINITE",
            )
        if not math.isfinite(grad_norm):
            grad_norm = -1.0  # fp16 loss scaling skips such a step; report it without breaking strict JSON
        window_tokens = sum(tokens for tokens, _ in self._recent)
        window_s = sum(seconds for _, seconds in self._recent)
        record = {
            "step": self.step,
            "loss": loss,
            "learning_rate": learning_rate,
            "grad_norm": grad_norm,
            "tokens_seen": self.tokens_seen,
        }
        self.history.steps.append(record)
        self.emit(
            {
                "type": "step",
                **record,
                "total_steps": self.plan.total_steps,
                "epoch": round(self.plan.epoch_at(self.step), 6),
                "tokens_per_s": window_tokens / window_s if window_s > 0 else 0.0,
                "peak_memory_bytes": peak_memory_bytes(self.device),
                "train_s": round(self.train_s, 3),
                "time_unix_s": time.time(),
            }
        )

    # --------------------------------------------------------------------------------------------- evaluation

    def _evaluate(self, which: Literal["base", "adapter"]) -> bool:
        """Token-weighted loss on the eval split; False when a stop request cut it short (nothing recorded)."""
        self.model.eval()
        total = 0.0
        count = 0
        size = self.spec.hyper.micro_batch_size
        adapter_off = self.model.disable_adapter() if which == "base" else contextlib.nullcontext()
        with torch.no_grad(), adapter_off:
            for start in range(0, len(self.data.eval), size):
                if self.should_stop():
                    self.model.train()
                    return False
                batch = self._collate(self.data.eval[start : start + size])
                with self._autocast():
                    total += float(self._summed_loss(batch))
                count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self.model.train()
        loss = total / max(1, count)
        record = {"step": self.step, "eval_loss": loss, "perplexity": _perplexity(loss), "which": which}
        self.history.evals.append(record)
        self.emit({"type": "eval", **record})
        log_event(log, "trainer.eval", **record)
        return True

    # --------------------------------------------------------------------------------------------- batching

    def _collate(self, blocks: Sequence[Block]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest block: pad tokens get attention 0 and no loss."""
        width = max(len(block.input_ids) for block in blocks)
        pad = self.data.pad_token_id
        ids = [block.input_ids + [pad] * (width - len(block.input_ids)) for block in blocks]
        labels = [block.labels + [IGNORE_INDEX] * (width - len(block.labels)) for block in blocks]
        mask = [[1] * len(block.input_ids) + [0] * (width - len(block.input_ids)) for block in blocks]
        return {
            "input_ids": torch.tensor(ids, device=self.device),
            "labels": torch.tensor(labels, device=self.device),
            "attention_mask": torch.tensor(mask, device=self.device),
        }

    def _summed_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the next-token cross-entropy over the labelled tokens (the caller divides): summed here rather
        than averaged by the model so that micro-batches of any size weigh every token the same."""
        return next_token_nll(self.model, self.head, batch["input_ids"], batch["attention_mask"], batch["labels"]).sum()

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        # float32 computes as is; otherwise the plain (non-NF4) base is in the compute dtype already and NF4 has
        # bnb_4bit_compute_dtype, but LoRA weights stay float32: autocast keeps their matmuls in the compute dtype.
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # --------------------------------------------------------------------------------------------- checkpoints

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a complete one was renamed into place with its metadata inside)."""
        if not self.checkpoints.is_dir():
            return []
        found = [
            path
            for path in self.checkpoints.iterdir()
            if path.name.startswith("step-") and path.name[5:].isdigit() and (path / CHECKPOINT_META).is_file()
        ]
        return sorted(found, key=lambda path: int(path.name[5:]))

    def save_checkpoint(self, reason: str) -> Path:
        """Write ``checkpoints/step-<N>`` (aside, then renamed), drop the oldest beyond keep_checkpoints."""
        final = self.checkpoints / f"step-{self.step}"
        started = time.monotonic()
        if not (final / CHECKPOINT_META).is_file():
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            staging = self.checkpoints / f".tmp-step-{self.step}-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            self.model.save_pretrained(str(staging / "adapter"))
            torch.save(self._state(), staging / CHECKPOINT_STATE)
            meta = {"step": self.step, "reason": reason, "saved_unix_s": time.time(), "data_hash": self._data_hash()}
            (staging / CHECKPOINT_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            fsync_tree(staging)
            shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover without metadata
            os.replace(staging, final)
            fsync_dir(self.checkpoints)
        self._prune()
        size = sum(path.stat().st_size for path in final.rglob("*") if path.is_file())
        seconds = round(time.monotonic() - started, 4)  # the trainer's baton_trainer_checkpoint_seconds
        self.emit({"type": "checkpoint", "step": self.step, "reason": reason, "path": str(final), "size_bytes": size,
                   "seconds": seconds})  # fmt: skip
        log_event(log, "trainer.checkpoint", step=self.step, reason=reason, size_bytes=size)
        return final

    def _state(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "train_s": self.train_s,
            "data_hash": self._data_hash(),
            "history": {"steps": self.history.steps, "evals": self.history.evals},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def _load_checkpoint(self, folder: Path) -> None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = torch.load(folder / CHECKPOINT_STATE, map_location="cpu", weights_only=True)
        if state["data_hash"] != self._data_hash():
            raise FailedPrecondition(
                f"the dataset changed since checkpoint {folder.name} (data hash {state['data_hash'][:12]} → "
                f"{self._data_hash()[:12]}); submit a new job for the new data",
                reason="DATASET_CHANGED",
            )
        weights = load_file(str(folder / "adapter" / "adapter_model.safetensors"), device=str(self.device))
        result = set_peft_model_state_dict(self.model, weights)
        missing = [key for key in result.missing_keys if "lora_" in key or "modules_to_save" in key]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"adapter weights do not match the model ({missing[:3]}, {result.unexpected_keys[:3]})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.train_s = float(state["train_s"])
        self.history = History(list(state["history"]["steps"]), list(state["history"]["evals"]))
        _set_rng_state(state["rng"])

    def _prune(self) -> None:
        keep = max(1, self.spec.hyper.keep_checkpoints)
        for old in self.complete_checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def _clean_stale_temporaries(self) -> None:
        if self.checkpoints.is_dir():
            for path in self.checkpoints.glob(".tmp-step-*"):
                shutil.rmtree(path, ignore_errors=True)  # a checkpoint a killed run did not finish

    def _data_hash(self) -> str:
        return self.data.stats.data_hash

    def save_adapter(self, folder: Path) -> None:
        """The adapter in peft's format (adapter_config.json + adapter_model.safetensors)."""
        self.model.save_pretrained(str(folder))

    def _log(self, message: str, *, level: str = "info") -> None:
        self.emit({"type": "log", "level": level, "message": message})
        log_event(log, "trainer.note", level=logging.WARNING if level == "warning" else logging.INFO, note=message)


# ------------------------------------------------------------------------------------------------------ helpers


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # capped below float overflow: events are strict JSON (no Infinity)


def peak_memory_bytes(device: torch.device) -> int:
    """torch's peak allocation on a GPU; the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        # As plain lists and tensors: checkpoints load with torch.load(weights_only=True), which refuses numpy.
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
