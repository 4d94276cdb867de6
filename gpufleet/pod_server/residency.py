"""Which group is on a device, which are parked in its CPU cache, and how to switch.

Not thread-safe by itself: the device's scheduler calls ``make_current`` only while no
request runs on the device, one switch at a time.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gpufleet.api.model_groups import GroupSpec, ModelSpec
from gpufleet.pod_server.inference import LoadedModel

Loader = Callable[[ModelSpec, str], LoadedModel]
SwitchSource = Literal["current", "cache", "disk"]


@dataclass(frozen=True)
class SwitchResult:
    group: str
    source: SwitchSource
    seconds: float
    evicted: tuple[str, ...] = ()


class GroupLoadError(Exception):
    def __init__(self, group: str, model: str, cause: BaseException) -> None:
        super().__init__(f"group {group!r}: model {model!r} failed to load: {type(cause).__name__}: {cause}")
        self.group = group
        self.model = model


class DeviceResidency:
    def __init__(self, device: str, cache_limit_models: int, loader: Loader) -> None:
        self.device = device
        self.cache_limit = cache_limit_models
        self._loader = loader
        self.current_group: str | None = None
        self.current: dict[str, LoadedModel] = {}
        # group -> its parked models, least recently used first.
        self.cache: OrderedDict[str, dict[str, LoadedModel]] = OrderedDict()

    def cached_groups(self) -> list[str]:
        return list(self.cache)

    def cached_model_count(self) -> int:
        return sum(len(models) for models in self.cache.values())

    def make_current(self, group_id: str, group: GroupSpec) -> SwitchResult:
        started = time.perf_counter()
        if self.current_group == group_id:
            return SwitchResult(group_id, "current", 0.0)
        previous_group, previous = self.current_group, self.current
        evicted: list[str] = []
        if group_id in self.cache:
            incoming = self.cache.pop(group_id)
            evicted += self._park(previous_group, previous)
            for m in incoming.values():
                m.activate(self.device)
            source: SwitchSource = "cache"
        else:
            # Free the device before loading: a GPU may not hold two groups at once.
            evicted += self._park(previous_group, previous)
            self.current_group, self.current = None, {}
            try:
                incoming = self._load(group_id, group)
            except GroupLoadError:
                if previous_group is not None and previous_group in self.cache:
                    self._restore(previous_group)
                raise
            source = "disk"
        self.current_group, self.current = group_id, incoming
        return SwitchResult(group_id, source, time.perf_counter() - started, tuple(evicted))

    def _load(self, group_id: str, group: GroupSpec) -> dict[str, LoadedModel]:
        loaded: dict[str, LoadedModel] = {}
        for spec in group.models:
            try:
                loaded[spec.id] = self._loader(spec, self.device)
            except Exception as exc:  # any loader failure degrades only this group
                loaded.clear()
                raise GroupLoadError(group_id, spec.id, exc) from exc
        return loaded

    def _park(self, group_id: str | None, models: dict[str, LoadedModel]) -> list[str]:
        """Move a group into the CPU cache, evicting least recently used groups to fit."""
        if group_id is None or not models:
            return []
        evicted: list[str] = []
        if len(models) > self.cache_limit:
            return [group_id]  # too big to cache at all: dropped, reloaded from disk next time
        while self.cache and self.cached_model_count() + len(models) > self.cache_limit:
            old, _ = self.cache.popitem(last=False)
            evicted.append(old)
        for m in models.values():
            m.park()
        self.cache[group_id] = models
        return evicted

    def _restore(self, group_id: str) -> None:
        models = self.cache.pop(group_id)
        for m in models.values():
            m.activate(self.device)
        self.current_group, self.current = group_id, models
