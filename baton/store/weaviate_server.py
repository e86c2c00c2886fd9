"""Run a single-node Weaviate server on loopback: for tests, benchmarks and local use of the Weaviate backend.

The binary is built by ``make weaviate`` (mk/weaviate.mk) into ``.venv/bin/weaviate-server``; ``BATON_WEAVIATE_BIN``
points elsewhere. The settings are those of ../shared/FACTS.md ("Weaviate"): every port free and on loopback (gRPC
binds all interfaces), Raft bootstrapped as a one-node cluster, no modules, no telemetry, no profiler on :6060.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from baton.runtime.process import ServiceProcess, free_port

WEAVIATE_VERSION = "v1.39.0"
BIN_ENV = "BATON_WEAVIATE_BIN"
# Weaviate's QUERY_MAXIMUM_RESULTS for servers started here: the largest k a search may ask for.
MAX_RESULTS = 100_000


def weaviate_binary() -> Path | None:
    """``$BATON_WEAVIATE_BIN``, else the one ``make weaviate`` builds next to this interpreter, else PATH's."""
    configured = os.environ.get(BIN_ENV)
    if configured:
        return Path(configured)
    beside_python = Path(sys.executable).parent / "weaviate-server"
    if beside_python.exists():
        return beside_python
    found = shutil.which("weaviate-server")
    return Path(found) if found else None


def _free_port_pair() -> int:
    """A free port whose successor is free too."""
    for _ in range(100):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("found no two consecutive free ports on 127.0.0.1")


class _BinaryProcess(ServiceProcess):
    """A ServiceProcess that runs an executable rather than a Python module."""

    def __init__(self, name: str, command: list[str], *, log_path: Path, env: dict[str, str], health_url: str) -> None:
        super().__init__(name, "", [], log_path=log_path, health_url=health_url)
        self.env = env  # the whole environment, not layered over ours: HOST and PORT must be absent
        self.command = command

    def start(self, *, wait_healthy_s: float = 60.0) -> ServiceProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the child's lifetime)
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        if wait_healthy_s > 0:
            self.wait_healthy(wait_healthy_s)
        return self


@dataclass
class WeaviateServer:
    """One Weaviate process over ``data_dir``; ``kill`` and ``start`` again reuse the same ports and data."""

    data_dir: Path
    binary: Path
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    process: ServiceProcess | None = None
    _cluster_ports: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, *, wait_ready_s: float = 120.0) -> WeaviateServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [str(self.binary), "--scheme", "http", "--host", "127.0.0.1", "--port", str(self.http_port)]
        self.process = _BinaryProcess(
            "weaviate",
            command,
            log_path=self.data_dir.parent / f"{self.data_dir.name}.log",
            env=self._environment(),
            health_url=f"{self.url}/v1/.well-known/ready",
        )
        self.process.start(wait_healthy_s=wait_ready_s)
        return self

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.process is not None:
            self.process.kill()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout_s=30)

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines) if self.process is not None else "(not started)"

    def _environment(self) -> dict[str, str]:
        if not self._cluster_ports:  # fixed on first start, so a restart finds its Raft peers where they were
            raft = _free_port_pair()
            self._cluster_ports = {
                "CLUSTER_GOSSIP_BIND_PORT": free_port(),
                "CLUSTER_DATA_BIND_PORT": free_port(),
                "RAFT_PORT": raft,
                # With CLUSTER_IN_LOCALHOST the server dials the Raft port + 1 for its internal RPC, whatever
                # RAFT_INTERNAL_RPC_PORT says (the client's embedded mode notes it; cluster/resolver/rpc.go).
                "RAFT_INTERNAL_RPC_PORT": raft + 1,
            }
        env = {key: value for key, value in os.environ.items() if key not in {"HOST", "PORT"}}  # the flags read them
        env.update({name: str(port) for name, port in self._cluster_ports.items()})
        env.update(
            {
                "PERSISTENCE_DATA_PATH": str(self.data_dir),
                "DEFAULT_VECTORIZER_MODULE": "none",
                "AUTHENTICATION_ANONYMOUS_ACCESS_ENABLED": "true",
                "CLUSTER_IN_LOCALHOST": "true",
                "CLUSTER_HOSTNAME": "node1",
                "RAFT_BOOTSTRAP_EXPECT": "1",
                "RAFT_JOIN": f"node1:{self._cluster_ports['RAFT_PORT']}",
                "GRPC_PORT": str(self.grpc_port),
                "DISABLE_TELEMETRY": "true",
                "GO_PROFILING_DISABLE": "true",
                "API_BASED_MODULES_DISABLED": "true",
                "QUERY_MAXIMUM_RESULTS": str(MAX_RESULTS),
                "LOG_LEVEL": "warning",
                "PROMETHEUS_MONITORING_ENABLED": "false",
            }
        )
        return env
