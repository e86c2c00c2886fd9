"""The training process: ``python -m services.trainer.worker JOB_DIR``.

The trainer service runs one of these per job and talks to it only through the job folder and signals (the
parent/child contract): it reads ``spec.json``, appends one JSON event per line to ``events.jsonl``, writes
checkpoints under ``checkpoints/`` and the result under ``output/``. SIGUSR1 asks it to yield the GPU and SIGTERM
to shut down: either way it finishes the optimizer step in progress, saves a checkpoint and exits 75. A crash or an
out-of-memory error ends this process, never the service.

Exit codes: 0 done (``output/`` complete, last event ``done``); 75 yielded (checkpoint saved); 1 failed (last
event ``error`` says why); anything else, or killed: crashed (the parent resumes from the last checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder or nothing: a worker never downloads a model

from baton.runtime.errors import BatonError, InvalidArgument
from baton.runtime.logging import configure_logging, log_event

log = logging.getLogger("services.trainer.worker")

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_YIELDED = 75  # EX_TEMPFAIL: "try again later", which is what a preempted job is


class EventLog:
    """events.jsonl: one JSON object per line, each line one write() on an O_APPEND descriptor, so a line is
    never interleaved and a kill -9 can at worst leave the last line unfinished (the parent tolerates that)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # A previous run killed mid-write left an unterminated line: start ours on a fresh one.
        size = os.fstat(self._fd).st_size
        if size and _last_byte(path, size) != b"\n":
            os.write(self._fd, b"\n")

    def emit(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, ensure_ascii=False, allow_nan=False, default=_json_default) + "\n"
        os.write(self._fd, line.encode("utf-8"))

    def close(self) -> None:
        os.close(self._fd)


def _last_byte(path: Path, size: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(size - 1)
        return handle.read(1)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class StopFlags:
    """Set by signal handlers, read by the training loop after every optimizer step."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.signalled_at: float | None = None

    def install(self) -> None:
        signal.signal(signal.SIGUSR1, self._handler("yield"))
        signal.signal(signal.SIGTERM, self._handler("shutdown"))
        signal.signal(signal.SIGINT, self._handler("shutdown"))

    def _handler(self, reason: str) -> Any:
        def handle(signum: int, frame: FrameType | None) -> None:
            if self.reason is None:  # the first request names the checkpoint; later ones change nothing
                self.reason = reason
                self.signalled_at = time.monotonic()

        return handle

    def __call__(self) -> str | None:
        return self.reason


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m services.trainer.worker JOB_DIR", file=sys.stderr)
        return 2
    _configure_logging()
    job_dir = Path(argv[1]).resolve()
    flags = StopFlags()
    flags.install()
    events = EventLog(job_dir / "events.jsonl")
    try:
        return _run(job_dir, events, flags)
    except BatonError as error:
        return _fail(events, error.reason, error.message, error.metadata)
    except MemoryError as error:
        return _fail(events, "OUT_OF_MEMORY", _oom_message(error), {})
    except Exception as error:
        if _is_torch_oom(error):
            return _fail(events, "OUT_OF_MEMORY", _oom_message(error), {})
        # A bug, not a transient failure: resuming would hit it again, so the job fails with what happened.
        log.error("trainer worker failed\n%s", traceback.format_exc())
        message = f"the training process failed: {type(error).__name__}: {error}; see the trainer's log"
        return _fail(events, "INTERNAL", message, {"exception": type(error).__name__})
    finally:
        events.close()


def _configure_logging() -> None:
    # The trainer service's own settings, inherited through the environment: one log style for parent and child.
    level = os.environ.get("BATON_TRAINER_LOG_LEVEL", "INFO").upper()
    fmt = os.environ.get("BATON_TRAINER_LOG_FORMAT", "text")
    configure_logging(
        "trainer-worker",
        level=level if level in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO",
        fmt="json" if fmt == "json" else "text",
    )


def _run(job_dir: Path, events: EventLog, flags: StopFlags) -> int:
    from services.trainer.artifacts import base_model_hash, publish_output
    from services.trainer.dataset import build_dataset, load_tokenizer, model_max_positions, source_from_spec
    from services.trainer.run_spec import plan_steps
    from services.trainer.training import TrainingRun

    spec = _load_spec(job_dir)
    _check_base_model(spec.base_model_path)
    started = time.monotonic()
    data = build_dataset(
        source_from_spec(spec.dataset),
        load_tokenizer(spec.base_model_path),
        seq_len=spec.hyper.seq_len,
        eval_fraction=spec.hyper.eval_fraction,
        seed=spec.hyper.seed,
        max_positions=model_max_positions(spec.base_model_path),
    )
    plan = plan_steps(len(data.train), spec.hyper)
    events.emit({"type": "dataset", **data.stats.to_event(), "total_steps": plan.total_steps})
    for note in data.notes:
        events.emit({"type": "log", "level": "info", "message": note})
    log_event(log, "trainer.dataset", seconds=round(time.monotonic() - started, 2), **data.stats.to_event())
    if flags():
        # Nothing trained yet, so nothing to save: the next start builds the same dataset and begins again.
        events.emit({"type": "log", "level": "info", "message": "stopped before training began"})
        return EXIT_YIELDED
    run = TrainingRun(spec, data, job_dir, events.emit, flags)
    run.setup()
    outcome = run.train()
    if outcome.status == "yielded":
        waited = time.monotonic() - flags.signalled_at if flags.signalled_at else 0.0
        log_event(log, "trainer.yielded", step=outcome.step, reason=outcome.stop_reason, after_signal_s=waited)
        return EXIT_YIELDED
    before, after = outcome.history.base_eval(), outcome.history.last_adapter_eval()
    assert run.lora_plan is not None
    metadata = {
        "name": spec.name,
        "job_id": spec.job_id,
        "base_model_path": str(spec.base_model_path),
        "base_model_hash": base_model_hash(spec.base_model_path),
        "data_hash": data.stats.data_hash,
        "dataset": {
            **data.stats.to_event(),
            "eval_document_ids": data.eval_document_ids,
            "eval_document_sources": data.eval_document_sources,
        },
        "steps": outcome.step,
        "tokens_seen": outcome.tokens_seen,
        "train_s": round(outcome.train_s, 3),
        "eval_loss_before": before["eval_loss"] if before else None,
        "eval_perplexity_before": before["perplexity"] if before else None,
        "eval_loss_after": after["eval_loss"] if after else None,
        "eval_perplexity_after": after["perplexity"] if after else None,
        "seq_len": spec.hyper.seq_len,
        "lora": {**_lora_json(spec), "resolved_target_modules": run.lora_plan.target_modules},
        "quantization": vars(spec.quantization),
        "hyperparameters": vars(spec.hyper),
    }
    output = job_dir / "output"
    written = publish_output(output, run.save_adapter, metadata, outcome.history.steps, outcome.history.evals)
    events.emit(
        {"type": "done", "result": {**written, "output_path": str(output), "loss_plot_path": str(output / "loss.png")}}
    )
    log_event(log, "trainer.done", steps=outcome.step, output=str(output))
    return EXIT_DONE


def _load_spec(job_dir: Path) -> Any:
    from services.trainer.run_spec import JobSpec

    path = job_dir / "spec.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return JobSpec.from_json(data)
    except FileNotFoundError as error:
        raise InvalidArgument(f"{path} is missing: the service writes it before starting the worker") from error
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise InvalidArgument(
            f"{path} is not a valid job spec ({error}); resubmit the job", reason="BAD_SPEC"
        ) from error


def _check_base_model(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise InvalidArgument(
            f"the base model folder {path} has no config.json; give the path of a local Hugging Face model folder",
            reason="BASE_MODEL_MISSING",
            metadata={"path": str(path)},
        )


def _lora_json(spec: Any) -> dict[str, Any]:
    lora = dict(vars(spec.lora))
    lora["target_modules"] = list(lora["target_modules"])
    return lora


def _is_torch_oom(error: BaseException) -> bool:
    # torch raises OutOfMemoryError for the GPU and for its CPU allocator alike; imported late, it is loaded by now.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.OutOfMemoryError)


def _oom_message(error: BaseException) -> str:
    detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    return (
        f"out of memory while training ({detail}); lower micro_batch_size or seq_len, turn gradient_checkpointing "
        "on, or use NF4 quantization"
    )


def _fail(events: EventLog, reason: str, message: str, metadata: dict[str, str]) -> int:
    event: dict[str, Any] = {"type": "error", "reason": reason, "message": message}
    if metadata:
        event["metadata"] = metadata
    events.emit(event)
    log_event(log, "trainer.failed", level=logging.WARNING, reason=reason, message=message)
    return EXIT_FAILED


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown. Unloading torch, transformers and peft takes ~3 s on a small CPU,
    and a yielding job is what the scheduler waits for before it hands the GPU over. Everything this process
    wrote is closed and renamed into place by now, so skipping the teardown loses nothing."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main(sys.argv))
