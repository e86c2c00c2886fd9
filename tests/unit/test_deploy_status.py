"""``baton deploy status`` against a fake Kubernetes API server (a neighbour faked at the HTTP level: the real
``kubernetes`` client, real kubeconfig loading, real JSON; the scheduler's /metrics text comes from the real
SchedulerMetrics class)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from baton.cli import main as cli
from baton.cli.deploy import parse_lease_metrics
from services.scheduler.metrics import SchedulerMetrics

NAMESPACE = "baton"


def deployment(name: str, ready: int, replicas: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {"spec": {"containers": [{"name": name, "image": f"baton/{name}:0.1.0"}]}},
        },
        "status": {"replicas": replicas, **({"readyReplicas": ready} if ready else {})},  # as the API sends it
    }


def pod(name: str, ready: bool, restarts: int = 0) -> dict[str, Any]:
    status = {"name": "c", "ready": ready, "restartCount": restarts, "image": "i", "imageID": ""}
    return {
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"containers": [{"name": "c", "image": "i"}], "nodeName": "gpu-node"},
        "status": {"phase": "Running", "containerStatuses": [status]},
    }


def scheduler_metrics_text() -> str:
    registry = CollectorRegistry()
    metrics = SchedulerMetrics(registry)
    metrics.set_holders({("trainer/job-1", "training"), ("gone", "serving")})
    metrics.set_holders({("trainer/job-1", "training")})  # "gone" released: its series must disappear
    metrics.queue_length.set(2)
    metrics.epoch.set(17)
    metrics.vram_capacity.set(96 << 30)
    metrics.vram_used.set(40 << 30)
    return generate_latest(registry).decode()


class FakeKubernetes:
    """Answers the paths `baton deploy status` reads; ``routes`` can be changed by a test."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, str, str]] = {}
        self.seen: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = unquote(self.path.split("?")[0])  # the client sends scheduler%3Ametrics, as kubectl does
                fake.seen.append(path)
                code, kind, body = fake.routes.get(path, (404, "application/json", json.dumps({"kind": "Status"})))
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve_json(self, path: str, kind: str, items: list[dict[str, Any]]) -> None:
        self.routes[path] = (200, "application/json", json.dumps({"kind": kind, "metadata": {}, "items": items}))


@pytest.fixture
def fake_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKubernetes]:
    fake = FakeKubernetes()
    apps, core = f"/apis/apps/v1/namespaces/{NAMESPACE}", f"/api/v1/namespaces/{NAMESPACE}"
    fake.serve_json(f"{apps}/deployments", "DeploymentList",
                    [deployment("gateway", 1), deployment("inference", 1), deployment("trainer", 0)])  # fmt: skip
    fake.serve_json(f"{apps}/statefulsets", "StatefulSetList", [deployment("weaviate", 1)])
    fake.serve_json(f"{core}/pods", "PodList", [pod("gateway-1", True), pod("trainer-1", False, restarts=3)])
    fake.routes[f"{core}/services/scheduler:metrics/proxy/metrics"] = (200, "text/plain", scheduler_metrics_text())
    kubeconfig = {
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
        "users": [{"name": "me", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}],
    }  # fmt: skip
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(path))
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        cli.main(["deploy", "status", *argv])
    return int(exited.value.code or 0) if not isinstance(exited.value.code, str) else 2, capsys.readouterr().out


def test_status_shows_workloads_pods_and_the_lease(fake_cluster: FakeKubernetes, capsys) -> None:
    code, out = run_cli(capsys)
    assert code == 1, "the trainer is not ready: exit 1"
    assert "Deployment/trainer" in out and "0/1" in out and "<- not ready" in out
    assert "Deployment/gateway" in out and "StatefulSet/weaviate" in out
    assert "trainer-1" in out and "no" in out and " 3 " in out
    assert "GPU lease: epoch 17, 40.0 of 96 GiB granted, 2 waiting" in out
    assert "held by: trainer/job-1 (training)" in out and "gone" not in out


def test_status_is_zero_when_everything_is_ready(fake_cluster: FakeKubernetes, capsys) -> None:
    fake_cluster.serve_json(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments", "DeploymentList",
                            [deployment("gateway", 1)])  # fmt: skip
    code, out = run_cli(capsys)
    assert code == 0, out


def test_an_unreachable_scheduler_is_reported_not_fatal(fake_cluster: FakeKubernetes, capsys) -> None:
    del fake_cluster.routes[f"/api/v1/namespaces/{NAMESPACE}/services/scheduler:metrics/proxy/metrics"]
    code, out = run_cli(capsys)
    assert code == 1, "the trainer is still not ready"
    assert "GPU lease: unknown" in out and "did not answer through the API server" in out
    assert "Deployment/gateway" in out


def test_another_namespace_is_asked_for(fake_cluster: FakeKubernetes, capsys) -> None:
    code, _ = run_cli(capsys, "--namespace", "elsewhere")
    assert code == 2  # the fake knows no such namespace: the API's 404 is a clear error, not a traceback
    assert "/apis/apps/v1/namespaces/elsewhere/deployments" in fake_cluster.seen


def test_parse_lease_metrics_of_a_free_gpu() -> None:
    registry = CollectorRegistry()
    SchedulerMetrics(registry)
    lease = parse_lease_metrics(generate_latest(registry).decode())
    assert lease.holders == [] and lease.queue_length == 0 and lease.epoch == 0
