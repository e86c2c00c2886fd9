"""The containers' health check: ``healthcheck.py SERVICE`` exits 0 when the service in this container is ready.

gRPC services must answer grpc.health.v1 with SERVING (NOT_SERVING until their model or store is ready); the
embedder and the gateway must answer ``/health`` with 2xx. The port is the one the service itself reads: its
environment variable, else its settings' default. Kubernetes probes gRPC and HTTP natively; this is for compose
and ``docker run``, where the image has no grpc_health_probe binary but does have baton's client code.
"""

from __future__ import annotations

import os
import sys
from importlib import import_module

from baton.runtime.process import grpc_health_status, http_ok
from baton.runtime.settings import env_name

SERVING = 1
# service -> (settings class, port field, how to ask)
CHECKS: dict[str, tuple[str, str, str]] = {
    "scheduler": ("services.scheduler.settings:SchedulerSettings", "grpc_port", "grpc"),
    "embedder": ("services.embedder.settings:EmbedderSettings", "http_port", "http"),
    "inference": ("services.inference.settings:InferenceSettings", "grpc_port", "grpc"),
    "trainer": ("services.trainer.settings:TrainerSettings", "grpc_port", "grpc"),
    "gateway": ("services.gateway.settings:GatewaySettings", "port", "http"),
}


def port_of(settings_path: str, field: str) -> int:
    module, name = settings_path.split(":")
    cls = getattr(import_module(module), name)
    return int(os.environ.get(env_name(cls, field), cls.model_fields[field].default))


def healthy(service: str) -> bool:
    settings_path, field, kind = CHECKS[service]
    port = port_of(settings_path, field)
    if kind == "grpc":
        return grpc_health_status(f"127.0.0.1:{port}", timeout_s=3.0) == SERVING
    return http_ok(f"http://127.0.0.1:{port}/health", timeout_s=3.0)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in CHECKS:
        raise SystemExit(f"usage: healthcheck.py {{{','.join(CHECKS)}}}")
    sys.exit(0 if healthy(sys.argv[1]) else 1)
