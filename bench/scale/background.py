"""Background traffic: what the router sends to idle pods, per pod per second.

For each fleet size: the emulator with that many idle pods, the real router in front of
it (static discovery, default settings), wait until the router calls every pod ready,
then count at the emulator every request that arrives during a window with no user
traffic. This is the "today" baseline of issue 14 (the target: at most 1% of it).

    python -m bench.scale background [--pods 10,100,1250] [--window-s 10]

A size the router cannot keep ready (its polls time out, pods go stale or are ejected) is
measured anyway after ``--ready-timeout-s``: what it sends is then its polling capacity,
and the pod states before and after the window say so.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.common import progress, write_result
from bench.scale.emulator import start_emulator
from bench.scale.router_proc import start_router, state_counts, wait_all_ready

NAME = "scale_background_baseline"


def measure(
    pods: int,
    devices: int,
    window_s: float,
    log_dir: Path,
    ready_timeout_s: float = 60.0,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``env``: router settings beyond the defaults (IDLE_POLL_S=10, say)."""
    progress(f"background: {pods} idle pods x {devices} devices: starting emulator and router {dict(env or {})}")
    with start_emulator(pods, devices=devices, log_path=log_dir / f"emulator-{pods}.log") as emu:
        router = start_router(emu.urls, log_dir / f"router-{pods}", env)
        try:
            t0 = time.monotonic()
            try:
                wait_all_ready(router, pods, timeout_s=ready_timeout_s)
                ready_after: float | None = round(time.monotonic() - t0, 1)
            except TimeoutError:
                ready_after = None  # the router cannot keep them all ready: count what it sends anyway
            states = state_counts(router.url)
            progress(f"background: router pod states {states} after {time.monotonic() - t0:.1f}s; "
                     f"counting for {window_s:g}s")
            emu.reset()
            time.sleep(window_s)  # the measurement window itself, not a synchronisation
            counts = emu.counts()
            states_after = state_counts(router.url)
        finally:
            router.stop()
    elapsed = counts["since_s"]
    per_pod_s = counts["total"] / pods / elapsed
    routes = {k: round(v / pods / elapsed, 4) for k, v in sorted(counts["routes"].items())}
    busiest = max(counts["per_pod"].values()) / elapsed if counts["per_pod"] else 0.0
    progress(f"background: {pods} pods: {counts['total']} requests in {elapsed:.1f}s = "
             f"{per_pod_s:.3f}/pod/s ({routes})")
    return {
        "pods": pods,
        "devices": pods * devices,
        "window_s": round(elapsed, 3),
        "requests": counts["total"],
        "requests_per_s": round(counts["total"] / elapsed, 2),
        "per_pod_per_s": round(per_pod_s, 4),
        "per_pod_per_s_by_route": routes,
        "busiest_pod_per_s": round(busiest, 4),
        "all_ready_after_s": ready_after,
        "router_pod_states_before": states,
        "router_pod_states_after": states_after,
    }


def run(pods: list[int], devices: int, window_s: float, command: str, ready_timeout_s: float = 60.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gpufleet-bg-") as tmp:
        rows = [measure(n, devices, window_s, Path(tmp), ready_timeout_s) for n in pods]
    doc = {
        "what": "requests/s the router sends to idle emulated pods (no user traffic), counted at the emulator",
        "router_settings": "defaults: status_interval_s=2.0 (GET /api/status), queue_interval_s=0.5 (GET /api/queue)",
        "sizes": rows,
        # Today's figure per pod: from the sizes the router keeps ready (beyond, it is saturated).
        "baseline_per_pod_per_s": max((r["per_pod_per_s"] for r in rows if r["all_ready_after_s"] is not None),
                                      default=None),
    }
    write_result(NAME, doc, quick=False, command=command)
    return doc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pods", default="10,100,1250", help="comma-separated fleet sizes (pods)")
    p.add_argument("--ready-timeout-s", type=float, default=60.0, help="wait this long for all pods ready")
    p.add_argument("--devices", type=int, default=8, help="devices per pod")
    p.add_argument("--window-s", type=float, default=10.0)


def main(args: argparse.Namespace, command: str) -> int:
    sizes = [int(x) for x in args.pods.split(",") if x.strip()]
    run(sizes, args.devices, args.window_s, command, args.ready_timeout_s)
    return 0
