"""Which group is current on a device, and switching to another one as a transaction.

``make_current`` either ends with the asked-for group current with every model on this device,
or rolls back: the previous group current again (from the host cache, retried once after
releasing memory, else reloaded from disk), or, if even that fails, no group and
``restore_error`` saying why. A per-device lock makes it one switch at a time, whoever calls
(the scheduler's thread after a time-out included); ``abort`` lets a timed-out switch roll back
as soon as its blocking load returns.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gpufleet.api.model_groups import GroupSpec, ModelSpec
from gpufleet.pod_server.host_cache import HostCache
from gpufleet.pod_server.inference import LoadedModel
from gpufleet.pod_server.memory import MemoryLedger, release_device_memory

log = logging.getLogger(__name__)

Loader = Callable[[ModelSpec, str], LoadedModel]
SwitchSource = Literal["current", "cache", "disk"]


@dataclass(frozen=True)
class SwitchResult:
    group: str
    source: SwitchSource
    seconds: float
    evicted: tuple[str, ...] = ()
    prefetched: bool = False  # the group was in the cache because a prefetch put it there


class GroupLoadError(Exception):
    def __init__(self, group: str, model: str, cause: BaseException) -> None:
        super().__init__(f"group {group!r}: model {model!r} failed to load: {type(cause).__name__}: {cause}")
        self.group = group
        self.model = model


class SwitchAborted(Exception):
    """The switch's caller gave up on it (a time-out): roll back once the blocking part returns."""


class DeviceResidency:
    def __init__(
        self,
        device: str,
        cache_limit_models: int,
        loader: Loader,
        *,
        host_cache: HostCache | None = None,
        ledger: MemoryLedger | None = None,
    ) -> None:
        self.device = device
        self._loader = loader
        self.ledger = ledger or MemoryLedger([device])
        self.host_cache = host_cache or HostCache(cache_limit_models, None, self.ledger)
        self.current_group: str | None = None
        self.current_spec: GroupSpec | None = None
        self.current: dict[str, LoadedModel] = {}
        self.restore_error: str | None = None  # set when a failed switch could not restore the previous group
        self._lock = threading.Lock()

    def cached_groups(self) -> list[str]:
        """Groups whose host copy this device could take (the pod's cache, less what is current here)."""
        return [g for g in self.host_cache.groups() if g != self.current_group]

    def cached_model_count(self) -> int:
        return self.host_cache.model_count()

    @property
    def cache(self) -> list[str]:
        return self.cached_groups()

    def make_current(self, group_id: str, group: GroupSpec, abort: threading.Event | None = None) -> SwitchResult:
        with self._lock:
            return self._make_current(group_id, group, abort or threading.Event())

    def drop_current(self) -> str | None:
        """Make no group current (the current one left model_groups.json or changed there): its
        models go back to their host copy when it is cached, else are freed. Returns the group."""
        with self._lock:
            group = self.current_group
            self._park_current()
            self.restore_error = None
            return group

    def _make_current(self, group_id: str, group: GroupSpec, abort: threading.Event) -> SwitchResult:
        started = time.perf_counter()
        if self.current_group == group_id and self.current_spec == group:
            return SwitchResult(group_id, "current", 0.0)
        previous_group, previous_spec = self.current_group, self.current_spec
        evicted: list[str] = []
        # Free the device first: a GPU never holds two groups. A previous group the cache
        # cannot hold is dropped here, so its memory is gone before the next one loads.
        self._park_current()
        incoming: dict[str, LoadedModel] = {}
        source: SwitchSource = "disk"
        prefetched = False
        try:
            taken = self.host_cache.acquire(group_id, self.device, group)
            if taken is None:
                with self.host_cache.group_lock(group_id):  # a peer device or a prefetch may be loading it
                    taken = self.host_cache.acquire(group_id, self.device, group)
                    if taken is None:
                        incoming = self._load(group_id, group, abort)
                        evicted += self._cache(group_id, group, incoming)
            if taken is not None:
                incoming, prefetched = taken
                source = "cache"
                self._activate(group_id, incoming, abort)
            if abort.is_set():
                raise SwitchAborted(f"switch to {group_id!r} was abandoned")
        except BaseException as exc:
            self.host_cache.release(group_id, self.device)
            for m in incoming.values():
                m.park()  # a cached group keeps its host copy; an uncached one is dropped with `incoming`
            incoming = {}
            release_device_memory(self.device)
            self._rollback(previous_group, previous_spec)
            if isinstance(exc, GroupLoadError | SwitchAborted):
                raise
            raise GroupLoadError(group_id, "*", exc) from exc
        self._set_current(group_id, group, incoming)
        return SwitchResult(group_id, source, time.perf_counter() - started, tuple(evicted), prefetched)

    # --- steps -------------------------------------------------------------------------------

    def _load(self, group_id: str, group: GroupSpec, abort: threading.Event) -> dict[str, LoadedModel]:
        loaded: dict[str, LoadedModel] = {}
        for spec in group.models:
            if abort.is_set():
                raise SwitchAborted(f"switch to {group_id!r} was abandoned")
            try:
                loaded[spec.id] = self._loader(spec, self.device)
            except Exception as exc:  # any loader failure (an OOM too) degrades only this group
                loaded.clear()
                release_device_memory(self.device)
                raise GroupLoadError(group_id, spec.id, exc) from exc
        return loaded

    def _cache(self, group_id: str, spec: GroupSpec, models: dict[str, LoadedModel]) -> list[str]:
        """Give a group loaded from disk its host copy and a place in the pod's cache, if it fits."""
        nbytes = sum(m.bytes for m in models.values())
        if not self.host_cache.room_for(nbytes, len(models)):
            return []  # served from the device only; dropped when parked
        for m in models.values():
            m.ensure_host_copy()
        _, evicted = self.host_cache.insert(group_id, models, device=self.device, spec=spec)
        return evicted

    def _activate(self, group_id: str, models: dict[str, LoadedModel], abort: threading.Event) -> None:
        for mid, m in models.items():
            if abort.is_set():
                raise SwitchAborted(f"switch to {group_id!r} was abandoned")
            try:
                m.activate(self.device)
            except Exception as exc:
                raise GroupLoadError(group_id, mid, exc) from exc
            if m.device != self.device:  # never a group serving from the wrong device
                raise GroupLoadError(group_id, mid, RuntimeError(f"model is on {m.device}, not {self.device}"))

    def _park_current(self) -> None:
        group, models = self.current_group, self.current
        self.current_group, self.current_spec, self.current = None, None, {}
        self.ledger.clear_resident(self.device)
        if group is None:
            return
        if self.host_cache.release(group, self.device):
            for m in models.values():
                m.park()  # back onto its host copy: the device copy is freed, nothing is copied
            return
        del models  # not cached: its last references go, and the memory with them
        gc.collect()  # module trees hold reference cycles: free the weights now, not at the next collection
        release_device_memory(self.device)

    def _rollback(self, group_id: str | None, spec: GroupSpec | None) -> None:
        """Make the previous group current again: from the cache (retried once after releasing
        memory), else from disk; failing both, no group and a clear ``restore_error``."""
        if group_id is None or spec is None:
            return
        errors: list[str] = []
        for attempt in range(2):
            taken = self.host_cache.acquire(group_id, self.device, spec)
            if taken is None:
                break
            models = taken[0]
            try:
                self._activate(group_id, models, threading.Event())
            except Exception as exc:
                errors.append(str(exc))
                self.host_cache.release(group_id, self.device)
                for m in models.values():
                    m.park()
                release_device_memory(self.device)
                log.warning(
                    "restore from cache failed", extra={"device": self.device, "group": group_id, "try": attempt}
                )
                continue
            self._set_current(group_id, spec, models)
            return
        try:
            models = self._load(group_id, spec, threading.Event())
            self._cache(group_id, spec, models)
        except Exception as exc:
            errors.append(str(exc))
            self.restore_error = f"group {group_id!r} could not be restored after a failed switch: {'; '.join(errors)}"
            log.error("restore failed, no group current", extra={"device": self.device, "error": self.restore_error})
            return
        self._set_current(group_id, spec, models)

    def _set_current(self, group_id: str, spec: GroupSpec, models: dict[str, LoadedModel]) -> None:
        self.current_group, self.current_spec, self.current = group_id, spec, models
        self.restore_error = None
        self.ledger.set_resident(self.device, group_id, {mid: m.bytes for mid, m in models.items()})
