"""Baseline routing policies to compare against group affinity (``policy.choose_device``).

Each is a pure function ``(RouteRequest, Snapshot) -> Decision`` that honours the same
exclusive targets, health and saturation rules (``policy.eligible``) and differs only in
how it picks among the eligible devices:

- ``round_robin``: the next device in turn, blind to residency and load.
- ``least_load``: the device with the fewest requests per worker, blind to residency.
- ``lru_multiplex``: Ray Serve style model multiplexing: the least loaded device that holds
  the group (current, or parked in its CPU cache); else evict the least recently used device.
- ``gie``: the Gateway API Inference Extension's default scoring, with a group in the role of
  a LoRA adapter: the queue scorer (shortest waiting queue 1, longest 0, linear between) plus
  the LoRA-affinity scorer (group current: 1.0; room to load it, i.e. nothing in flight to
  displace: 0.8; it is waiting there: 0.6; else 0), equal weights, highest total wins.
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
    holding = [d for d in devices if d.resident_group() == request.group or request.group in d.cached_groups]
    if holding:
        best = min(holding, key=lambda d: (d.load / max(1, d.workers), d.key))
        note = "affinity_current" if best.resident_group() == request.group else "affinity_cached"
        return _routed(best, f"{scope}:{note}", devices, request.group)
    # Evict the device idle longest; one never used counts as oldest.
    victim = min(devices, key=lambda d: (d.last_used_at if d.last_used_at is not None else float("-inf"), d.key))
    return _routed(victim, f"{scope}:evict_lru", devices, request.group)


GIE_ACTIVE, GIE_ROOM, GIE_WAITING = 1.0, 0.8, 0.6


def gie_affinity_score(d: DeviceState, group: str) -> float:
    """The LoRA-affinity scorer, a group in the adapter's place (one group runs at a time, so
    there is room to load one only where nothing is in flight)."""
    if d.resident_group() == group:
        return GIE_ACTIVE
    if d.load == 0:
        return GIE_ROOM
    if group in d.waiting_groups:
        return GIE_WAITING
    return 0.0


def gie(request: RouteRequest, snap: Snapshot) -> Decision:
    found = _open(request, snap)
    if isinstance(found, Decision):
        return found
    devices, scope = found
    lo, hi = min(d.waiting for d in devices), max(d.waiting for d in devices)

    def score(d: DeviceState) -> float:
        queue = 1.0 if hi == lo else (hi - d.waiting) / (hi - lo)
        return queue + gie_affinity_score(d, request.group)

    scored = sorted(devices, key=lambda d: (-score(d), d.key))
    best = scored[0]
    cands = tuple(Candidate(d.key, round(score(d), 4), affinity_note(d, request.group)) for d in scored)
    return Decision(Outcome.ROUTED, best, f"{scope}:gie", cands)


POLICIES: dict[str, Policy] = {
    "affinity": choose_device,
    "round_robin": round_robin,
    "least_load": least_load,
    "lru_multiplex": lru_multiplex,
    "gie": gie,
}
