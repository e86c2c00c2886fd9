"""Run a baton service as a child process and wait until its gRPC health says SERVING.

Used by ``baton up``, ``baton demo``, the benchmarks and the test fixtures, so that all of them start services
exactly the same way. When a child dies before it is healthy, the error carries the tail of its log.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# "FIRST-LAST": free_port picks from these ports instead of asking the kernel. Processes that pick ports at the same
# time — parallel test workers (tests/conftest.py gives each its own range) — then never pick the same one.
PORT_RANGE_ENV = "BATON_PORT_RANGE"
_handed_out: set[int] = set()  # a port is handed out once per process: the first taker may not have bound it yet


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now: the kernel's choice, or one of BATON_PORT_RANGE's; good enough for loopback
    tests and demos."""
    span = os.environ.get(PORT_RANGE_ENV, "").strip()
    if not span:
        return _bind_and_release(host, 0)
    first, last = (int(end) for end in span.split("-"))
    candidates = [port for port in range(first, last + 1) if port not in _handed_out]
    random.shuffle(candidates)
    for port in candidates:
        with contextlib.suppress(OSError):
            _handed_out.add(_bind_and_release(host, port))
            return port
    raise RuntimeError(f"no free port left in {PORT_RANGE_ENV}={span}")


def _bind_and_release(host: str, port: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, port))
        return int(sock.getsockname()[1])


def grpc_health_status(target: str, *, timeout_s: float = 1.0) -> int | None:
    """The overall health of the gRPC server at ``target`` (SERVING = 1), or None if it does not answer."""
    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return None
        return int(response.status)


def http_ok(url: str, *, timeout_s: float = 1.0) -> bool:
    """True when ``url`` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 200 <= response.status < 300
    except (OSError, ValueError):
        return False


class ServiceExited(RuntimeError):
    pass


class ServiceProcess:
    """One service child process, its log file and its gRPC address."""

    def __init__(
        self,
        name: str,
        module: str,
        args: Sequence[str],
        *,
        grpc_target: str = "",
        log_path: Path,
        env: dict[str, str] | None = None,
        health_url: str = "",
    ) -> None:
        self.name = name
        self.module = module
        self.args = list(args)
        self.grpc_target = grpc_target
        self.health_url = health_url
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, *, wait_healthy_s: float = 60.0) -> ServiceProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the child's lifetime)
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop the children in order
        )
        if wait_healthy_s > 0:
            self.wait_healthy(wait_healthy_s)
        return self

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServiceExited(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if self._healthy():
                return
            time.sleep(0.05)
        where = self.health_url or self.grpc_target
        raise TimeoutError(f"{self.name} not healthy at {where} after {timeout_s:g} s:\n{self.log_tail()}")

    def _healthy(self) -> bool:
        if self.health_url:
            return http_ok(self.health_url)
        return grpc_health_status(self.grpc_target, timeout_s=0.5) == health_pb2.HealthCheckResponse.SERVING

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the crash case. Nothing gets a chance to clean up."""
        if self.alive():
            assert self.process is not None
            self.process.kill()
            self.process.wait(timeout=10)
        self._kill_group()
        self._close_log()

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM and wait (the graceful path); SIGKILL if it does not stop in time."""
        if self.process is None:
            return None
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._kill_group()
        self._close_log()
        return self.process.returncode

    def _kill_group(self) -> None:
        # Engines spawn workers (vLLM's engine core) in the child's session; none may outlive it and keep memory.
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
