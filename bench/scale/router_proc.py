"""The real ``gpufleet router`` as a process in front of emulated pods (static discovery)."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from bench.common import REPO
from gpufleet.local.processes import Process, free_port, gpufleet_argv, wait_until


def start_router(
    urls: list[str], log_dir: Path, env: Mapping[str, str] | None = None, port: int | None = None
) -> Process:
    """``gpufleet router`` with POD_URLS = ``urls`` on ``port`` (a free loopback port by default;
    not yet ready)."""
    port = port or free_port()
    full = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DISCOVERY": "static",
        "POD_URLS": ",".join(urls),
        "LOG_LEVEL": "WARNING",  # the decision lines would dominate a scale run's CPU and disk
        **(env or {}),
    }
    full["PYTHONPATH"] = str(REPO) + (os.pathsep + full["PYTHONPATH"] if full.get("PYTHONPATH") else "")
    log_dir.mkdir(parents=True, exist_ok=True)
    return Process("router", gpufleet_argv("router"), full, log_dir / "router.log", f"http://127.0.0.1:{port}",
                   cwd=REPO).start()


def pod_states(router_url: str) -> dict[str, str]:
    """Each pod's state as the router sees it (its readiness document)."""
    try:
        with urllib.request.urlopen(router_url + "/ready", timeout=30) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as err:  # 503 until some pod is ready: the body still says why
        doc = json.loads(err.read() or b"{}")
        err.close()
    states: dict[str, str] = doc.get("pods") or {}
    return states


def state_counts(router_url: str) -> dict[str, int]:
    """How many pods the router has in each state ({"unanswered": 1}: it did not answer in time)."""
    counts: dict[str, int] = {}
    try:
        states = pod_states(router_url)
    except OSError:  # a saturated router may not answer its readiness route in time
        return {"unanswered": 1}
    for state in states.values():
        counts[state] = counts.get(state, 0) + 1
    return counts


def wait_all_ready(router: Process, pods: int, timeout_s: float = 120.0) -> None:
    """Until the router calls every one of ``pods`` pods ready (fails early if it exits)."""

    def ready() -> bool:
        if not router.alive():
            raise RuntimeError(f"router exited: {router.log_tail()}")
        try:
            states = pod_states(router.url)
        except OSError:  # not listening yet
            return False
        return len(states) == pods and all(s == "ready" for s in states.values())

    wait_until(ready, timeout_s, f"router sees {pods} ready pods", interval_s=0.5)
