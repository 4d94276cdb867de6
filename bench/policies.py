"""Routing policies side by side; ``affinity`` is gpufleet's own ``choose_device``, called as is.

- ``round_robin``: a Kubernetes Service: the next device in turn, whatever it holds.
- ``least_load``: the device with the fewest queued plus running requests (random ties).
- ``lru_multiplex``: per-replica model multiplexing (as Ray Serve does it): among devices
  that hold the group (current or parked in their cache) the least loaded; else the one
  holding the fewest groups; else any. Each device evicts its least recently used group.
- ``affinity``: ``gpufleet.routing.policy.choose_device`` over ``DeviceState`` snapshots
  built from the simulated devices through the policy's public fields, with the service
  time learned as the router learns it.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence

from bench.sim import SimDevice
from bench.trace import Request
from gpufleet.routing.policy import Costs, Decision, DeviceState, RouteRequest, Snapshot, choose_device

# As gpufleet.router.state learns Costs.service_s.
EWMA = 0.2
SERVICE_S_MIN, SERVICE_S_MAX = 0.005, 120.0


class RoundRobin:
    name = "round_robin"

    def __init__(self, seed: int = 0) -> None:
        self._next = 0

    def choose(self, req: Request, devices: Sequence[SimDevice], now: float) -> int | None:
        i = self._next % len(devices)
        self._next += 1
        return i


class LeastLoad:
    name = "least_load"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, req: Request, devices: Sequence[SimDevice], now: float) -> int | None:
        low = min(d.load for d in devices)
        return self._rng.choice([d.index for d in devices if d.load == low])


class LruMultiplex:
    name = "lru_multiplex"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, req: Request, devices: Sequence[SimDevice], now: float) -> int | None:
        open_ = [d for d in devices if d.load < d.capacity]
        if not open_:
            return None
        held = {d.index: d.held_groups(now) for d in open_}
        holding = [d for d in open_ if req.group in held[d.index]]
        if holding:
            low = min(d.load for d in holding)
            return self._rng.choice([d.index for d in holding if d.load == low])
        fewest = min(len(h) for h in held.values())
        return self._rng.choice([d.index for d in open_ if len(held[d.index]) == fewest])


def device_state(d: SimDevice, now: float, pod: str = "sim") -> DeviceState:
    """The router's view of a simulated device, through DeviceState's public fields."""
    switching_to, last_switch_at = d.view(now)
    return DeviceState(
        pod=pod,
        device=d.name,
        current_group=d.current,
        cached_groups=frozenset(d.cache),
        workers=d.workers_n,
        queue_limit=d.queue_limit,
        load=d.load,
        switching_to=switching_to,
        switch_s_from_cache=d.switch_s.get("cache"),
        switch_s_from_disk=d.switch_s.get("disk"),
        last_switch_at=last_switch_at,
        last_used_at=d.last_routed_at,
    )


def snapshot(devices: Sequence[SimDevice], now: float, costs: Costs | None = None) -> Snapshot:
    return Snapshot(tuple(device_state(d, now) for d in devices), now=now, costs=costs or Costs())


class LearnsServiceTime:
    """The router's ``FleetState`` learns the time a request holds a worker from answers of
    requests routed to an idle device (EWMA 0.2, clamped) and puts it in ``Costs.service_s``;
    as there, a request that waited for a switch on an idle device counts whole."""

    costs: Costs
    learn_service = True
    service_s: float | None = None

    def finished(self, req: Request, latency_s: float, idle: bool) -> None:
        if not (self.learn_service and idle):
            return
        s = min(SERVICE_S_MAX, max(SERVICE_S_MIN, latency_s))
        self.service_s = s if self.service_s is None else self.service_s + EWMA * (s - self.service_s)

    def costs_now(self) -> Costs:
        if self.service_s is None:
            return self.costs
        return dataclasses.replace(self.costs, service_s=self.service_s)


class Affinity(LearnsServiceTime):
    """gpufleet's policy: the real ``choose_device``, not a copy."""

    name = "affinity"

    def __init__(self, seed: int = 0, costs: Costs | None = None, learn_service: bool = True) -> None:
        self.costs = costs or Costs()
        self.learn_service = learn_service
        self.service_s = None
        self.reasons: dict[str, int] = {}

    def choose(self, req: Request, devices: Sequence[SimDevice], now: float) -> int | None:
        decision = choose_device(RouteRequest(group=req.group), snapshot(devices, now, self.costs_now()))
        self.reasons[decision.reason] = self.reasons.get(decision.reason, 0) + 1
        if not decision.routed or decision.choice is None:
            return None
        return int(decision.choice.device.removeprefix("dev"))


class SnapshotPolicy(LearnsServiceTime):
    """Any ``(RouteRequest, Snapshot) -> Decision`` function, e.g. the router's own baselines in
    ``gpufleet.routing.alternatives``, fed the same router view as ``Affinity``."""

    def __init__(self, name: str, fn: Callable[[RouteRequest, Snapshot], Decision], costs: Costs | None = None) -> None:
        self.name = name
        self.fn = fn
        self.costs = costs or Costs()
        self.service_s = None
        self.sequence = 0
        self.reasons: dict[str, int] = {}

    def choose(self, req: Request, devices: Sequence[SimDevice], now: float) -> int | None:
        self.sequence += 1
        decision = self.fn(
            RouteRequest(group=req.group, sequence=self.sequence), snapshot(devices, now, self.costs_now())
        )
        self.reasons[decision.reason] = self.reasons.get(decision.reason, 0) + 1
        if not decision.routed or decision.choice is None:
            return None
        return int(decision.choice.device.removeprefix("dev"))


def router_policies() -> dict[str, Callable[[RouteRequest, Snapshot], Decision]]:
    """The router's policy table (``gpufleet.routing.alternatives.POLICIES``), if it exists."""
    try:
        from gpufleet.routing.alternatives import POLICIES as table
    except ImportError:
        return {"affinity": choose_device}
    return dict(table)


POLICIES: dict[str, Callable[[int], RoundRobin | LeastLoad | LruMultiplex | Affinity]] = {
    "round_robin": RoundRobin,
    "least_load": LeastLoad,
    "lru_multiplex": LruMultiplex,
    "affinity": Affinity,
}


def make_policy(name: str, seed: int = 0) -> RoundRobin | LeastLoad | LruMultiplex | Affinity:
    return POLICIES[name](seed)
