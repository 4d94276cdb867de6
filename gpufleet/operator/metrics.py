"""Prometheus metrics of the operator, in a registry it owns (no module globals).

What an operator at scale must show: how long reconciles take, how many API calls it
makes (by verb: reads should come from the watch caches, writes only on change), and how
often a cached read missed and fell back to a GET.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

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
