"""Background traffic: what the router sends to idle pods, per pod per second.

For each fleet size: the emulator with that many idle pods, the real router in front of
it (static discovery, default settings), wait until the router calls every pod ready,
then count at the emulator every request that arrives during a window with no user
traffic. This is the "today" baseline of issue 14 (the target: at most 1% of it).

    python -m bench.scale background [--pods 10,100] [--window-s 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import progress, write_result
from bench.scale.emulator import start_emulator
from bench.scale.router_proc import start_router, wait_all_ready

NAME = "scale_background_baseline"


def measure(pods: int, devices: int, window_s: float, log_dir: Path) -> dict[str, Any]:
    progress(f"background: {pods} idle pods x {devices} devices: starting emulator and router")
    with start_emulator(pods, devices=devices, log_path=log_dir / f"emulator-{pods}.log") as emu:
        router = start_router(emu.urls, log_dir / f"router-{pods}")
        try:
            t0 = time.monotonic()
            wait_all_ready(router, pods, timeout_s=120 + pods * 0.2)
            progress(f"background: router sees {pods} pods ready after {time.monotonic() - t0:.1f}s; "
                     f"counting for {window_s:g}s")  # fmt: skip
            emu.reset()
            time.sleep(window_s)  # the measurement window itself, not a synchronisation
            counts = emu.counts()
        finally:
            router.stop()
    elapsed = counts["since_s"]
    per_pod_s = counts["total"] / pods / elapsed
    routes = {k: round(v / pods / elapsed, 4) for k, v in sorted(counts["routes"].items())}
    busiest = max(counts["per_pod"].values()) / elapsed if counts["per_pod"] else 0.0
    progress(f"background: {pods} pods: {counts['total']} requests in {elapsed:.1f}s = "
             f"{per_pod_s:.3f}/pod/s ({routes})")  # fmt: skip
    return {
        "pods": pods,
        "devices": pods * devices,
        "window_s": round(elapsed, 3),
        "requests": counts["total"],
        "requests_per_s": round(counts["total"] / elapsed, 2),
        "per_pod_per_s": round(per_pod_s, 4),
        "per_pod_per_s_by_route": routes,
        "busiest_pod_per_s": round(busiest, 4),
    }


def run(pods: list[int], devices: int, window_s: float, command: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gpufleet-bg-") as tmp:
        rows = [measure(n, devices, window_s, Path(tmp)) for n in pods]
    doc = {
        "what": "requests/s the router sends to idle emulated pods (no user traffic), counted at the emulator",
        "router_settings": "defaults: status_interval_s=2.0 (GET /api/status), queue_interval_s=0.5 (GET /api/queue)",
        "sizes": rows,
        "baseline_per_pod_per_s": rows[-1]["per_pod_per_s"] if rows else None,
    }
    write_result(NAME, doc, quick=False, command=command)
    return doc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pods", default="10,100", help="comma-separated fleet sizes (pods)")
    p.add_argument("--devices", type=int, default=8, help="devices per pod")
    p.add_argument("--window-s", type=float, default=10.0)


def main(args: argparse.Namespace, command: str) -> int:
    sizes = [int(x) for x in args.pods.split(",") if x.strip()]
    run(sizes, args.devices, args.window_s, command)
    return 0
