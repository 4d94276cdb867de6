"""Decisions that do not grow with the fleet: ``choose_device`` over indexes kept as devices change.

``DeviceIndex.choose`` returns what ``choose_device`` returns on the same devices (a property
test checks it over random fleets) while looking at a bounded candidate set:

- the devices holding the group, in a heap ordered by how full their batch is: for the cost
  model the expected time there only grows with ``(load + 1) / workers``, so the head is the best;
- the devices where the group waits, and those that hold no work and have it parked in their
  CPU cache, or hold no work at all (heaps by switch time);
- then a lower bound for every device not looked at (no switch is cheaper than the fleet's
  fastest, no busy device drains in less than a service time). If a candidate beats it, that
  candidate is the answer; otherwise (a saturated or unusual fleet) the full function decides.

Entries are never deleted from the heaps: each carries the version of its device, and stale
ones are skipped when they surface (lazy deletion), so every update costs O(log n).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gpufleet.routing.policy import (
    Candidate,
    Costs,
    Decision,
    DeviceState,
    Outcome,
    RouteRequest,
    Snapshot,
    choose_device,
    estimate_cost,
)

DEFAULTS = Costs()  # heaps order unmeasured devices by these; other defaults make choose() use the full function
SMALL_FLEET = 32  # below this the full function is as fast as the index
SCAN_LIMIT = 64  # at most this many devices of a set are looked at one by one
_EPS = 1e-9

Entry = tuple[float, float, str, int]  # (order, tie, key, version)


@dataclass
class _Slot:
    state: DeviceState
    version: int


class DeviceIndex:
    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}
        self._versions = itertools.count(1)
        self._resident: dict[str, list[Entry]] = {}  # group -> by (load + 1) / workers, load, key
        self._cached_idle: dict[str, list[Entry]] = {}  # group -> idle devices caching it, by cache switch time
        self._waiting: dict[str, set[str]] = {}  # group -> devices where it is queued
        self._idle: list[Entry] = []  # devices with nothing in flight, by disk switch time
        self._stale: set[str] = set()
        self._tuple: tuple[DeviceState, ...] | None = None
        # Measured switch times per device, and their minimum once asked (forgotten when it may move).
        self._disk: dict[str, float] = {}
        self._cache: dict[str, float] = {}
        self._fastest_known: dict[str, float] = {}

    # --- updates -------------------------------------------------------------------------------

    def put(self, d: DeviceState) -> None:
        """Add ``d`` or replace the device of the same key."""
        old = self._slots.get(d.key)
        if old is not None and old.state == d:
            return
        if old is not None:
            self._forget(old.state)
        version = next(self._versions)
        self._slots[d.key] = _Slot(d, version)
        self._tuple = None
        self._note_times(d.key, d.switch_s_from_disk, d.switch_s_from_cache)
        if not d.fresh:
            self._stale.add(d.key)
            return
        resident = d.resident_group()
        if resident is not None:
            entry = ((d.load + 1) / max(1, d.workers), float(d.load), d.key, version)
            heapq.heappush(self._resident.setdefault(resident, []), entry)
        for g in d.waiting_groups:
            self._waiting.setdefault(g, set()).add(d.key)
        if d.load == 0 and not d.waiting_groups:
            disk = d.switch_s_from_disk or DEFAULTS.switch_from_disk_s
            heapq.heappush(self._idle, (disk, 0.0, d.key, version))
            cache = d.switch_s_from_cache or DEFAULTS.switch_from_cache_s
            for g in d.cached_groups:
                heapq.heappush(self._cached_idle.setdefault(g, []), (cache, 0.0, d.key, version))

    def remove(self, key: str) -> None:
        old = self._slots.pop(key, None)
        if old is not None:
            self._forget(old.state)
            self._tuple = None
            self._note_times(key, None, None)

    def _note_times(self, key: str, disk: float | None, cache: float | None) -> None:
        for source, times, value in (("disk", self._disk, disk), ("cache", self._cache, cache)):
            before = times.get(key)
            if before == value:
                continue
            if value is None:
                del times[key]
            else:
                times[key] = value
            known = self._fastest_known.get(source)
            if known is not None and value is not None and value < known:
                self._fastest_known[source] = value
            elif known is not None and before is not None and before <= known:
                del self._fastest_known[source]  # the fastest may have gone: recount when asked

    def replace_all(self, devices: Iterable[DeviceState]) -> None:
        keep = set()
        for d in devices:
            keep.add(d.key)
            self.put(d)
        for key in [k for k in self._slots if k not in keep]:
            self.remove(key)

    def _forget(self, d: DeviceState) -> None:
        # Heap entries die with their version; only the plain sets need the key removed.
        self._stale.discard(d.key)
        for g in d.waiting_groups:
            keys = self._waiting.get(g)
            if keys is not None:
                keys.discard(d.key)
                if not keys:
                    del self._waiting[g]

    # --- views -----------------------------------------------------------------------------------

    @property
    def devices(self) -> tuple[DeviceState, ...]:
        if self._tuple is None:
            self._tuple = tuple(s.state for s in self._slots.values())
        return self._tuple

    def __len__(self) -> int:
        return len(self._slots)

    def snapshot(self, now: float, costs: Costs) -> Snapshot:
        return Snapshot(self.devices, now=now, costs=costs)

    # --- the decision ------------------------------------------------------------------------------

    def choose(self, request: RouteRequest, now: float, costs: Costs) -> Decision:
        odd_defaults = (costs.switch_from_disk_s, costs.switch_from_cache_s) != (
            DEFAULTS.switch_from_disk_s,
            DEFAULTS.switch_from_cache_s,
        )
        if request.exclusive or odd_defaults or len(self._slots) <= SMALL_FLEET:
            return choose_device(request, self.snapshot(now, costs))
        found = self._candidates(request.group, now, costs)
        if found is None:
            return choose_device(request, self.snapshot(now, costs))
        snap = Snapshot((), now=now, costs=costs)
        scored: list[tuple[tuple[float, int, str], str, DeviceState]] = []
        for d in found:
            if _eligible(d, request.group):
                cost, note = estimate_cost(d, request.group, snap)
                scored.append(((cost, d.load, d.key), note, d))
        if not scored:
            return choose_device(request, self.snapshot(now, costs))
        scored.sort(key=lambda x: x[0])
        (cost, _load, _key), note, best = scored[0]
        if not cost < self._lower_bound(costs) - _EPS:
            return choose_device(request, self.snapshot(now, costs))
        ties = sum(1 for k, _n, _d in scored if abs(k[0] - cost) < 1e-9)
        reason = f"any:{'affinity_' + note if note in ('current', 'cached', 'waiting') else note}"
        if ties > 1:
            reason += ",least_load"
        candidates = tuple(Candidate(d.key, round(k[0], 4), n) for k, n, d in scored)
        return Decision(Outcome.ROUTED, best, reason, candidates)

    def _candidates(self, group: str, now: float, costs: Costs) -> list[DeviceState] | None:
        """The devices worth scoring for ``group``; None when a set is too big to look at."""
        waiting = self._waiting.get(group, set())
        if len(waiting) > SCAN_LIMIT or len(self._stale) > SCAN_LIMIT:
            return None
        out: dict[str, DeviceState] = {}

        def open_(d: DeviceState) -> bool:
            return _eligible(d, group)

        def settled(d: DeviceState) -> bool:
            return _eligible(d, group) and _settled(d, now, costs) and d.resident_group() != group

        def cached(d: DeviceState) -> bool:  # an idle device that switches from its cache
            return settled(d) and group in d.cached_groups

        def switches(d: DeviceState) -> bool:  # an idle device that must load the group
            return settled(d) and group not in d.cached_groups

        floor = costs.switch_floor_s
        heaps = (
            (self._resident.get(group), open_, None),
            (self._cached_idle.get(group), cached, floor),
            (self._idle, switches, floor),
        )
        for heap, good, priced_from in heaps:
            if not heap:
                continue
            heads = self._heads(heap, good, priced_from)
            if heads is None:
                return None
            for d in heads:
                out[d.key] = d
        for key in itertools.chain(waiting, self._stale):
            out[key] = self._slots[key].state
        return list(out.values())

    def _heads(
        self, heap: list[Entry], good: Callable[[DeviceState], bool], floor: float | None = None
    ) -> list[DeviceState] | None:
        """Live entries from the top of ``heap`` until two ``good`` ones have been seen: the best of
        the heap's kind, and the next one, which tells whether the best ties with devices left
        unseen (their cost only grows along the heap). None past SCAN_LIMIT entries.

        With ``floor`` (a heap keyed by switch seconds, each priced at least the floor) every entry
        under the floor is taken too: the floor makes them all cost the same, and such a tie is
        broken by load and key, not by the heap's order of the raw seconds. (Equal raw seconds are
        already in key order.)"""
        out: list[DeviceState] = []
        popped: list[Entry] = []
        seen = 0
        try:
            while heap:
                if seen >= 2 and (floor is None or heap[0][0] > floor + _EPS):
                    break
                entry = heapq.heappop(heap)
                slot = self._slots.get(entry[2])
                if slot is None or slot.version != entry[3]:
                    continue  # a replaced or removed device: its entry is dead
                popped.append(entry)
                if len(popped) > SCAN_LIMIT:
                    return None
                d = slot.state
                out.append(d)
                if good(d):
                    seen += 1
        finally:
            for entry in popped:
                heapq.heappush(heap, entry)
        return out

    def _lower_bound(self, costs: Costs) -> float:
        """No device left unscored can cost less than this: a switch from disk (idle or not) takes at
        least the fleet's fastest one; a busy device caching the group drains for a service first;
        resident devices beyond the heap's head are no better than the head."""
        disk = max(costs.switch_floor_s, self._fastest("disk", costs.switch_from_disk_s)) + costs.service_s
        cached = max(costs.switch_floor_s, self._fastest("cache", costs.switch_from_cache_s)) + 2 * costs.service_s
        return min(disk, cached)

    def _fastest(self, source: str, default: float) -> float:
        times = self._disk if source == "disk" else self._cache
        if not times:
            return default
        if source not in self._fastest_known:
            self._fastest_known[source] = min(times.values())
        fastest = self._fastest_known[source]
        return min(default, fastest) if len(times) < len(self._slots) else fastest  # some devices unmeasured


def _eligible(d: DeviceState, group: str) -> bool:
    # Requests with leases, and fleets with leased devices, take the full function (FleetState.decide).
    return (
        d.healthy
        and group not in d.failed_groups
        and d.load < d.capacity
        and d.leased_by is None
        and (d.groups is None or group in d.groups)
    )


def _settled(d: DeviceState, now: float, costs: Costs) -> bool:
    return d.last_switch_at is None or now - d.last_switch_at >= costs.min_residency_s
