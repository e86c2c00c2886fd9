"""Shared test fixtures. Integration fixtures start real service processes on free loopback ports."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from baton.runtime.process import PORT_RANGE_ENV, ServiceProcess, free_port
from tests import durations

pytest_plugins = [
    "tests.fixtures.embedder",
    "tests.fixtures.store",
    "tests.fixtures.weaviate",
    "tests.fixtures.gateway",
    "tests.fixtures.inference",
    "tests.fixtures.trainer",
    "tests.fixtures.models",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
# In CI a test that needs a missing component must fail, never skip (DESIGN.md, working rules).
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
# OpenMP/torch threads for the services the tests start: `make test` sets OMP_NUM_THREADS=1 (TEST_THREADS), one
# thread per worker on two cores; a bare `pytest` (one process) lets them use two.
SERVICE_THREADS = os.environ.get("OMP_NUM_THREADS", "2")

# `make test` runs the suite in parallel workers (pytest-xdist: gw0, gw1, ...). Each gets its own range of ports,
# below the kernel's ephemeral range, for free_port to pick from — it and every process it starts, since the range
# travels in the environment — so two workers never hand the same port to two services at once.
PORTS_PER_WORKER = 4000
FIRST_WORKER_PORT = 12000


def _worker_port_range(worker: str) -> str:
    first = FIRST_WORKER_PORT + int(worker.removeprefix("gw")) * PORTS_PER_WORKER
    return f"{first}-{first + PORTS_PER_WORKER - 1}"


if worker := os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ[PORT_RANGE_ENV] = _worker_port_range(worker)


@pytest.hookimpl(trylast=True)  # after pytest's own reordering for fixtures, which a stable sort keeps within a file
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest test files first. `make test`'s workers take the files in this order (`--dist loadfile
    --no-loadscope-reorder`), each the next one as it frees up, so neither is left running a long file alone at the
    end: xdist's own order (the most tests first) left the single-test files of a minute or two to the end and one
    worker idle for ~3 minutes. A file not in tests/durations.json goes first, as if it were the longest."""
    seconds = durations.load()
    items.sort(key=lambda item: -seconds.get(item.nodeid.partition("::")[0], math.inf))


@dataclass
class SchedulerHandle:
    """A scheduler child process that can be killed and restarted on the same port and state."""

    home: Path
    extra_args: list[str]
    grpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: ServiceProcess | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> SchedulerHandle:
        args = ["--home", str(self.home), "--grpc-port", str(self.grpc_port)]
        args += ["--metrics-port", str(self.metrics_port), "--no-use-nvml", *self.extra_args]
        self.process = ServiceProcess(
            "scheduler", "services.scheduler", args, grpc_target=self.target, log_path=self.home / "scheduler.log"
        )
        self.process.start()
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


StartScheduler = Callable[..., SchedulerHandle]


@pytest.fixture
def start_scheduler(tmp_path: Path) -> Iterator[StartScheduler]:
    """Factory: start a scheduler process with extra flags; every one started is stopped after the test."""
    started: list[SchedulerHandle] = []

    def start(*extra_args: str) -> SchedulerHandle:
        handle = SchedulerHandle(home=tmp_path / f"scheduler-{len(started)}", extra_args=list(extra_args))
        started.append(handle)
        return handle.start()

    yield start
    for handle in started:
        handle.stop()
