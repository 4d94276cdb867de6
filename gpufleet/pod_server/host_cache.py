"""The pod's CPU cache of groups: one host copy per model, shared by every device of the pod.

Bounded by bytes (``MAX_CPU_CACHE_GB``, counting what the pinned allocator really takes) and by
``MAX_CPU_CACHED_MODELS``. A group stays in the cache while it is current somewhere (its host
copy is what parking returns to), and only groups current nowhere are evicted, least recently
used first. A device that takes a group another device holds gets a module tree over the same
host tensors (``LoadedModel.clone_sharing_weights``), never a second copy.

An entry remembers the spec it was loaded from: once model_groups.json changes a group, its old
copy is never handed out for the new spec, and ``discard_stale`` drops it when no device uses it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from gpufleet.api.model_groups import GroupSpec
from gpufleet.pod_server.inference import LoadedModel
from gpufleet.pod_server.memory import MemoryLedger


@dataclass
class CachedGroup:
    models: dict[str, LoadedModel]  # the originals, owners of the host copies
    nbytes: int
    users: set[str] = field(default_factory=set)  # devices where the group is current
    prefetched: bool = False  # loaded ahead of need, not yet used by a switch
    spec: GroupSpec | None = None  # what it was loaded from (None: not said, matches any)

    def matches(self, spec: GroupSpec | None) -> bool:
        return spec is None or self.spec is None or self.spec == spec


class HostCache:
    def __init__(self, max_models: int, max_bytes: int | None, ledger: MemoryLedger | None = None) -> None:
        self.max_models = max_models
        self.max_bytes = max_bytes
        self.ledger = ledger
        self._lock = threading.RLock()
        self._groups: OrderedDict[str, CachedGroup] = OrderedDict()  # least recently used first
        self._group_locks: dict[str, threading.Lock] = {}

    def group_lock(self, group: str) -> threading.Lock:
        """Held while a group is loaded from disk, so two devices (or a prefetch) never load it twice."""
        with self._lock:
            return self._group_locks.setdefault(group, threading.Lock())

    # --- reading ---------------------------------------------------------------------------

    def groups(self) -> list[str]:
        with self._lock:
            return list(self._groups)

    def __contains__(self, group: object) -> bool:
        with self._lock:
            return group in self._groups

    def model_count(self) -> int:
        with self._lock:
            return sum(len(g.models) for g in self._groups.values())

    def used_bytes(self) -> int:
        with self._lock:
            return sum(g.nbytes for g in self._groups.values())

    def users(self, group: str) -> set[str]:
        with self._lock:
            g = self._groups.get(group)
            return set(g.users) if g else set()

    # --- taking and giving back ------------------------------------------------------------

    def holds(self, group: str, spec: GroupSpec | None = None) -> bool:
        """Whether the group is cached (loaded from ``spec``, when given)."""
        with self._lock:
            entry = self._groups.get(group)
            return entry is not None and entry.matches(spec)

    def acquire(
        self, group: str, device: str, spec: GroupSpec | None = None
    ) -> tuple[dict[str, LoadedModel], bool] | None:
        """The group's models for ``device`` (the originals, or clones over their host tensors when
        another device holds them) and whether it had been prefetched; None when not cached, or
        cached from another spec than ``spec`` (an old copy no device uses is dropped then)."""
        with self._lock:
            entry = self._groups.get(group)
            if entry is None:
                return None
            if not entry.matches(spec):
                if not entry.users:
                    self._evict(group)
                return None
            self._groups.move_to_end(group)
            prefetched, entry.prefetched = entry.prefetched, False
            shared = bool(entry.users - {device})
            entry.users.add(device)
            originals = entry.models
        if not shared:
            return dict(originals), prefetched
        return {mid: m.clone_sharing_weights() for mid, m in originals.items()}, prefetched

    def release(self, group: str, device: str) -> bool:
        """``device`` no longer serves ``group``; True while the host copy stays cached."""
        with self._lock:
            entry = self._groups.get(group)
            if entry is None:
                return False
            entry.users.discard(device)
            return True

    def insert(
        self,
        group: str,
        models: dict[str, LoadedModel],
        *,
        device: str | None,
        prefetched: bool = False,
        spec: GroupSpec | None = None,
    ) -> tuple[bool, list[str]]:
        """Cache a group just loaded (current on ``device``, or prefetched) from ``spec``; returns
        whether it was cached and the groups evicted for it. A group too big for the budget is not
        cached, nor one whose copy from another spec a device still uses."""
        nbytes = sum(m.host_bytes or m.bytes for m in models.values())
        evicted: list[str] = []
        with self._lock:
            old = self._groups.get(group)
            if old is not None and not old.matches(spec):
                if old.users:
                    return False, evicted
                self._evict(group)
                evicted.append(group)
            elif old is not None:
                return True, evicted
            if not self._could_ever_fit(len(models), nbytes):
                return False, evicted
            while not self._fits(len(models), nbytes):
                victim = next((g for g, e in self._groups.items() if not e.users), None)
                if victim is None:
                    return False, evicted  # everything cached is in use somewhere
                self._evict(victim)
                evicted.append(victim)
            self._groups[group] = CachedGroup(dict(models), nbytes, {device} if device else set(), prefetched, spec)
        if self.ledger is not None:
            for mid, m in models.items():
                self.ledger.add_host_copy(mid, m.host_bytes or m.bytes)
        return True, evicted

    def forget(self, group: str) -> None:
        with self._lock:
            if group in self._groups:
                self._evict(group)

    def discard_stale(self, served: Mapping[str, GroupSpec]) -> list[str]:
        """Drop the copies no device uses of groups not served any more, or served from another spec
        now (after a model_groups.json change); returns the groups dropped. Copies in use stay until
        their device parks them and this is called again."""
        with self._lock:
            stale = [
                g for g, e in self._groups.items() if not e.users and (g not in served or not e.matches(served[g]))
            ]
            for g in stale:
                self._evict(g)
        return stale

    def _evict(self, group: str) -> None:
        entry = self._groups.pop(group)
        if self.ledger is not None:
            for mid in entry.models:
                self.ledger.drop_host_copy(mid)

    def _could_ever_fit(self, count: int, nbytes: int) -> bool:
        return count <= self.max_models and (self.max_bytes is None or nbytes <= self.max_bytes)

    def _fits(self, count: int, nbytes: int) -> bool:
        models = sum(len(g.models) for g in self._groups.values()) + count
        used = sum(g.nbytes for g in self._groups.values()) + nbytes
        return models <= self.max_models and (self.max_bytes is None or used <= self.max_bytes)

    def room_for(self, nbytes: int, count: int) -> bool:
        """Whether a group of this size could be cached now, evicting only groups current nowhere."""
        with self._lock:
            if not self._could_ever_fit(count, nbytes):
                return False
            free_models = self.max_models - sum(len(g.models) for g in self._groups.values() if g.users)
            used_in_use = sum(g.nbytes for g in self._groups.values() if g.users)
            return count <= free_models and (self.max_bytes is None or used_in_use + nbytes <= self.max_bytes)
