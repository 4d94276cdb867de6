"""Start real gpufleet processes on loopback for the benchmarks, and stop them cleanly.

``Fleet.up`` runs ``gpufleet up`` (one pod server per device plus the router, with the
routing policy named); ``Fleet.pods`` runs bare pod servers when the router is missing.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import REPO, progress
from gpufleet.local.processes import Process, free_port, gpufleet_argv

__all__ = ["Fleet", "free_port", "mean_switch_seconds", "router_available", "switch_counts", "switch_time_totals"]


def router_available() -> bool:
    try:
        import gpufleet.local.up
        import gpufleet.router.settings  # noqa: F401
    except ImportError:
        return False
    return True


def spawn(name: str, args: list[str], env: Mapping[str, str], log_dir: Path, url: str) -> Process:
    """``gpufleet <args>`` from this checkout, with the supervisor's process wrapper."""
    full = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **env}
    full["PYTHONPATH"] = str(REPO) + (os.pathsep + full["PYTHONPATH"] if full.get("PYTHONPATH") else "")
    return Process(name, gpufleet_argv(*args), full, log_dir / f"{name}.log", url, cwd=REPO).start()


@dataclass
class Fleet:
    """Pod servers (and maybe a router) serving ``model_groups`` on CPU devices."""

    url: str  # where to send requests: the router, or the only pod
    pod_urls: list[str]
    procs: list[Process]
    routed: bool  # True when a router picks the device
    log_dir: Path
    _tmp: Any = field(default=None, repr=False)

    @classmethod
    def up(
        cls,
        devices: list[str],
        model_groups: Path,
        policy: str,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 180,
    ) -> Fleet:
        """``gpufleet up --policy`` on ``devices``; pods found from their logs' announced ports."""
        tmp = tempfile.TemporaryDirectory(prefix="gpufleet-bench-")
        log_dir = Path(tmp.name)
        port = free_port()
        base = {
            "DEVICES": ",".join(devices),
            "MODEL_GROUPS": str(model_groups),
            "TORCH_THREADS": "1",
            "LOG_LEVEL": "WARNING",
            "UP_LOG_DIR": str(log_dir / "pods"),
            "STATUS_INTERVAL_S": "0.5",
            **(env or {}),
        }
        p = spawn("up", ["up", "--policy", policy, "--port", str(port)], base, log_dir, f"http://127.0.0.1:{port}")
        fleet = cls(p.url, [], [p], True, log_dir, tmp)
        try:
            p.wait_ready(timeout_s)
            fleet.pod_urls = fleet._discover_pods()
        except BaseException:
            fleet.stop()
            raise
        return fleet

    @classmethod
    def pod(
        cls, devices: list[str], model_groups: Path, env: Mapping[str, str] | None = None, timeout_s: float = 180
    ) -> Fleet:
        """One pod server on ``devices`` (no router)."""
        tmp = tempfile.TemporaryDirectory(prefix="gpufleet-bench-")
        log_dir = Path(tmp.name)
        port = free_port()
        base = {
            "DEVICES": ",".join(devices),
            "MODEL_GROUPS": str(model_groups),
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "POD_NAME": "bench-pod",
            "TORCH_THREADS": "1",
            "LOG_LEVEL": "WARNING",
            **(env or {}),
        }
        p = spawn("pod", ["serve"], base, log_dir, f"http://127.0.0.1:{port}")
        fleet = cls(p.url, [p.url], [p], False, log_dir, tmp)
        try:
            p.wait_ready(timeout_s)
        except BaseException:
            fleet.stop()
            raise
        return fleet

    def _discover_pods(self) -> list[str]:
        with httpx.Client(timeout=5.0, trust_env=False) as http:
            doc = http.get(self.url + "/api/fleet").json()
        urls = [p.get("url") for p in (doc.get("pods") or {}).values() if p.get("url")]
        if not urls:  # fall back to the ports gpufleet up announced
            urls = sorted(set(re.findall(r"at (http://127\.0\.0\.1:\d+)", self.procs[0].log_tail(20000))))
        return urls

    def cpu_seconds(self) -> float:
        """CPU time used so far by every process of this fleet (router, pods)."""
        import psutil

        total = 0.0
        for p in self.procs:
            try:
                root = psutil.Process(p.pid)
                for q in [root, *root.children(recursive=True)]:
                    t = q.cpu_times()
                    total += t.user + t.system
            except psutil.Error:
                continue
        return total

    def stop(self) -> None:
        for p in self.procs:
            p.stop(40.0)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_SAMPLE = re.compile(r"^gpufleet_group_switches_total\{([^}]*)\}\s+([0-9.eE+-]+)$", re.M)


def switch_counts(pod_urls: list[str]) -> dict[str, float]:
    """Group switches so far across ``pod_urls``, by source, from their /metrics."""
    out: dict[str, float] = {"cache": 0.0, "disk": 0.0}
    with httpx.Client(timeout=5.0, trust_env=False) as http:
        for url in pod_urls:
            text = http.get(url + "/metrics").text
            for labels, value in _SAMPLE.findall(text):
                m = re.search(r'source="([^"]+)"', labels)
                src = m.group(1) if m else "unknown"
                out[src] = out.get(src, 0.0) + float(value)
    return out


def switch_time_totals(pod_urls: list[str]) -> dict[str, tuple[float, float]]:
    """Per source, (seconds, count) of group switches so far, from the pods'
    gpufleet_group_switch_seconds histograms; subtract two readings for an interval's mean."""
    out: dict[str, tuple[float, float]] = {}
    pat = re.compile(r"^gpufleet_group_switch_seconds_(sum|count)\{([^}]*)\}\s+([0-9.eE+-]+)$", re.M)
    with httpx.Client(timeout=5.0, trust_env=False) as http:
        for url in pod_urls:
            for kind, labels, value in pat.findall(http.get(url + "/metrics").text):
                m = re.search(r'source="([^"]+)"', labels)
                src = m.group(1) if m else "unknown"
                total, count = out.get(src, (0.0, 0.0))
                out[src] = (total + float(value), count) if kind == "sum" else (total, count + float(value))
    return out


def mean_switch_seconds(
    after: dict[str, tuple[float, float]], before: dict[str, tuple[float, float]] | None = None
) -> dict[str, float]:
    before = before or {}
    out = {}
    for src, (total, count) in after.items():
        t0, c0 = before.get(src, (0.0, 0.0))
        if count - c0 > 0:
            out[src] = (total - t0) / (count - c0)
    return out


def say(msg: str) -> None:
    progress(msg)
