"""Baseline routing policies to compare against group affinity (``policy.choose_device``).

Each is a pure function ``(RouteRequest, Snapshot) -> Decision`` that honours the same
exclusive targets, health and saturation rules (``policy.eligible``) and differs only in
how it picks among the eligible devices:

- ``round_robin``: the next device in turn, blind to residency and load.
- ``least_load``: the device with the fewest requests per worker, blind to residency.
- ``lru_multiplex``: Ray Serve style model multiplexing: a device where the group is
  current, else evict the least recently used device.
"""

from __future__ import annotations

from collections.abc import Callable

from gpufleet.routing.policy import (
    Candidate,
    Decision,
    DeviceState,
    Outcome,
    RouteRequest,
    Snapshot,
    affinity_note,
    choose_device,
    eligible,
)

Policy = Callable[[RouteRequest, Snapshot], Decision]


def _open(request: RouteRequest, snap: Snapshot) -> tuple[list[DeviceState], str] | Decision:
    found = eligible(request, snap)
    if isinstance(found, Decision):
        return found
    devices, scope = found
    open_ = sorted((d for d in devices if d.load < d.capacity), key=lambda d: d.key)
    if not open_:
        cands = tuple(Candidate(d.key, float(d.load), affinity_note(d, request.group)) for d in devices)
        return Decision(Outcome.SATURATED, None, f"{scope}: every eligible queue is full", cands)
    return open_, scope


def _routed(choice: DeviceState, reason: str, devices: list[DeviceState], group: str) -> Decision:
    cands = tuple(Candidate(d.key, float(d.load), affinity_note(d, group)) for d in devices)
    return Decision(Outcome.ROUTED, choice, reason, cands)


def round_robin(request: RouteRequest, snap: Snapshot) -> Decision:
    found = _open(request, snap)
    if isinstance(found, Decision):
        return found
    devices, scope = found
    return _routed(devices[request.sequence % len(devices)], f"{scope}:round_robin", devices, request.group)


def least_load(request: RouteRequest, snap: Snapshot) -> Decision:
    found = _open(request, snap)
    if isinstance(found, Decision):
        return found
    devices, scope = found
    best = min(devices, key=lambda d: (d.load / max(1, d.workers), d.key))
    return _routed(best, f"{scope}:least_load", devices, request.group)


def lru_multiplex(request: RouteRequest, snap: Snapshot) -> Decision:
    found = _open(request, snap)
    if isinstance(found, Decision):
        return found
    devices, scope = found
    holding = [d for d in devices if d.resident_group() == request.group]
    if holding:
        best = min(holding, key=lambda d: (d.load / max(1, d.workers), d.key))
        return _routed(best, f"{scope}:affinity_current", devices, request.group)
    # Evict the device idle longest; one never used counts as oldest.
    victim = min(devices, key=lambda d: (d.last_used_at if d.last_used_at is not None else float("-inf"), d.key))
    return _routed(victim, f"{scope}:evict_lru", devices, request.group)


POLICIES: dict[str, Policy] = {
    "affinity": choose_device,
    "round_robin": round_robin,
    "least_load": least_load,
    "lru_multiplex": lru_multiplex,
}
