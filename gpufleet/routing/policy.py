"""Where a request should run: a pure function over a snapshot of device states.

The router calls it with every device of every pod, the pod server's dispatcher with its own
devices (keeping the router's choice while it holds: ``honour_choice``), the benchmark with
simulated ones. Order of concerns:

1. An exclusive target named by the client: only matching devices, never elsewhere.
   Then leases (``gpufleet.routing.leases``): a leased device serves only requests that
   carry its lease, and a request carrying a lease runs only on that lease's devices.
2. Group affinity as a cost in expected seconds until the answer. A device batches up to
   ``workers`` sequences of its current group, so joining it costs the wait for a slot plus the
   request's own time in that batch. Any other device must first drain its batch, serve the
   groups already queued there, then switch (from its CPU cache or from disk); a group already
   waiting there rides along with that switch.
3. Least load breaks the remaining ties.

Making a device leave a group that is busy there, or that arrived only moments ago, costs the
switch that will bring it back, so two hot groups sharing a device do not thrash it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum


@dataclass(frozen=True)
class DeviceState:
    pod: str
    device: str
    node: str | None = None
    current_group: str | None = None
    cached_groups: frozenset[str] = frozenset()
    failed_groups: frozenset[str] = frozenset()
    healthy: bool = True
    workers: int = 1
    queue_limit: int = 64
    load: int = 0  # requests running or queued on this device
    waiting: int = 0  # of those, queued and not running (the pod's last report)
    waiting_groups: frozenset[str] = frozenset()  # groups with requests queued there
    switching_to: str | None = None
    switch_s_from_cache: float | None = None
    switch_s_from_disk: float | None = None
    last_switch_at: float | None = None  # same clock as Snapshot.now
    fresh: bool = True  # False when the figures are too old to trust
    last_used_at: float | None = None  # when a request last went here (same clock); for LRU policies
    uuid: str | None = None  # the physical GPU's NVML UUID ("GPU-..."); None on CPU devices
    leased_by: str | None = None  # id of the live lease holding this device
    groups: frozenset[str] | None = None  # the groups its pod can serve at all; None: any
    # "pod/device", made once: decisions read it many times (not an argument, not compared).
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.pod}/{self.device}")

    @property
    def capacity(self) -> int:
        return self.workers + self.queue_limit

    def resident_group(self) -> str | None:
        # A switch in progress already decides what the device will hold next.
        return self.switching_to or self.current_group


@dataclass(frozen=True)
class Costs:
    service_s: float = 0.25  # typical time one request takes on an idle device (learned: routing.service_time)
    # A full batch makes each of its requests this much slower than alone (1.0: twice as long). Decode
    # steps grow with the batch: measured 6.3x at 64 sequences on this 2-core CPU, ~1.6x on an H100.
    batch_slowdown: float = 1.0
    switch_from_cache_s: float = 0.5
    switch_from_disk_s: float = 3.0
    # Every switch is charged at least this: trades latency for fewer switches (the trade-off curve of
    # bench/results/routing_quality.json). A switch also empties the batch, which its measured time misses.
    switch_floor_s: float = 0.0
    min_residency_s: float = 10.0  # hysteresis window after a switch
    # Evicting a group that is busy, or that just arrived, invites a switch straight back: the
    # device pays a switch for it later. Charged as this share of the switch back.
    displacement_share: float = 1.0
    residency_penalty_s: float = 2.0  # extra for evicting within min_residency_s of the last switch
    unknown_load_penalty_s: float = 2.0  # stale figures: assume it is busier than it says


@dataclass(frozen=True)
class Snapshot:
    devices: tuple[DeviceState, ...]
    now: float = 0.0
    costs: Costs = field(default_factory=Costs)
    leases: frozenset[str] = frozenset()  # ids of the live leases (their devices carry ``leased_by``)


@dataclass(frozen=True)
class RouteRequest:
    group: str
    exclusive: str | None = None  # "cuda:1", "pod-a", "node-a", "pod-a/cuda:1", "node-a/cuda:1"
    sequence: int = 0  # a counter the caller increments per request; round-robin policies use it
    lease: str | None = None  # the lease id the request carries


class Outcome(StrEnum):
    ROUTED = "routed"
    UNKNOWN_TARGET = "unknown_target"  # the exclusive target names nothing we know
    AMBIGUOUS_TARGET = "ambiguous_target"  # names several devices where one is meant, or several things
    TARGET_DOWN = "target_down"  # it exists but cannot serve
    GROUP_FAILED = "group_failed"  # every eligible device failed to load the group
    SATURATED = "saturated"  # every eligible queue is full
    NO_DEVICES = "no_devices"
    LEASED = "leased"  # every device it may use is held by a lease it does not carry
    UNKNOWN_LEASE = "unknown_lease"  # it carries a lease id that is not live (never was, expired, deleted)
    LEASE_MISMATCH = "lease_mismatch"  # its exclusive target and its lease share no device
    GROUP_NOT_SERVED = "group_not_served"  # no eligible device's pod serves the group at all


@dataclass(frozen=True)
class Candidate:
    key: str
    cost_s: float
    note: str


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    choice: DeviceState | None
    reason: str
    candidates: tuple[Candidate, ...] = ()

    @property
    def routed(self) -> bool:
        return self.outcome is Outcome.ROUTED


def target_readings(devices: Sequence[DeviceState], target: str) -> dict[str, list[DeviceState]]:
    """Every way ``target`` can be read, with the devices each reading names (empty readings left out).

    ``owner/device`` reads the owner as a pod or as a node; a bare word as a pod, a node, a
    device name or a GPU UUID. Shared by exclusive targets and lease targets."""
    if "/" in target:
        owner, _, device = target.partition("/")
        readings = {
            "pod/device": [d for d in devices if d.device == device and d.pod == owner],
            "node/device": [d for d in devices if d.device == device and d.node == owner],
        }
    else:
        folded = target.casefold()
        readings = {
            "pod": [d for d in devices if d.pod == target],
            "node": [d for d in devices if d.node == target],
            "device": [d for d in devices if d.device == target],
            "uuid": [d for d in devices if d.uuid is not None and d.uuid.casefold() == folded],
        }
    return {k: v for k, v in readings.items() if v}


ONE_DEVICE_READINGS = frozenset({"pod/device", "node/device", "device", "uuid"})


def matches_target(d: DeviceState, target: str) -> bool:
    """Does device ``d`` answer to the exclusive target string (in any reading)?"""
    return bool(target_readings([d], target))


def names_one_device(target: str, chosen: DeviceState) -> bool:
    """Did ``target`` name ``chosen`` itself (not its pod or node)? Then the pod must use exactly it."""
    return any(k in ONE_DEVICE_READINGS for k in target_readings([chosen], target))


def select_target(devices: Sequence[DeviceState], target: str) -> list[DeviceState] | Decision:
    """The devices an exclusive target names, or the refusal when it names none or is ambiguous.

    A target that names a device (``cuda:1``, ``pod/cuda:1``, ``node/cuda:1``, a GPU UUID)
    must name exactly one: ``node-a/cuda:0`` with four pods on node-a could mean any of four
    GPUs, and guessing would break exclusivity. A pod or node names all its devices, but a
    word that reads two ways (a pod and a node of that name, say) naming different devices
    is refused too.
    """
    readings = target_readings(devices, target)
    if not readings:
        return Decision(Outcome.UNKNOWN_TARGET, None, f"exclusive target {target!r} matches no device")
    distinct = {tuple(sorted(d.key for d in pool)) for pool in readings.values()}
    pool = next(iter(readings.values()))
    one_device = set(readings) <= ONE_DEVICE_READINGS
    if len(distinct) > 1 or (one_device and len(pool) > 1):
        named = sorted({d.key for ds in readings.values() for d in ds})
        pods = sorted({d.pod for ds in readings.values() for d in ds})
        how = " or ".join(sorted(readings))
        return Decision(
            Outcome.AMBIGUOUS_TARGET,
            None,
            f"exclusive target {target!r} is ambiguous ({how}): it names {len(named)} devices of "
            f"{len(pods)} pod(s) ({', '.join(named[:12])}); name one as 'pod/device' or by GPU UUID",
        )
    return pool


def affinity_note(d: DeviceState, group: str) -> str:
    if not d.fresh:
        return "stale"
    if d.resident_group() == group:
        return "current"
    if group in d.waiting_groups:
        return "waiting"  # queued there already: the device will switch to it anyway
    if group in d.cached_groups:
        return "cached"
    return "switch"


def batch_service_s(c: Costs, running: int, slots: int) -> float:
    """A request's own time in a batch of ``running`` sequences (itself included)."""
    return c.service_s * (1.0 + c.batch_slowdown * min(running, slots) / slots)


def expected_wait_s(d: DeviceState, c: Costs) -> float:
    """Seconds a request of the device's resident group waits before it joins the batch: nothing
    while the batch has room; beyond it, each full batch ahead must finish first."""
    slots = max(1, d.workers)
    beyond = d.load + 1 - slots
    if beyond <= 0:
        return 0.0
    return (beyond / slots) * batch_service_s(c, slots, slots)


def switch_s(d: DeviceState, group: str, c: Costs) -> float:
    if group in d.cached_groups:
        return max(c.switch_floor_s, d.switch_s_from_cache or c.switch_from_cache_s)
    return max(c.switch_floor_s, d.switch_s_from_disk or c.switch_from_disk_s)


def estimate_cost(d: DeviceState, group: str, snap: Snapshot) -> tuple[float, str]:
    """Expected seconds until ``group``'s request on ``d`` is answered, with what it costs others.

    - resident (current, or switching to it): the wait for a batch slot plus the request's own
      time at the batch it joins;
    - otherwise the device first drains what runs there, serves the other groups queued ahead
      (a switch and a service each), then switches: from the CPU cache or from disk. Joining a
      group already queued there adds no switch, so it pays no displacement;
    - making a device leave a busy or just-arrived group costs the switch that brings it back.
    """
    c = snap.costs
    note = affinity_note(d, group)
    slots = max(1, d.workers)
    if note == "current":
        return expected_wait_s(d, c) + batch_service_s(c, d.load + 1, slots), note
    resident = d.resident_group()
    drain = batch_service_s(c, d.load, slots) + expected_wait_s(d, c) if d.load > 0 else 0.0
    ahead = sum(switch_s(d, g, c) + c.service_s for g in d.waiting_groups if g not in (group, resident))
    cost = drain + ahead + switch_s(d, group, c) + c.service_s
    if note == "stale":
        return cost + c.unknown_load_penalty_s, note
    if note != "waiting" and resident is not None:
        if d.load > 0:
            cost += c.displacement_share * (d.switch_s_from_cache or c.switch_from_cache_s)
        if d.last_switch_at is not None and snap.now - d.last_switch_at < c.min_residency_s:
            cost += c.residency_penalty_s
    return cost, note


def eligible(request: RouteRequest, snap: Snapshot) -> tuple[list[DeviceState], str] | Decision:
    """Devices that may serve ``request`` (target, health, failed loads), with the scope's name;
    or the refusal explaining why none may. Shared by every policy."""
    pool: Sequence[DeviceState] = snap.devices
    if not pool:
        return Decision(Outcome.NO_DEVICES, None, "no devices known")
    scope = "any"
    if request.exclusive:
        selected = select_target(pool, request.exclusive)
        if isinstance(selected, Decision):
            return selected
        pool = selected
        scope = "exclusive"
    if request.lease is not None or any(d.leased_by is not None for d in pool):
        held = lease_pool(request, snap, pool)
        if isinstance(held, Decision):
            return held
        pool = held
        scope = "lease" if request.lease is not None else scope
    serving = [d for d in pool if d.groups is None or request.group in d.groups]
    if not serving:
        # A pod of another ModelGroup would answer 404: never send it there, whatever it costs.
        return Decision(Outcome.GROUP_NOT_SERVED, None, f"{scope}: no device serves group {request.group!r}")
    pool = serving
    healthy = [d for d in pool if d.healthy]
    if not healthy:
        return Decision(Outcome.TARGET_DOWN, None, f"{scope}: no healthy device among {len(pool)}")
    loadable = [d for d in healthy if request.group not in d.failed_groups]
    if not loadable:
        return Decision(Outcome.GROUP_FAILED, None, f"{scope}: group {request.group!r} failed to load on every device")
    return loadable, scope


def lease_pool(request: RouteRequest, snap: Snapshot, pool: Sequence[DeviceState]) -> list[DeviceState] | Decision:
    """The devices of ``pool`` a request may use under the live leases (see gpufleet.routing.leases)."""
    lease = request.lease
    if lease is None:
        free = [d for d in pool if d.leased_by is None]
        if free:
            return free
        what = f"exclusive target {request.exclusive!r}" if request.exclusive else "every device"
        return Decision(Outcome.LEASED, None, f"{what}: all {len(pool)} device(s) held by a lease the request lacks")
    if lease not in snap.leases:
        return Decision(Outcome.UNKNOWN_LEASE, None, f"lease {lease!r} is not live (unknown, expired or deleted)")
    held = [d for d in pool if d.leased_by == lease]
    if held:
        return held
    if request.exclusive:
        return Decision(
            Outcome.LEASE_MISMATCH, None, f"exclusive target {request.exclusive!r} is not held by lease {lease!r}"
        )
    return Decision(Outcome.TARGET_DOWN, None, f"lease {lease!r}: none of its devices is known to the router now")


def choose_device(request: RouteRequest, snap: Snapshot) -> Decision:
    """Pick the device for ``request``; never raises, always explains."""
    found = eligible(request, snap)
    if isinstance(found, Decision):
        return found
    loadable, scope = found
    scored = sorted(
        ((estimate_cost(d, request.group, snap), d) for d in loadable),
        key=lambda item: (item[0][0], item[1].load, item[1].key),
    )
    candidates = tuple(Candidate(d.key, round(cost, 4), note) for (cost, note), d in scored)
    open_ = [(cn, d) for cn, d in scored if d.load < d.capacity]
    if not open_:
        return Decision(Outcome.SATURATED, None, f"{scope}: every eligible queue is full", candidates)
    (cost, note), best = open_[0]
    ties = sum(1 for (c, _n), _ in open_ if abs(c - cost) < 1e-9)  # equal cost: load decided
    reason = f"{scope}:{'affinity_' + note if note in ('current', 'cached', 'waiting') else note}"
    if ties > 1:
        reason += ",least_load"
    return Decision(Outcome.ROUTED, best, reason, candidates)


def honour_choice(request: RouteRequest, snap: Snapshot, device: str | None) -> Decision:
    """A pod's dispatch when the router already chose ``device``: keep that choice while the
    device is still eligible and has room (one decision per request), else decide afresh."""
    if device is None:
        return choose_device(request, snap)
    found = eligible(request, snap)
    if not isinstance(found, Decision):
        pool, scope = found
        chosen = next((d for d in pool if d.device == device), None)
        if chosen is not None and chosen.load < chosen.capacity:
            cost, note = estimate_cost(chosen, request.group, snap)
            only = (Candidate(chosen.key, round(cost, 4), note),)
            return Decision(Outcome.ROUTED, chosen, f"{scope}:router_choice", only)
    decision = choose_device(request, snap)
    if decision.routed:
        return replace(decision, reason=f"{decision.reason},router_choice_ineligible")
    return decision
