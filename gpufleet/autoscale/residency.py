"""How many devices of a pool should hold each group current, from demand (pure).

A device holding group A serves A's sequences without a switch; giving it to group B costs a
switch (``switch_s``, measured by the pods) and pays off only when B's requests would
otherwise wait longer than that. With ``r`` devices each carrying ``target`` sequences, a
group with ``demand`` sequences (in flight and waiting) has ``demand - r*target`` of them
queued, drained at ``r*target`` per service time, so the expected wait of a new arrival is

    wait(r) = max(0, demand - r*target) * service_s / (r*target)        (infinite at r = 0)

The rule, per group, each round:

* **Need**: the fewest devices with ``wait(r) <= switch_s``, which is
  ``ceil(demand / (target * (1 + switch_s / service_s)))``, at least 1 under any demand;
  clamped to ``[minResident, maxResident]`` and to the pool's devices.
* **Add** at once when the need is above the current desire (a switch costs less than the wait
  it saves), highest priority and longest wait first, within the pool's swap budget
  (``swaps_per_device_per_minute`` switches per device per minute, counted over the last 60 s;
  the ``minResident`` floor is never held back by it) and the devices left. When none is
  left, a group holding more than its own need (kept by its release delay) lends one, at the
  same or a lower priority, if its minimum residency and the flap rule allow a release.
* **Release** only when every need seen for the release delay (longer than two switches:
  ``max(release_delay_s, 2 * switch_s)``) was lower, and the group has been at its level for at
  least ``min_residency_s``; down to the highest of those needs, not lower. A restarted scaler
  starts watching afresh, so it never releases on its first look.
* **No flapping**: a release that reverses the group's last change is allowed only when the
  reversals in the last ``flap_window_s`` (its own included) stay at most ``max_reversals - 1``.
  Additions are never held back by it, and still no window holds more than ``max_reversals``
  reversals: each addition that reverses follows a release that was allowed with room for it.
  The pod count does not shrink under a group so held (``ResidencyPlan.pinned_devices``), so
  the pool's size does not force the reversal either.

Releases are free (the device keeps the group until another group claims it); only additions
spend the swap budget. The output is the pool's placement floor (``gpufleet.operator.placement``):
the pods honour it when idle, and demand inside a pod may switch any device afterwards.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

SWAP_WINDOW_S = 60.0
FLAP_HOLD = "release: held against flapping"


@dataclass(frozen=True)
class ResidencySettings:
    target_sequences_per_device: int = 8
    release_delay_s: float = 60.0
    min_residency_s: float = 2.0
    swaps_per_device_per_minute: float = 6.0
    flap_window_s: float = 300.0
    max_reversals: int = 2


@dataclass(frozen=True)
class GroupLoad:
    """One group of the pool, as the round sees it."""

    name: str
    demand: float = 0.0  # sequences in flight (running or queued at pods) and waiting at routers
    resident: int = 0  # devices holding it current now (observed)
    service_s: float = 1.0  # time a request holds its device
    min_resident: int = 0
    max_resident: int | None = None
    priority: int = 0


@dataclass(frozen=True)
class GroupHistory:
    desired: int = 0
    since_s: float = 0.0  # when ``desired`` last changed
    low_since_s: float | None = None  # since when every need seen was below ``desired`` (None: it is not)
    low_max: int = 0  # the highest need seen since then
    changes: tuple[
        tuple[float, int], ...
    ] = ()  # (time, +1 or -1): the last change before the flap window, and all in it


@dataclass(frozen=True)
class ResidencyState:
    groups: Mapping[str, GroupHistory] = field(default_factory=dict)
    swaps: tuple[float, ...] = ()  # times of the additions of the last SWAP_WINDOW_S


@dataclass(frozen=True)
class GroupDecision:
    """One group's outcome with its inputs: a structured log line and a status field."""

    group: str
    before: int
    after: int
    need: int
    demand: float
    resident: int
    wait_s: float
    switch_s: float
    reason: str

    @property
    def changed(self) -> bool:
        return self.after != self.before


@dataclass(frozen=True)
class ResidencyPlan:
    desired: dict[str, int]
    decisions: tuple[GroupDecision, ...]
    state: ResidencyState

    @property
    def pinned_devices(self) -> int:
        """Devices held by groups whose release the flap rule refused this round: shrinking the pool
        under them would force the reversal the rule just refused, so the pod count keeps them
        (``gpufleet.autoscale.replicas``: its ``floor_devices``)."""
        return sum(d.after for d in self.decisions if d.reason.startswith(FLAP_HOLD))


def expected_wait_s(demand: float, devices: int, target: int, service_s: float) -> float:
    """Mean wait of a new arrival with ``devices`` holding the group (see the module doc)."""
    if demand <= 0:
        return 0.0
    if devices <= 0:
        return math.inf
    capacity = devices * target
    return max(0.0, demand - capacity) * service_s / capacity


def devices_needed(demand: float, target: int, service_s: float, switch_s: float) -> int:
    """The fewest devices whose expected wait is no longer than a switch."""
    if demand <= 0:
        return 0
    per_device = target * (1.0 + max(0.0, switch_s) / max(service_s, 1e-6))
    return max(1, math.ceil(demand / per_device - 1e-9))


def reversals(changes: Sequence[tuple[float, int]], since_s: float) -> int:
    """Direction changes at or after ``since_s`` (each counted at the later change's time)."""
    return sum(1 for (_, a), (t, b) in itertools.pairwise(changes) if a != b and t >= since_s)


def _record(history: GroupHistory, now: float, direction: int, desired: int, window_s: float) -> GroupHistory:
    changes = (*history.changes, (now, direction))
    inside = [c for c in changes if c[0] >= now - window_s]
    before = [c for c in changes if c[0] < now - window_s][-1:]  # tells whether the first one inside reverses
    return replace(history, desired=desired, since_s=now, changes=tuple(before + inside))


def _release_blocked(h: GroupHistory, now: float, settings: ResidencySettings) -> str | None:
    """Why the group may not give a device back now (minimum residency, flapping), if so."""
    if now - h.since_s < settings.min_residency_s:
        return "release: minimum residency"
    reverses = bool(h.changes) and h.changes[-1][1] > 0
    count = reversals(h.changes, now - settings.flap_window_s) + (1 if reverses else 0)
    if reverses and count > settings.max_reversals - 1:
        return f"{FLAP_HOLD} ({count - 1} reversals in {settings.flap_window_s:g}s)"
    return None


def plan_residency(
    groups: Sequence[GroupLoad],
    devices: int,
    switch_s: float,
    settings: ResidencySettings,
    state: ResidencyState,
    now: float,
) -> ResidencyPlan:
    """Each group's desired residency on a pool of ``devices`` devices (see the module doc)."""
    release_delay = max(settings.release_delay_s, 2.0 * switch_s)
    target = settings.target_sequences_per_device
    histories: dict[str, GroupHistory] = {}
    desired: dict[str, int] = {}
    needs: dict[str, int] = {}
    reasons: dict[str, str] = {}
    floors: dict[str, int] = {}

    for g in groups:
        ceiling = min(devices, g.max_resident if g.max_resident is not None else devices)
        floor = min(g.min_resident, ceiling)
        need = min(max(devices_needed(g.demand, target, g.service_s, switch_s), floor), ceiling)
        h = state.groups.get(g.name)
        if h is None:  # first sight (or the scaler restarted): what the devices hold is the intent
            h = GroupHistory(desired=min(max(g.resident, floor), ceiling), since_s=now)
        floors[g.name], needs[g.name] = floor, need
        current = min(max(h.desired, floor), ceiling)
        reason = "steady"
        if current != h.desired:  # the bounds moved (minResident, maxResident, the pool's size)
            h = _record(h, now, 1 if current > h.desired else -1, current, settings.flap_window_s)
            reason = "bounds"
        if need >= current:
            h = replace(h, low_since_s=None, low_max=0)
        else:
            if h.low_since_s is None:
                h = replace(h, low_since_s=now, low_max=need)
            h = replace(h, low_max=max(h.low_max, need))
            target_level, low_since = max(h.low_max, floor), h.low_since_s
            assert low_since is not None
            held_back: str | None = None
            if target_level >= current:  # a need seen since it went low still asks for this many (or more)
                held_back = f"release: demand asked for {h.low_max} within {release_delay:g}s"
            elif now - low_since < release_delay:
                held_back = f"release: demand has asked for fewer only {now - low_since:g}s of {release_delay:g}s"
            else:
                held_back = _release_blocked(h, now, settings)
            if held_back is None:
                current = target_level
                h = replace(_record(h, now, -1, current, settings.flap_window_s), low_since_s=None, low_max=0)
                reason = "release"
            elif reason == "steady":  # a change of bounds this round is what its log line says
                reason = held_back
        histories[g.name], desired[g.name], reasons[g.name] = h, current, reason

    # Additions: floors first, then by priority and by how long the group's requests would wait.
    swaps = tuple(t for t in state.swaps if t > now - SWAP_WINDOW_S)
    budget = math.floor(settings.swaps_per_device_per_minute * devices * SWAP_WINDOW_S / 60.0) - len(swaps)
    free = devices - sum(desired.values())
    by_name = {g.name: g for g in groups}

    def urgency(name: str) -> tuple[int, float, str]:
        g = by_name[name]
        return (-g.priority, -expected_wait_s(g.demand, desired[name], target, g.service_s), name)

    wanting = sorted((n for n in desired if needs[n] > desired[n]), key=urgency)
    new_swaps: list[float] = []
    for name in wanting:
        want = needs[name] - desired[name]
        to_floor = max(0, floors[name] - desired[name])
        # No device free: take from groups holding more than their own need, at this priority or
        # lower (their release delay guards them against their own demand's dips, not against
        # another group whose wait pays for the switch).
        while free < min(want, max(to_floor, budget)):
            donors = [
                d
                for d in desired
                if d != name
                and desired[d] > max(needs[d], floors[d])
                and by_name[d].priority <= by_name[name].priority
                and _release_blocked(histories[d], now, settings) is None
            ]
            if not donors:
                break
            donor = min(donors, key=lambda d: (by_name[d].priority, needs[d] - desired[d], d))
            desired[donor] -= 1
            histories[donor] = replace(
                _record(histories[donor], now, -1, desired[donor], settings.flap_window_s), low_since_s=None, low_max=0
            )
            reasons[donor] = f"release: lent to {name}"
            free += 1
        # The floor is owed regardless of the budget, not of the devices.
        grant = min(want, max(0, free), max(to_floor, max(0, budget)))
        if grant <= 0:
            reasons[name] = "add: no device free" if free <= 0 else "add: swap budget spent"
            continue
        free -= grant
        budget -= grant
        new_swaps.extend([now] * grant)
        desired[name] += grant
        histories[name] = _record(histories[name], now, 1, desired[name], settings.flap_window_s)
        reasons[name] = (
            "add"
            if grant == want
            else f"add {grant} of {want}: " + ("no device free" if free <= 0 else "swap budget spent")
        )

    decisions = []
    for g in groups:
        before = state.groups[g.name].desired if g.name in state.groups else histories[g.name].desired
        decisions.append(
            GroupDecision(
                group=g.name,
                before=before,
                after=desired[g.name],
                need=needs[g.name],
                demand=g.demand,
                resident=g.resident,
                wait_s=expected_wait_s(g.demand, g.resident, target, g.service_s),
                switch_s=switch_s,
                reason=reasons[g.name],
            )
        )
    return ResidencyPlan(desired, tuple(decisions), ResidencyState(histories, swaps + tuple(new_swaps)))
