"""``baton deploy status``: baton in a Kubernetes cluster (deploy/k8s/), seen through the Kubernetes API.

Reads the Deployments, StatefulSets and Pods of the namespace with the ``kubernetes`` client (the kubeconfig's
current context, ``--context``, or the pod's service account), and the GPU lease from the scheduler's own
``/metrics`` through the API server's service proxy — so it needs nothing but kubectl's credentials: no
port-forward, no gRPC route into the cluster. Exit status 0 when every workload is ready, 1 when not.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any

DEFAULT_NAMESPACE = "baton"
# The scheduler's Service and the name of its metrics port (deploy/k8s/base/scheduler.yaml).
SCHEDULER_METRICS = "scheduler:metrics"


@dataclass(frozen=True)
class WorkloadStatus:
    kind: str
    name: str
    ready: int
    desired: int
    images: tuple[str, ...]

    @property
    def healthy(self) -> bool:
        return self.ready >= self.desired


@dataclass(frozen=True)
class PodStatus:
    name: str
    phase: str
    ready: bool
    restarts: int
    node: str


@dataclass
class LeaseStatus:
    holders: list[tuple[str, str]] = field(default_factory=list)  # (holder, kind)
    queue_length: int = 0
    epoch: int = 0
    vram_used_bytes: float = 0.0
    vram_capacity_bytes: float = 0.0
    error: str = ""


@dataclass
class DeployStatus:
    namespace: str
    workloads: list[WorkloadStatus]
    pods: list[PodStatus]
    lease: LeaseStatus

    @property
    def healthy(self) -> bool:
        return bool(self.workloads) and all(w.healthy for w in self.workloads)


def read_status(api_client: Any, namespace: str) -> DeployStatus:
    """Everything ``baton deploy status`` shows, read through ``api_client`` (a kubernetes.client.ApiClient)."""
    from kubernetes import client

    apps = client.AppsV1Api(api_client)
    core = client.CoreV1Api(api_client)
    workloads = [_workload("Deployment", d) for d in apps.list_namespaced_deployment(namespace).items]
    workloads += [_workload("StatefulSet", s) for s in apps.list_namespaced_stateful_set(namespace).items]
    pods = [_pod(p) for p in core.list_namespaced_pod(namespace).items]
    return DeployStatus(namespace, sorted(workloads, key=lambda w: w.name), sorted(pods, key=lambda p: p.name),
                        read_lease(core, namespace))  # fmt: skip


def _workload(kind: str, obj: Any) -> WorkloadStatus:
    images = tuple(c.image for c in obj.spec.template.spec.containers)
    desired = obj.spec.replicas if obj.spec.replicas is not None else 1
    return WorkloadStatus(kind, obj.metadata.name, obj.status.ready_replicas or 0, desired, images)


def _pod(obj: Any) -> PodStatus:
    statuses = obj.status.container_statuses or []
    ready = bool(statuses) and all(s.ready for s in statuses)
    restarts = sum(s.restart_count or 0 for s in statuses)
    return PodStatus(obj.metadata.name, obj.status.phase or "Unknown", ready, restarts, obj.spec.node_name or "")


def read_lease(core: Any, namespace: str) -> LeaseStatus:
    """The lease as the scheduler's /metrics tells it (baton_lease_holder, queue, epoch, VRAM)."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        text = core.connect_get_namespaced_service_proxy_with_path(SCHEDULER_METRICS, namespace, "metrics")
    except (ApiException, HTTPError) as error:
        reason = getattr(error, "reason", None) or str(error)
        return LeaseStatus(error=f"the scheduler's /metrics did not answer through the API server ({reason})")
    return parse_lease_metrics(str(text))


def parse_lease_metrics(text: str) -> LeaseStatus:
    from prometheus_client.parser import text_string_to_metric_families

    lease = LeaseStatus()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "baton_lease_holder" and sample.value:
                lease.holders.append((sample.labels["holder"], sample.labels["kind"]))
            elif sample.name == "baton_lease_queue_length":
                lease.queue_length = int(sample.value)
            elif sample.name == "baton_lease_epoch":
                lease.epoch = int(sample.value)
            elif sample.name == "baton_lease_vram_used_bytes":
                lease.vram_used_bytes = sample.value
            elif sample.name == "baton_lease_vram_capacity_bytes":
                lease.vram_capacity_bytes = sample.value
    lease.holders.sort()
    return lease


def render(status: DeployStatus) -> str:
    lines = [f"namespace {status.namespace}", f"  {'workload':<26}{'ready':>7}  image"]
    for w in status.workloads:
        mark = "" if w.healthy else "   <- not ready"
        lines.append(f"  {w.kind + '/' + w.name:<26}{f'{w.ready}/{w.desired}':>7}  {', '.join(w.images)}{mark}")
    if not status.workloads:
        lines.append("  (no Deployments or StatefulSets: kubectl apply -k deploy/k8s/overlays/single-gpu)")
    lines.append(f"  {'pod':<40}{'phase':<10}{'ready':<7}{'restarts':>9}  node")
    for p in status.pods:
        lines.append(f"  {p.name:<40}{p.phase:<10}{'yes' if p.ready else 'no':<7}{p.restarts:>9}  {p.node}")
    lease = status.lease
    if lease.error:
        lines.append(f"GPU lease: unknown — {lease.error}")
    else:
        gib = 1 << 30
        lines.append(f"GPU lease: epoch {lease.epoch}, {lease.vram_used_bytes / gib:.1f} of "
                     f"{lease.vram_capacity_bytes / gib:.0f} GiB granted, {lease.queue_length} waiting")  # fmt: skip
        held = [f"{holder} ({kind})" for holder, kind in lease.holders]
        lines.append("  held by: " + (", ".join(held) if held else "nobody (the GPU is free)"))
    return "\n".join(lines)


def api_client(context: str | None) -> Any:
    """The kubeconfig's context (or ``context``); inside a pod, its service account."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        # KUBECONFIG is read now, not when the kubernetes package was imported (it may list several files).
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, context=context)
    except (ConfigException, FileNotFoundError, TypeError):
        try:
            config.load_incluster_config()
        except ConfigException as error:
            raise SystemExit(f"baton deploy status: no kubeconfig and not in a cluster ({error})") from None
    return client.ApiClient()


def status(args: argparse.Namespace) -> None:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        found = read_status(api_client(args.context), args.namespace)
    except (ApiException, HTTPError) as error:
        sys.exit(f"baton deploy status: the Kubernetes API refused or did not answer: {error}")
    print(render(found))
    sys.exit(0 if found.healthy else 1)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("deploy", help="baton in Kubernetes: `baton deploy status`")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser(
        "status",
        help="workloads, pods and the GPU lease in the cluster (exit 1: not ready)",
        description="Read the Deployments, StatefulSets and Pods of deploy/k8s with your kubeconfig's credentials, "
        "and the GPU lease (holders, queue, epoch, VRAM) from the scheduler's /metrics through the API server's "
        "service proxy (no port-forward). Exits 1 while anything is not ready.",
        epilog="example: kubectl apply -k deploy/k8s/overlays/single-gpu && baton deploy status -n baton",
    )
    show.add_argument("--namespace", "-n", default=DEFAULT_NAMESPACE, help="namespace of deploy/k8s [baton]")
    show.add_argument("--context", default=None, help="kubeconfig context [the current one]")
    show.set_defaults(run=status)
