"""Prometheus metrics of the router, in a registry owned by the app (no module globals).

Series per pod and per device (``pod``, ``gpu`` labels) are optional (``per_pod``; the router's
``METRICS_POD_LABELS``): a fleet of 10,000 devices would otherwise make 10,000+ series of decisions
and leases alone, and in Kubernetes every restarted pod adds series under a new name that never go
away. Without them the same counters are kept fleet-wide; which pod and device each decision chose
is in its decision log line, and ``/api/fleet`` shows every device now.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gpufleet.routing.policy import Snapshot

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# A scale-from-zero wait is a pod's start: seconds to minutes.
WAIT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600)


class RouterMetrics:
    def __init__(self, per_pod: bool = True) -> None:
        self.per_pod = per_pod
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        pod = ["pod"] if per_pod else []
        device = ["pod", "gpu"] if per_pod else []
        self.decisions = Counter(
            "gpufleet_router_decisions_total",
            "Routing decisions by outcome and reason",
            ["policy", "outcome", "reason", *device],
            registry=r,
        )
        self.requests = Counter(
            "gpufleet_router_requests_total", "Requests answered by the router", ["endpoint", "code"], registry=r
        )
        self.retries = Counter("gpufleet_router_retries_total", "Requests retried on another pod", pod, registry=r)
        self.upstream_failures = Counter(
            "gpufleet_router_upstream_failures_total", "Failed upstream attempts", [*pod, "kind"], registry=r
        )
        self.ejections = Counter("gpufleet_router_ejections_total", "Pods ejected as outliers", pod, registry=r)
        self.pods = Gauge("gpufleet_router_pods", "Pods known, by state", ["state"], registry=r)
        self.inflight = Gauge("gpufleet_router_requests_running", "Requests being proxied", registry=r)
        self.leases_active = Gauge("gpufleet_router_leases_active", "Live exclusive leases", registry=r)
        self.leased_devices = Gauge(
            "gpufleet_router_leased_devices", "Devices held by a live exclusive lease", registry=r
        )
        self.device_leased = (
            Gauge(
                "gpufleet_router_device_leased", "1 while a live exclusive lease holds the device", device,
                registry=r,
            )
            if per_pod
            else None
        )
        self.ttfb = Histogram(
            "gpufleet_router_time_to_first_byte_seconds",
            "From request to the first chunk of a stream",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "gpufleet_router_e2e_request_latency_seconds",
            "Whole request through the router",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Held until a device serves their group (gpufleet.router.scale_wait); groups are few (ModelGroups).
        self.scale_waiting = Gauge(
            "gpufleet_router_scale_wait_sequences", "Sequences held until a device serves their group", ["group"],
            registry=r,
        )
        self.scale_waits = Counter(
            "gpufleet_router_scale_waits_total",
            "Scale-from-zero waits ended, by outcome (served, timeout, full, gone)",
            ["outcome"],
            registry=r,
        )
        self.scale_wait_seconds = Histogram(
            "gpufleet_router_scale_wait_seconds", "Time held until a device served the group, by outcome", ["outcome"],
            buckets=WAIT_BUCKETS, registry=r,
        )
        # Label children cached by label values: ``labels()`` costs more than the update itself.
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *values: str) -> Any:
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values) if values else metric
        return child

    def _per_pod(self, metric: Any, *values: str, pod: str, gpu: str | None = None) -> Any:
        """The child of ``metric`` for ``values``, with the pod (and device) when there are such series."""
        if not self.per_pod:
            return self._child(metric, *values)
        if gpu is None:
            return self._child(metric, pod, *values)
        return self._child(metric, *values, pod, gpu)

    def leases_now(self, snap: Snapshot) -> None:
        """Set at scrape time from the snapshot: live leases, and which devices they hold."""
        self.leases_active.set(len(snap.leases))
        self.leased_devices.set(sum(1 for d in snap.devices if d.leased_by))
        if self.device_leased is not None:
            self.device_leased.clear()
            for d in snap.devices:
                self.device_leased.labels(d.pod, d.device).set(1 if d.leased_by else 0)

    def decision(self, policy: str, outcome: str, reason: str, pod: str, gpu: str) -> None:
        self._per_pod(self.decisions, policy, outcome, reason, pod=pod, gpu=gpu).inc()

    def upstream_failure(self, pod: str, kind: str) -> None:
        self._per_pod(self.upstream_failures, kind, pod=pod).inc()

    def retry(self, pod: str) -> None:
        self._per_pod(self.retries, pod=pod).inc()

    def ejection(self, pod: str) -> None:
        self._per_pod(self.ejections, pod=pod).inc()

    def request_done(self, endpoint: str, code: int, seconds: float) -> None:
        self._child(self.requests, endpoint, str(code)).inc()
        self._child(self.e2e, endpoint).observe(seconds)

    def scale_wait_done(self, outcome: str, seconds: float) -> None:
        self._child(self.scale_waits, outcome).inc()
        self._child(self.scale_wait_seconds, outcome).observe(seconds)

    def first_byte(self, endpoint: str, seconds: float) -> None:
        self._child(self.ttfb, endpoint).observe(seconds)
