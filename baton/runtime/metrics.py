"""Prometheus /metrics for gRPC services (the gateway mounts the same registry in FastAPI instead)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server


class MetricsServer:
    """Serves /metrics on its own port from a background thread; port 0 in settings means "off"."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry = REGISTRY) -> None:
        self._server = None
        self.port = 0
        if port:
            self._server, _thread = start_http_server(port, addr=host, registry=registry)
            self.port = self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
