"""Decision time through the router's own path, in-process, at a given fleet size.

A ``gpufleet.router.state.FleetState`` holds N emulated devices (pods of 8 from the seeded
layout, each registered with ``upsert`` + ``observe_status`` on the emulator's own status
document, then given a random ``observe_load`` report); a ``Decider`` built as the router's
``build_runtime`` builds it (affinity policy, real ``RouterMetrics``) routes requests for
Zipf-chosen groups. Only ``decider.decide(...)`` is timed. Between decisions the load moves
as real traffic moves it: each routed request takes a ticket (``state.begin``), the oldest
in flight are released (``state.finish``) and the answer's load report of that pod is
folded in (``observe_load``). Whatever the router does per decision (snapshot, index,
policy, metrics) is measured; the decision log line is not (its logger stays at WARNING, as
in the scale runs, so logging is not measured).

Memory: the Python heap held by the state (tracemalloc while building it) and the RSS
growth of this process over the build.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import time
import tracemalloc
from collections import deque
from dataclasses import dataclass
from typing import Any

from bench.common import percentile, progress
from bench.scale import pod_docs
from bench.scale.layout import FleetLayout, make_layout, model_ids
from gpufleet.api.load_report import DeviceLoad, LoadReport
from gpufleet.api.pod_status import PodStatus
from gpufleet.router.decide import Decider
from gpufleet.router.decision_log import ROUTE_LOGGER
from gpufleet.router.metrics import RouterMetrics
from gpufleet.router.settings import POD_LABELS_AUTO_MAX
from gpufleet.router.state import FleetState

DEVICES_PER_POD = 8
GROUPS = 32
ZIPF_S = 1.1  # the layout's popularity: requests follow it too


@dataclass(frozen=True)
class Fleet:
    layout: FleetLayout
    state: FleetState
    decider: Decider
    heap_bytes: int  # traced while building
    rss_growth_bytes: int | None


def layout_of(devices: int, seed: int) -> FleetLayout:
    """Pods of DEVICES_PER_POD devices (the last one trimmed) holding exactly ``devices`` devices."""
    per_pod = min(DEVICES_PER_POD, devices)
    layout = make_layout(math.ceil(devices / per_pod), per_pod, GROUPS, seed=seed)
    extra = layout.device_count - devices
    if extra:
        last = layout.pods[-1]
        del last.devices[len(last.devices) - extra :]
    return layout


def _random_load(rng: random.Random, pod_devices: list[str]) -> LoadReport:
    return LoadReport({d: DeviceLoad(rng.randrange(0, 12), rng.choice((0, 0, 0, 1, 3))) for d in pod_devices}, 0)


def _rss() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def build_fleet(devices: int, seed: int = 0) -> Fleet:
    """The router's state and decider over ``devices`` emulated devices, as the router holds them."""
    layout = layout_of(devices, seed)
    rng = random.Random(seed + 1)
    gc.collect()
    rss0 = _rss()
    tracemalloc.start()
    try:
        state = FleetState(stale_after_s=300.0)  # RouterSettings' default STALE_AFTER_S
        for i, pod in enumerate(layout.pods):
            url = f"http://127.0.0.{1 + i // 60000}:{1024 + i % 60000}"  # never contacted
            state.upsert(url, url)
            doc = pod_docs.status_doc(pod, url, layout.groups, layout.models)
            state.observe_status(url, PodStatus.model_validate(doc))
            state.observe_load(pod.name, _random_load(rng, [d.device for d in pod.devices]))
        # The metrics a router in front of this many pods keeps by default (METRICS_POD_LABELS=auto).
        per_pod = len(layout.pods) <= POD_LABELS_AUTO_MAX
        decider = Decider(state, RouterMetrics(per_pod=per_pod), "affinity")
        heap, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss1 = _rss()
    growth = rss1 - rss0 if rss0 is not None and rss1 is not None else None
    return Fleet(layout, state, decider, heap, growth)


def measure(devices: int, *, decisions: int = 5000, budget_s: float = 30.0, seed: int = 0) -> dict[str, Any]:
    """Time ``decisions`` decisions (fewer if ``budget_s`` runs out, at least 20) at ``devices`` devices."""
    route_log = logging.getLogger(ROUTE_LOGGER)
    level = route_log.level
    route_log.setLevel(logging.WARNING)  # the decision line is not what is measured
    try:
        t_build = time.monotonic()
        fleet = build_fleet(devices, seed)
        build_s = time.monotonic() - t_build
        progress(f"decision: {devices} devices on {len(fleet.layout.pods)} pods built in {build_s:.1f}s "
                 f"(state heap {fleet.heap_bytes / 2**20:.1f} MiB); timing up to {decisions} decisions")
        return _time(fleet, devices, decisions, budget_s, seed, build_s)
    finally:
        route_log.setLevel(level)


def _time(fleet: Fleet, devices: int, decisions: int, budget_s: float, seed: int, build_s: float) -> dict[str, Any]:
    state, decider, layout = fleet.state, fleet.decider, fleet.layout
    rng = random.Random(seed + 2)
    weights = [1.0 / (rank + 1) ** ZIPF_S for rank in range(len(layout.groups))]
    devices_of = {p.name: [d.device for d in p.devices] for p in layout.pods}
    # Requests in flight at once: about two per device, bounded (what a busy router carries).
    window = max(4, min(2 * devices, 2000))
    inflight: deque[Any] = deque()
    times: list[float] = []
    outcomes: dict[str, int] = {}
    perf = time.perf_counter
    deadline = time.monotonic() + budget_s
    groups = rng.choices(layout.groups, weights, k=decisions)
    for i, group in enumerate(groups):
        model = model_ids(group)[0]
        t0 = perf()
        decision = decider.decide(f"req-{i}", model, group, None, frozenset(), 0)
        times.append(perf() - t0)
        outcomes[decision.outcome.value] = outcomes.get(decision.outcome.value, 0) + 1
        choice = decision.choice
        if choice is not None:
            inflight.append(state.begin(choice.pod, choice.device, group))
        while len(inflight) > window or (inflight and rng.random() < 0.5):
            ticket = inflight.popleft()
            state.finish(ticket, ok=True)
            # The answer carried that pod's load, beyond this router's own counts.
            state.observe_load(ticket.pod, _random_load(rng, devices_of.get(ticket.pod, [])))
        if i >= 20 and time.monotonic() > deadline:
            break
    n = len(times)
    row = {
        "devices": devices,
        "pods": len(layout.pods),
        "groups": len(layout.groups),
        "decisions": n,
        "decisions_planned": decisions,
        "p50_us": round(percentile(times, 50) * 1e6, 2),
        "p90_us": round(percentile(times, 90) * 1e6, 2),
        "p99_us": round(percentile(times, 99) * 1e6, 2),
        "max_us": round(max(times) * 1e6, 2),
        "mean_us": round(sum(times) / n * 1e6, 2),
        "outcomes": outcomes,
        "state_heap_mib": round(fleet.heap_bytes / 2**20, 3),
        "rss_growth_mib": round(fleet.rss_growth_bytes / 2**20, 2) if fleet.rss_growth_bytes is not None else None,
        "build_s": round(build_s, 2),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    progress(f"decision: {devices} devices: p50 {row['p50_us']} us, p99 {row['p99_us']} us over {n} decisions "
             f"({outcomes})")
    return row
