"""The child processes of a job, and the files they share with the service (the FIXED parent/child contract).

JOB_DIR holds ``spec.json`` (written here, atomically, before the first start), ``events.jsonl`` (appended by the
training process, one JSON object per line, tailed here), ``checkpoints/step-N/``, ``output/`` and ``worker.log``
(the processes' stdout and stderr). The training process is ``python -m <worker_module> JOB_DIR``; exit 0 = done,
75 = yielded or shut down after a checkpoint, 1 = failed with an ``error`` event, anything else = crashed.

The child runs in a session of its own (a Ctrl-C in the service's terminal must reach only the service, which then
asks the child to checkpoint) and gets SIGKILL from the kernel if the service dies (PR_SET_PDEATHSIG, set by a
two-line bootstrap before the module runs as ``python -m`` would run it), so a
``kill -9`` of the service never leaves an orphan training on the GPU without a lease; the restarted service also
kills any stale child it finds by its recorded pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from baton.runtime.logging import log_event
from services.trainer.model import Job, to_json
from services.trainer.sources import document_text_path

log = logging.getLogger(__name__)

SPEC_FILE = "spec.json"
EVENTS_FILE = "events.jsonl"
LOG_FILE = "worker.log"
CHECKPOINTS_DIR = "checkpoints"
OUTPUT_DIR = "output"
EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_YIELDED = 75


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    with staging.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, ensure_ascii=False)
        handle.flush()
        os.fsync(handle.fileno())
    staging.replace(path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return env


# The child's first act, in its own fresh interpreter (no preexec_fn: running Python between fork and exec can
# deadlock in a process with threads, and the service has gRPC's): ask the kernel for SIGKILL when the service dies,
# make sure it has not died already, then run the module as ``python -m`` would.
_BOOTSTRAP = """
import ctypes, os, runpy, signal, sys
parent, module, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
if sys.platform.startswith("linux"):
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
if os.getppid() != parent:
    sys.exit(70)
sys.argv = [module, *args]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


class ChildProcess:
    """One run of ``python -m MODULE ARGS...`` with its output appended to a log file."""

    def __init__(self, module: str, args: list[str], log_path: Path) -> None:
        self.module = module
        self.args = args
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self.started_monotonic = 0.0

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    async def start(self) -> None:
        parent = os.getpid()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {self.module} {' '.join(self.args)}\n".encode())
            log_file.flush()
            # Started from the event loop's thread: PDEATHSIG fires when the *thread* that forked exits.
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _BOOTSTRAP,
                str(parent),
                self.module,
                *self.args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=child_env(),
                start_new_session=True,
            )
        self.started_monotonic = time.monotonic()

    async def wait(self) -> int:
        assert self.process is not None
        return await self.process.wait()

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process is not None else None

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)


class EventTail:
    """Reads the complete lines the child appended to events.jsonl since ``offset`` (bytes).

    A line without its newline is left for the next read: the child may be in the middle of writing it, or may have
    been killed there — ``seal`` then ends it with a newline before the next child starts, so the torn line stays a
    line of its own (skipped as unreadable) instead of swallowing the next child's first event.
    """

    def __init__(self, path: Path, offset: int) -> None:
        self.path = path
        self.offset = offset

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        events = []
        for raw in data[: end + 1].splitlines():
            if not raw.strip():
                continue
            try:
                event = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                log_event(log, "trainer.event_unreadable", level=logging.WARNING, path=str(self.path), line=raw[:200])
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def seal(self) -> None:
        """End a torn last line (only when no child is running: the service is then the only writer)."""
        with contextlib.suppress(FileNotFoundError), self.path.open("rb+") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")


def log_tail(path: Path, lines: int = 25) -> str:
    """The last lines of a child's log, for FAILED messages."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def kill_stale_child(pid: int, job_dir: Path) -> bool:
    """Kill a training process a previous run of the service left behind (it holds no lease any more).

    The pid is checked against /proc/PID/cmdline first, so a reused pid of an unrelated process is never killed.
    """
    if pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if str(job_dir).encode() not in cmdline:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        if _is_zombie(pid):
            break
        time.sleep(0.05)
    log_event(log, "trainer.stale_child_killed", level=logging.WARNING, pid=pid, job_dir=str(job_dir))
    return True


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def worker_spec(job: Job, *, device: str, texts_dir: Path) -> dict[str, Any]:
    """spec.json for the training process: the resolved job spec in the contract's shape."""
    spec = job.spec
    if spec.jsonl is not None:
        dataset: dict[str, Any] = {
            "kind": "jsonl",
            "path": spec.jsonl.path,
            "format": spec.jsonl.format,
            "train_on_prompt": spec.jsonl.train_on_prompt,
        }
    else:
        assert spec.documents is not None
        documents = [
            {"id": d.document_id, "path": str(document_text_path(texts_dir, d)), "source": d.source}
            for d in spec.documents.resolved
        ]
        dataset = {"kind": "texts", "documents": documents}
    lora = to_json(spec.lora)
    lora["target_modules"] = list(job.requested_target_modules)  # empty = the worker's own choice (see validation)
    return {
        "job_id": job.job_id,
        "name": spec.name,
        "base_model_path": spec.base_model_path,
        "dataset": dataset,
        "lora": lora,
        "quantization": to_json(spec.quantization),
        "hyper": to_json(spec.hyperparameters),
        "device": device,
    }
