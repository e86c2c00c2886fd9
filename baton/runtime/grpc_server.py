"""The bootstrap every gRPC service runs: one asyncio server with health checking, reflection, /metrics and a
graceful stop on SIGTERM/SIGINT.

Health starts NOT_SERVING and turns SERVING only when the service says it is ready (a model loaded, a store
opened): Kubernetes probes ``grpc.health.v1`` natively, and the test fixtures poll the same thing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from baton.runtime.logging import log_event
from baton.runtime.metrics import MetricsServer
from baton.runtime.settings import ServiceSettings

log = logging.getLogger(__name__)

# grpc sets SO_REUSEPORT by default, which would let a second copy of a service bind the same port and silently
# share its traffic. One scheduler per port is a safety property here, so it is switched off.
SERVER_OPTIONS = (("grpc.so_reuseport", 0),)


class GrpcService:
    """A grpc.aio server plus the standard extras. Register servicers on ``.server`` before ``start()``."""

    def __init__(self, name: str, settings: ServiceSettings, service_names: Sequence[str]) -> None:
        self.name = name
        self.settings = settings
        self.service_names = list(service_names)
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.port = 0
        self.metrics: MetricsServer | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> int:
        address = f"{self.settings.host}:{self.settings.grpc_port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"{self.name}: cannot bind {address}; is another process using the port?")
        await self.server.start()
        self.metrics = MetricsServer(self.settings.host, self.settings.metrics_port)
        await self.set_serving(False)
        log_event(log, "service.started", service=self.name, grpc_port=self.port, metrics_port=self.metrics.port)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait_for_stop(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        """Refuse new calls, give in-flight calls the grace period, then stop."""
        log_event(log, "service.stopping", service=self.name, grace_s=self.settings.shutdown_grace_s)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.shutdown_grace_s)
        if self.metrics is not None:
            self.metrics.close()
        log_event(log, "service.stopped", service=self.name)


async def run_until_signalled(
    service: GrpcService,
    *,
    on_ready: Callable[[], Awaitable[None]] | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Start ``service``, call ``on_ready``, mark it SERVING, and run until SIGTERM/SIGINT; then stop gracefully."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, service.request_stop)
    await service.start()
    try:
        if on_ready is not None:
            await on_ready()
        await service.set_serving(True)
        log_event(log, "service.ready", service=service.name, grpc_port=service.port)
        await service.wait_for_stop()
    finally:
        await service.stop()
        if on_stop is not None:
            await on_stop()
