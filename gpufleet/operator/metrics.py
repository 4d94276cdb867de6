"""Prometheus metrics of the operator, in a registry it owns (no module globals).

What an operator at scale must show: how long reconciles take, how many API calls it
makes (by verb: reads should come from the watch caches, writes only on change), and how
often a cached read missed and fell back to a GET.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from gpufleet.autoscale.replicas import ReplicaDecision
    from gpufleet.operator.scaling import PoolRound

RECONCILE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.reconcile_seconds = Histogram(
            "gpufleet_operator_reconcile_seconds",
            "Time of one reconcile of one ModelGroup or GpuPool (kind: full = a ModelGroup's children and status;"
            " status = its status only; pool = a GpuPool's children and status; pool_status = its status only)",
            ["kind"],
            buckets=RECONCILE_BUCKETS,
            registry=r,
        )
        self.api_requests = Counter(
            "gpufleet_operator_api_requests_total",
            "Requests the operator's reconciler sent to the API server (watches are kopf's, not counted)",
            ["verb"],
            registry=r,
        )
        self.cache_reads = Counter(
            "gpufleet_operator_cache_reads_total",
            "Reads of children from the watch caches (miss: a GET instead)",
            ["result"],
            registry=r,
        )
        # Demand and what the scaler makes of it (gpufleet.operator.scaler). Exported whether or not
        # spec.autoscaling is set: an HPA (through a Prometheus adapter) or a KEDA ScaledObject can
        # drive the scale subresource from gpufleet_autoscale_sequences instead of the operator.
        objects = ["kind", "namespace", "name"]
        self.sequences = Gauge(
            "gpufleet_autoscale_sequences",
            "Sequences in flight and waiting at the routers for a GpuPool's groups or a dedicated ModelGroup",
            objects,
            registry=r,
        )
        self.waiting = Gauge(
            "gpufleet_autoscale_waiting_sequences",
            "Sequences the routers hold because no pod serves their group yet (scale from zero)",
            objects,
            registry=r,
        )
        self.desired_replicas = Gauge(
            "gpufleet_autoscale_desired_replicas",
            "Pods the scaler asks for (spec.autoscaling set; else spec.replicas)",
            objects,
            registry=r,
        )
        self.recommended_replicas = Gauge(
            "gpufleet_autoscale_recommended_replicas",
            "Pods the demand asks for this round, before the scale-up and scale-down delays",
            objects,
            registry=r,
        )
        self.residency = Gauge(
            "gpufleet_pool_group_residency",
            "Devices of a GpuPool holding a group current (state: current = now; desired = what demand asks)",
            ["namespace", "pool", "group", "state"],
            registry=r,
        )
        self.group_demand = Gauge(
            "gpufleet_pool_group_sequences",
            "Sequences in flight and waiting at the routers for one pooled group",
            ["namespace", "pool", "group"],
            registry=r,
        )
        self.scale_changes = Counter(
            "gpufleet_autoscale_changes_total",
            "Changes the scaler made (what: replicas or residency; direction: up or down)",
            ["what", "direction"],
            registry=r,
        )

    def scaled(self, kind: str, namespace: str, name: str, replicas: int, result: PoolRound) -> None:
        """A pool's round, as gauges."""
        self.sequences.labels(kind, namespace, name).set(sum(result.demand.values()))
        for d in result.residency.decisions:
            self.residency.labels(namespace, name, d.group, "current").set(result.current.get(d.group, 0))
            self.residency.labels(namespace, name, d.group, "desired").set(d.after)
            self.group_demand.labels(namespace, name, d.group).set(d.demand)
            if d.changed:
                self.scale_changes.labels("residency", "up" if d.after > d.before else "down").inc()
        decision = result.replicas
        self.desired_replicas.labels(kind, namespace, name).set(decision.after if decision else replicas)
        if decision is not None:
            self.waiting.labels(kind, namespace, name).set(decision.waiting)
            self.recommended_replicas.labels(kind, namespace, name).set(decision.recommended)
            if decision.changed:
                self.scale_changes.labels("replicas", "up" if decision.after > decision.before else "down").inc()

    def scaled_group(self, namespace: str, name: str, decision: ReplicaDecision) -> None:
        kind = "ModelGroup"
        self.sequences.labels(kind, namespace, name).set(decision.sequences)
        self.waiting.labels(kind, namespace, name).set(decision.waiting)
        self.desired_replicas.labels(kind, namespace, name).set(decision.after)
        self.recommended_replicas.labels(kind, namespace, name).set(decision.recommended)
        if decision.changed:
            self.scale_changes.labels("replicas", "up" if decision.after > decision.before else "down").inc()
