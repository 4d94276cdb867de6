"""Routing policies in the simulator: the router's own functions, called as is.

Every policy is a ``(RouteRequest, Snapshot) -> Decision`` function of
``gpufleet.routing.alternatives.POLICIES`` (``affinity`` is ``choose_device``), fed the
router's view of the simulated devices through ``DeviceState``'s public fields, with the
service time learned as the router learns it (``gpufleet.routing.service_time``). No routing
rule is written here, so what the benchmark measures is what the router runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bench.sim import SimDevice
from bench.trace import Request
from gpufleet.routing.alternatives import POLICIES as ROUTER_POLICIES
from gpufleet.routing.policy import Costs, Decision, DeviceState, RouteRequest, Snapshot
from gpufleet.routing.service_time import ServiceTime

# The order tables and plots use: baselines first, ours last.
ORDER = ("round_robin", "least_load", "lru_multiplex", "gie", "affinity")
OURS = "affinity"


def device_state(d: SimDevice, now: float, pod: str = "sim") -> DeviceState:
    """The router's view of a simulated device, through DeviceState's public fields."""
    switching_to, last_switch_at = d.view(now)
    return DeviceState(
        pod=pod,
        device=d.name,
        current_group=d.current,
        cached_groups=frozenset(d.cache),
        workers=d.max_sequences,
        queue_limit=d.queue_limit,
        load=d.load,
        waiting=d.queued,
        waiting_groups=d.waiting_groups(),
        switching_to=switching_to,
        switch_s_from_cache=d.switch_s.get("cache"),
        switch_s_from_disk=d.switch_s.get("disk"),
        last_switch_at=last_switch_at,
        last_used_at=d.last_routed_at,
    )


def snapshot(devices: Sequence[SimDevice], now: float, costs: Costs | None = None) -> Snapshot:
    return Snapshot(tuple(device_state(d, now) for d in devices), now=now, costs=costs or Costs())


class SnapshotPolicy:
    """A router policy function in the simulator, learning the service time as the router does."""

    def __init__(
        self,
        name: str,
        fn: Callable[[RouteRequest, Snapshot], Decision],
        costs: Costs | None = None,
        learn_service: bool = True,
    ) -> None:
        self.name = name
        self.fn = fn
        self.costs = costs or Costs()
        self.learn_service = learn_service
        self.service = ServiceTime()
        self.sequence = 0
        self.reasons: dict[str, int] = {}

    def finished(self, req: Request, latency_s: float, idle: bool) -> None:
        if self.learn_service and idle:
            self.service.observe(latency_s)

    def choose(self, req: Request, devices: Sequence[SimDevice], now: float) -> int | None:
        self.sequence += 1
        costs = self.service.costs(self.costs)
        decision = self.fn(RouteRequest(group=req.group, sequence=self.sequence), snapshot(devices, now, costs))
        self.reasons[decision.reason] = self.reasons.get(decision.reason, 0) + 1
        if not decision.routed or decision.choice is None:
            return None
        return int(decision.choice.device.removeprefix("dev"))


def make_policy(name: str, seed: int = 0, costs: Costs | None = None) -> SnapshotPolicy:
    return SnapshotPolicy(name, ROUTER_POLICIES[name], costs)


POLICIES = {name: ROUTER_POLICIES[name] for name in ORDER}
