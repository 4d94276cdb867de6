"""The kept index: every device of the fleet as routing sees it, in a ``DeviceIndex``, so a
decision looks at a bounded candidate set instead of the whole fleet.

It is maintained here and nowhere else. Whatever changes a pod's devices says so (``touch``: the
pod, or the devices named) and they are rebuilt at once, from the pod's record as it is then; a
pod whose keys are about to change (a rename) or go (``drop``) leaves the index at once and comes
back, under its new name, at the next ``refresh``. ``refresh``, which every decision calls first,
also applies what time alone changed: figures going stale and cool-downs ending (a pod's
``Freshness.signature``, looked at for ``budget`` pods per refresh, in turn, so a decision's cost
does not grow with the fleet; those flags move over seconds and every pod is looked at again within
len(pods) / budget decisions), and expectations running out (their own schedule,
``Tickets.expired``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from gpufleet.router.registry import PodRecord, Registry
from gpufleet.router.reports import Freshness
from gpufleet.routing.index import DeviceIndex
from gpufleet.routing.policy import DeviceState

RESYNC_BATCH = 16  # pods a refresh looks at for changes that time alone made
ALL = None  # touch(): every device of the pod

States = Callable[[PodRecord, float, str | None], list[DeviceState]]


class FleetIndex:
    def __init__(
        self, registry: Registry, freshness: Freshness, states: States, clock: Callable[[], float]
    ) -> None:
        self.registry = registry
        self.freshness = freshness
        self.states = states  # a pod's devices now (all, or one by name)
        self.clock = clock
        self.index = DeviceIndex()
        self._dropped: set[str] = set()  # ids of pods out of the index until the next refresh
        self._keys: dict[str, set[str]] = {}  # pod id -> its device keys in the index
        self._signatures: dict[str, tuple[bool, ...]] = {}  # pod id -> its time flags when last rebuilt
        self._sweep: list[PodRecord] = []
        self._sweep_members = -1
        self._sweep_at = 0

    def touch(self, rec: PodRecord, devices: Iterable[str] | None = ALL) -> None:
        """``rec``'s devices (or those named) changed: rebuild them now. Named or not, the pod's time
        flags are looked at too (a contact may have made it fresh again)."""
        if self.registry.pods.get(rec.id) is not rec:
            return  # gone
        if rec.id in self._dropped:
            self._dropped.discard(rec.id)
            devices = ALL  # renamed: every device under its new name
        self._rebuild(rec, self.clock(), None if devices is ALL else set(devices))

    def touch_key(self, key: str) -> None:
        pod, _, device = key.rpartition("/")
        rec = self.registry.by_name.get(pod)
        if rec is not None:
            self.touch(rec, (device,))

    def drop(self, rec: PodRecord) -> None:
        """``rec``'s keys are about to change (a rename) or go (removed): out of the index now."""
        for key in self._keys.pop(rec.id, ()):
            self.index.remove(key)
        self._signatures.pop(rec.id, None)
        self._dropped.add(rec.id)

    def refresh(self, now: float, expired: list[str], budget: int = RESYNC_BATCH) -> None:
        """Bring the index up to date: pods dropped for a rename, ``budget`` pods' time flags, ``expired`` keys."""
        for key in expired:
            self.touch_key(key)
        pods = self.registry.pods
        if self._sweep_members != self.registry.members:
            self._sweep, self._sweep_members = list(pods.values()), self.registry.members
        order = self._sweep
        for _ in range(min(budget, len(order))):
            rec = order[self._sweep_at % len(order)]
            self._sweep_at += 1
            if pods.get(rec.id) is rec and self._signatures.get(rec.id) != self.freshness.signature(rec, now):
                self._rebuild(rec, now, ALL)
        dropped, self._dropped = self._dropped, set()
        for pod_id in dropped:
            renamed = pods.get(pod_id)
            if renamed is not None:
                self._rebuild(renamed, now, ALL)

    def _rebuild(self, rec: PodRecord, now: float, devices: set[str] | None) -> None:
        signature = self.freshness.signature(rec, now)
        if signature != self._signatures.get(rec.id):
            devices = None  # time changed the whole pod since it was last indexed
        self._signatures[rec.id] = signature
        keys = self._keys.setdefault(rec.id, set())
        if devices is None:
            states = self.states(rec, now, None)
            fresh = {d.key for d in states}
            for gone in keys - fresh:
                self.index.remove(gone)
            keys.clear()
        else:
            states = [d for device in devices for d in self.states(rec, now, device)]
        for d in states:
            self.index.put(d)
            keys.add(d.key)
