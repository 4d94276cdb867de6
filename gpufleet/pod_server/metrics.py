"""Prometheus metrics of one pod server, in a registry owned by the app (no module globals).

Names follow what users already chart: the ``vllm:`` gauges the Gateway API Inference
Extension's endpoint picker reads, ``*_time_to_first_token_seconds`` and friends, and the
DCGM label names (``gpu``, ``pod``, ``namespace``) so dashboards can join with DCGM.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SWITCH_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class PodMetrics:
    def __init__(self, pod: str, namespace: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.const = {"pod": pod, "namespace": namespace}
        base = ["pod", "namespace", "gpu"]
        self.requests = Counter(
            "gpufleet_requests_total", "Requests answered", [*base, "model", "group", "endpoint", "status"], registry=r
        )
        self.rejected = Counter(
            "gpufleet_requests_rejected_total", "Requests refused", ["pod", "namespace", "reason"], registry=r
        )
        self.e2e = Histogram(
            "gpufleet_e2e_request_latency_seconds",
            "Request latency",
            [*base, "group"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gpufleet_time_to_first_token_seconds",
            "Time to first token",
            [*base, "group"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "gpufleet_request_queue_time_seconds",
            "Time waiting for a worker",
            [*base, "group"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("gpufleet_prompt_tokens_total", "Prompt tokens", [*base, "model"], registry=r)
        self.generation_tokens = Counter(
            "gpufleet_generation_tokens_total",
            "Tokens generated, delivered or not (a cancelled or stopped sequence's too)",
            [*base, "model"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "gpufleet_completion_tokens_total", "Generated tokens delivered to clients", [*base, "model"], registry=r
        )
        self.max_sequences = Gauge("gpufleet_max_sequences", "Sequences a device batches at once", base, registry=r)
        self.kv_blocks_used = Gauge("gpufleet_kv_cache_blocks_used", "KV cache blocks in use", base, registry=r)
        self.kv_blocks_total = Gauge("gpufleet_kv_cache_blocks_total", "KV cache blocks", base, registry=r)
        self.queue_depth = Gauge("gpufleet_queue_depth", "Requests waiting per device", base, registry=r)
        self.running = Gauge("gpufleet_requests_running", "Sequences running per device (batched)", base, registry=r)
        self.workers = Gauge("gpufleet_workers", "Workers per device", base, registry=r)
        self.group_current = Gauge(
            "gpufleet_group_current", "1 when the group is current on the device", [*base, "group"], registry=r
        )
        self.group_cached = Gauge(
            "gpufleet_group_cached",
            "1 when the group is parked in the device's CPU cache",
            [*base, "group"],
            registry=r,
        )
        self.switches = Counter(
            "gpufleet_group_switches_total", "Group switches", [*base, "group", "source"], registry=r
        )
        self.switch_seconds = Histogram(
            "gpufleet_group_switch_seconds",
            "Time to make a group current: the old engine stopped, the weights moved, the new engine started",
            [*base, "source"],
            buckets=SWITCH_BUCKETS,
            registry=r,
        )
        self.prefetched_switches = Counter(
            "gpufleet_group_switches_prefetched_total",
            "Switches that found their group in the CPU cache because a prefetch had put it there",
            base,
            registry=r,
        )
        self.cpu_cache_bytes = Gauge(
            "gpufleet_cpu_cache_bytes", "Bytes of host copies in the pod's CPU cache", registry=r
        )
        self.model_device_bytes = Gauge(
            "gpufleet_model_device_bytes",
            "Bytes a resident model takes on its device",
            [*base, "model", "kind"],
            registry=r,
        )
        self.load_failures = Counter(
            "gpufleet_group_load_failures_total", "Failed group loads", [*base, "group"], registry=r
        )
        self.gpu_util = Gauge("gpufleet_device_utilization_percent", "Device utilisation", base, registry=r)
        self.gpu_mem_used = Gauge("gpufleet_device_memory_used_bytes", "Device memory used", base, registry=r)
        self.gpu_mem_total = Gauge("gpufleet_device_memory_total_bytes", "Device memory total", base, registry=r)
        # The model server protocol of the Gateway API Inference Extension (pod-wide).
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting", registry=r)
        self.vllm_running = Gauge("vllm:num_requests_running", "Requests running", registry=r)
        self.vllm_kv = Gauge("vllm:kv_cache_usage_perc", "KV cache usage of the pod's engines (0..1)", registry=r)
        self.vllm_lora = Gauge(
            "vllm:lora_requests_info",
            "Current groups as running adapters, so adapter-affinity scorers prefer pods holding the group",
            ["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
            registry=r,
        )

    def labels(self, device: str) -> dict[str, str]:
        return {**self.const, "gpu": device}

    def forget_group(self, group: str, models: Iterable[str]) -> None:
        """Drop the series of a group the pod serves no more, and of its models no group serves, so a
        removed group does not linger on dashboards (and its label values do not grow without end)."""
        base = ["pod", "namespace", "gpu"]
        by_group: list[tuple[MetricWrapperBase, list[str]]] = [
            (self.requests, [*base, "model", "group", "endpoint", "status"]),
            (self.e2e, [*base, "group"]),
            (self.ttft, [*base, "group"]),
            (self.queue_time, [*base, "group"]),
            (self.group_current, [*base, "group"]),
            (self.group_cached, [*base, "group"]),
            (self.switches, [*base, "group", "source"]),
            (self.load_failures, [*base, "group"]),
        ]
        for metric, names in by_group:
            _remove_where(metric, names, "group", {group})
        by_model = [self.prompt_tokens, self.generation_tokens, self.completion_tokens]
        gone = set(models)
        for metric in by_model:
            _remove_where(metric, [*base, "model"], "model", gone)
        _remove_where(self.model_device_bytes, [*base, "model", "kind"], "model", gone)


def _remove_where(metric: MetricWrapperBase, names: list[str], label: str, values: set[str]) -> None:
    """Remove every child of ``metric`` whose ``label`` is one of ``values`` (its children are found
    in what it collects: prometheus_client offers no lookup by one label)."""
    children = {
        tuple(sample.labels[n] for n in names)
        for family in metric.collect()
        for sample in family.samples
        if sample.labels.get(label) in values
    }
    for child in children:
        metric.remove(*child)
