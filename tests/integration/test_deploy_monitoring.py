"""The Grafana dashboards against a real Prometheus scraping the real stack.

The five services start as `baton up` starts them (baton.stack: the tiny Qwen3, the hf engine, MiniLM), on free
ports, with /metrics on and exclusive GPU leases so that the GPU really changes hands. A real Prometheus (Debian's
package) scrapes them with deploy/prometheus/prometheus.yml rendered for those ports. A short workload — ingest,
searches, chats (one with an unknown model: an error code), a tiny training job that a chat preempts and that
then resumes — drives every metric the dashboards draw. Then every PromQL expression of every dashboard is
evaluated over the workload's time range through Prometheus' HTTP API, as Grafana would: a panel whose query
returns nothing (or only NaN) fails the test.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from baton.clients.gateway import GatewayClient
from baton.runtime.process import ServiceProcess, free_port, http_ok
from baton.stack import StackPorts, ensure_admin_key, ensure_default_user, resolve_model, stack_processes
from tests.fixtures.components import missing_component
from tests.fixtures.embedder import ONNX_CACHE
from tests.fixtures.trainer import author_text

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
SCRAPE_INTERVAL_S = 1
# Grafana's variables, fixed for a range query over the short workload (a few scrapes per rate window).
GRAFANA_VARIABLES = {"$__rate_interval": "20s", "$__interval": "1s", "$__range": "5m"}
# Plain LoRA on 64-token blocks: ~0.3 s a step on two cores (no gradient checkpointing on a CPU); long enough for a
# chat to preempt it (24 steps were not, once checkpointing went: the job finished as the yield arrived).
TRAINING = {"quantization": "none", "seq_len": 64, "micro_batch_size": 4, "grad_accumulation_steps": 1,
            "learning_rate": 3e-3, "eval_fraction": 0.2, "seed": 1, "rank": 4, "max_steps": 60}  # fmt: skip
JOB_TIMEOUT_S = 240.0


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        missing_component("Prometheus is not installed (make deploy-check installs Debian's package)")
    return binary


@dataclass
class MonitoredStack:
    ports: StackPorts
    metrics_ports: dict[str, int]
    processes: list[ServiceProcess]
    api_key: str

    def scrape_targets(self) -> dict[str, str]:
        """Prometheus job name → host:port where that service serves /metrics."""
        return {
            "scheduler": f"127.0.0.1:{self.metrics_ports['scheduler']}",
            "embedder": f"127.0.0.1:{self.ports.embedder_http}",
            "inference": f"127.0.0.1:{self.metrics_ports['inference']}",
            "trainer": f"127.0.0.1:{self.metrics_ports['trainer']}",
            "gateway": f"127.0.0.1:{self.ports.gateway}",
        }

    def client(self) -> GatewayClient:
        return GatewayClient(self.ports.gateway_url, api_key=self.api_key, timeout_s=120)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log_tail()}" for p in self.processes)


def monitoring_flags(name: str, metrics_port: int) -> list[str]:
    """What `baton up` leaves at its defaults but a monitored stack needs: /metrics on, and exclusive leases so
    that serving and training take turns on the (virtual) GPU — every turn is a handover on the dashboards."""
    flags = {
        "scheduler": ["--metrics-port", str(metrics_port), "--ttl-s", "5"],
        "embedder": ["--onnx-cache-dir", str(ONNX_CACHE)],
        "inference": ["--metrics-port", str(metrics_port), "--lease-exclusive"],
        "trainer": ["--metrics-port", str(metrics_port), "--lease-exclusive"],
        # Put idle serving to sleep after 2 s when training waits, so the job gets the GPU quickly.
        "gateway": ["--serving-idle-s", "2"],
    }
    return flags[name]


@pytest.fixture(scope="module")
def monitored_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MonitoredStack]:
    home = tmp_path_factory.mktemp("monitored-home")
    ports = StackPorts(*(free_port() for _ in range(6)))
    metrics_ports = {name: free_port() for name in ("scheduler", "inference", "trainer")}
    admin_key = ensure_admin_key(home)
    processes = stack_processes(home, ports, resolve_model(home))
    started: list[ServiceProcess] = []
    try:
        for process in processes:
            process.args += monitoring_flags(process.name, metrics_ports.get(process.name, 0))
            process.start(wait_healthy_s=180)
            started.append(process)
        api_key = ensure_default_user(home, ports.gateway_url, admin_key)
        yield MonitoredStack(ports, metrics_ports, started, api_key)
    finally:
        for process in reversed(started):
            process.stop()


def rendered_config(targets: dict[str, str], prometheus_port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with each job's target moved to the test port, scraped every second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = f"{SCRAPE_INTERVAL_S}s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(targets) <= set(jobs), f"prometheus.yml lacks jobs {set(targets) - set(jobs)}"
    for name, job in jobs.items():
        target = targets.get(name, f"127.0.0.1:{prometheus_port}" if name == "prometheus" else None)
        assert target is not None, f"prometheus.yml has a job {name!r} the test does not know"
        job["static_configs"] = [{"targets": [target]}]
    return config


@pytest.fixture(scope="module")
def prometheus(monitored_stack: MonitoredStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = prometheus_binary()
    workdir = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(rendered_config(monitored_stack.scrape_targets(), port)))
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not http_ok(f"{url}/-/ready"):
            assert process.poll() is None, (workdir / "prometheus.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "Prometheus not ready after 60 s"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def api(prometheus: str, path: str, **params: str) -> Any:
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{prometheus}/api/v1/{path}?{query}", timeout=30) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def wait_all_targets_up(prometheus: str, jobs: set[str]) -> None:
    deadline = time.monotonic() + 30
    while True:
        targets = api(prometheus, "targets")["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        if all(health.get(job) == "up" for job in jobs):
            return
        assert time.monotonic() < deadline, f"targets not up: {[(t['scrapeUrl'], t['lastError']) for t in targets]}"
        time.sleep(0.5)


def run_workload(stack: MonitoredStack) -> None:
    """Ingest, searches, chats (and one error), a training job that a chat preempts, then its resumption."""
    with stack.client() as client:
        texts = [(f"note-{i}.txt", author_text(i, sentences=14)) for i in range(10)]
        client.upload_texts(texts, collection="notes")
        for mode in ("hybrid", "bm25", "vector"):
            client.search("the keeper of the lighthouse", mode=mode, k=5)
        base_model = client.models()["data"][0]["id"]
        chat = openai.OpenAI(base_url=f"{stack.ports.gateway_url}/v1", api_key=stack.api_key, max_retries=0)
        ask(chat, base_model, "What does the author write about?")
        stream = chat.chat.completions.create(model=base_model, messages=[{"role": "user", "content": "Hello"}],
                                              max_tokens=8, stream=True)  # fmt: skip
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) is not None
        with pytest.raises(openai.NotFoundError):
            ask(chat, "no-such-model", "Hello")

        job = client.submit_training("monitored", collections=["notes"], **TRAINING)
        wait_job(stack, client, job["id"], lambda j: j["state"] == "running" and j["progress"].get("step", 0) >= 2)
        ask(chat, base_model, "And now, while it trains?")  # SERVING outranks TRAINING: the job yields
        done = wait_job(stack, client, job["id"], lambda j: j["terminal"])
        assert done["state"] == "succeeded", f"{done.get('error')}\n{stack.logs()}"
        ask(chat, base_model, "One more question after training.")


def ask(chat: openai.OpenAI, model: str, question: str) -> str:
    completion = chat.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=8, temperature=0
    )
    return completion.choices[0].message.content or ""


def wait_job(stack: MonitoredStack, client: GatewayClient, job_id: str, predicate: Any) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = client.training_job(job_id)
        if predicate(job):
            return job
        assert not job["terminal"], f"job ended {job['state']}: {job.get('error')}\n{stack.logs()}"
        assert time.monotonic() < deadline, f"job {job_id} stuck in {job['state']}\n{stack.logs()}"
        time.sleep(0.25)


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL) for every target of every panel."""
    queries = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                queries.append((path.stem, panel["title"], target["expr"]))
    return queries


def with_fixed_variables(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    leftover = re.findall(r"\$\w+", expr)
    assert not leftover, f"unknown Grafana variables {leftover} in {expr}"
    return expr


def has_data(result: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(float(value)) for series in result for _, value in series["values"])


def test_every_dashboard_query_returns_data(monitored_stack: MonitoredStack, prometheus: str) -> None:
    jobs = set(monitored_stack.scrape_targets())
    wait_all_targets_up(prometheus, jobs)
    started = time.time()
    run_workload(monitored_stack)
    time.sleep(3 * SCRAPE_INTERVAL_S)  # the last values are scraped
    queries = dashboard_queries()
    assert len(queries) >= 40, "the dashboards lost their panels"
    empty = []
    for dashboard, title, expr in queries:
        result = api(prometheus, "query_range", query=with_fixed_variables(expr), start=f"{started - 5:.3f}",
                     end=f"{time.time():.3f}", step="1")["result"]  # fmt: skip
        if not has_data(result):
            empty.append(f"{dashboard} / {title}: {expr}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    # Every service stayed up the whole time: none restarted, each answers now, and (nearly) every scrape succeeded —
    # a 1 s scrape may time out while training fills both cores (it did, once, in a full run), a down service does
    # not come back by itself.
    assert by_job(api(prometheus, "query", query="up")["result"], jobs) == dict.fromkeys(jobs, 1.0)
    restarts = by_job(api(prometheus, "query", query="changes(process_start_time_seconds[5m])")["result"], jobs)
    assert restarts == dict.fromkeys(jobs, 0.0)
    scraped = by_job(api(prometheus, "query", query="avg_over_time(up[5m])")["result"], jobs)
    assert set(scraped) == jobs and min(scraped.values()) >= 0.9, scraped


def by_job(result: list[dict[str, Any]], jobs: set[str]) -> dict[str, float]:
    """An instant query's value per scrape job, for the jobs of the stack."""
    return {s["metric"]["job"]: float(s["value"][1]) for s in result if s["metric"]["job"] in jobs}
