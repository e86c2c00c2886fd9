"""The scheduler's Prometheus metrics: every lease transition is counted here (and logged by the core).

The Grafana "GPU timeline" is drawn from ``baton_lease_holders`` (who holds the GPU, by kind), the queue gauge,
and the grant / preemption / revocation counters; handover and wait histograms show how fast the GPU changes hands.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from services.scheduler.model import LeaseKind

_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_SLOW_BUCKETS = (0.01, 0.1, 1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600)


def kind_label(kind: LeaseKind) -> str:
    return kind.label


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.holders = Gauge("baton_lease_holders", "Leases held now, by kind.", ["kind"], registry=registry)
        self.queue_length = Gauge("baton_lease_queue_length", "Requests waiting for the GPU.", registry=registry)
        self.vram_capacity = Gauge("baton_lease_vram_capacity_bytes", "VRAM to hand out.", registry=registry)
        self.vram_used = Gauge("baton_lease_vram_used_bytes", "VRAM granted to holders now.", registry=registry)
        self.epoch = Gauge("baton_lease_epoch", "Newest fencing epoch granted.", registry=registry)
        # Who holds the GPU, drawn as a state timeline; a series exists only while its lease is held.
        self.holder = Gauge(
            "baton_lease_holder", "1 per lease held now, by holder and kind.", ["holder", "kind"], registry=registry
        )
        self._holder_labels: set[tuple[str, str]] = set()
        self.grants = Counter("baton_lease_grants", "Leases granted.", ["kind"], registry=registry)
        self.releases = Counter("baton_lease_releases", "Leases released by their holder.", ["kind"], registry=registry)
        self.preemptions = Counter(
            "baton_lease_preemptions", "Holders asked to yield, by the holder's kind.", ["kind"], registry=registry
        )
        self.revocations = Counter(
            "baton_lease_revocations", "Leases taken away, by kind and reason.", ["kind", "reason"], registry=registry
        )
        self.wait_seconds = Histogram(
            "baton_lease_wait_seconds", "Request to grant.", ["kind"], buckets=_SLOW_BUCKETS, registry=registry
        )
        self.handover_seconds = Histogram(
            "baton_lease_handover_seconds",
            "From the release (or revocation) that freed the GPU to the grant it enabled.",
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.held_seconds = Histogram(
            "baton_lease_held_seconds", "Grant to release.", ["kind"], buckets=_SLOW_BUCKETS, registry=registry
        )
        for kind in LeaseKind:
            self.holders.labels(kind_label(kind)).set(0)

    def set_holders(self, holders: set[tuple[str, str]]) -> None:
        """``baton_lease_holder`` for exactly these (holder, kind) pairs; released ones' series are removed."""
        for gone in self._holder_labels - holders:
            self.holder.remove(*gone)
        for held in holders:
            self.holder.labels(*held).set(1)
        self._holder_labels = set(holders)
