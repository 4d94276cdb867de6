"""Load a pod server reports on every response, in the spirit of ORCA's ``endpoint-load-metrics``.

``endpoint-load-metrics: TEXT named_metrics.running.cuda:0=3, named_metrics.waiting.cuda:0=1,
named_metrics.kv_cache.cuda:0=0.12, named_metrics.status_version=7``

Routers fold it into their view on every answer instead of polling each pod every half
second; ``status_version`` changes whenever the pod's status document does (a switch, a
failed load), so a router knows when to fetch it. Framework-free: the pod, the router and the
benchmark's emulated pods share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LOAD_HEADER = "endpoint-load-metrics"
_PREFIX = "named_metrics."


@dataclass(frozen=True)
class DeviceLoad:
    running: int = 0
    waiting: int = 0
    kv_cache: float = 0.0  # share of the KV cache in use, 0..1


@dataclass(frozen=True)
class LoadReport:
    devices: dict[str, DeviceLoad] = field(default_factory=dict)
    status_version: int | None = None


def format_load(devices: dict[str, DeviceLoad], status_version: int) -> str:
    parts = []
    for name, d in devices.items():
        parts.append(f"{_PREFIX}running.{name}={d.running}")
        parts.append(f"{_PREFIX}waiting.{name}={d.waiting}")
        parts.append(f"{_PREFIX}kv_cache.{name}={d.kv_cache:.4g}")
    parts.append(f"{_PREFIX}status_version={status_version}")
    return "TEXT " + ", ".join(parts)


def parse_load(value: str) -> LoadReport | None:
    """The report in a header value; None when it is not one (a foreign proxy's header, say)."""
    if not value.startswith("TEXT "):
        return None
    running: dict[str, int] = {}
    waiting: dict[str, int] = {}
    kv: dict[str, float] = {}
    version: int | None = None
    try:
        for item in value[5:].split(","):
            key, _, raw = item.strip().partition("=")
            if not key.startswith(_PREFIX):
                continue
            metric, _, device = key[len(_PREFIX) :].partition(".")
            if metric == "status_version" and not device:
                version = int(raw)
            elif metric == "running" and device:
                running[device] = int(raw)
            elif metric == "waiting" and device:
                waiting[device] = int(raw)
            elif metric == "kv_cache" and device:
                kv[device] = float(raw)
    except ValueError:
        return None
    names = running.keys() | waiting.keys()
    devices = {n: DeviceLoad(running.get(n, 0), waiting.get(n, 0), kv.get(n, 0.0)) for n in sorted(names)}
    return LoadReport(devices, version)
