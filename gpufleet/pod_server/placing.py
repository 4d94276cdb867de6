"""Honouring a pool's placement.json on this pod's devices.

The placement is a floor, not a cage (``gpufleet.api.placement``): a device's ``current`` group
is queued once, as a zero-weight job, so the queue rule makes it current in its turn, behind real
work and never interrupting a batch; its ``cached`` groups are handed to the prefetcher, which
loads them into the host cache when there is room. Each device's placement is honoured once per
change of it (or of its group's spec): if demand then switches the device to another group, the
placement does not pull it back until the operator writes a new one. A placed group not servable yet (not in
model_groups.json, refused, failed) is tried again on the next call, so a group bound to the pool
after its placement was written still lands.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from gpufleet.api.errors import GpufleetError
from gpufleet.api.model_groups import GroupSpec
from gpufleet.api.placement import DevicePlacement, PodPlacement, PoolPlacement
from gpufleet.pod_server.scheduler import DeviceScheduler, Prefetch

log = logging.getLogger(__name__)


@dataclass
class _Honoured:
    """What was done for one device's placement (reset when its placement changes)."""

    placement: DevicePlacement
    current_done: bool = False
    current_spec: GroupSpec | None = None  # the placed group's spec when it was placed
    cached_done: set[str] = field(default_factory=set)


class Placer:
    def __init__(self, pod: str, schedulers: Mapping[str, DeviceScheduler], prefetch: Prefetch) -> None:
        self.pod = pod
        self.schedulers = schedulers  # in DEVICES order: the placement names devices by index
        self._prefetch = prefetch
        self._state: dict[str, _Honoured] = {}

    def names(self, placement: PoolPlacement | None, index: int) -> bool:
        """Whether the placement says anything of this pod's device ``index`` (its default preload is skipped)."""
        return placement is not None and str(index) in placement.pods.get(self.pod, PodPlacement()).devices

    def honour(self, placement: PoolPlacement | None, served: Mapping[str, GroupSpec]) -> list[tuple[str, str]]:
        """Act on what is new in the placement for each device (event loop); returns the (device,
        group) placement jobs queued now."""
        queued: list[tuple[str, str]] = []
        for index, (device, s) in enumerate(self.schedulers.items()):
            want = placement.for_device(self.pod, index) if placement is not None else DevicePlacement()
            state = self._state.get(device)
            if state is None or state.placement != want:
                state = self._state[device] = _Honoured(want)
            if want.current is not None and state.current_spec != served.get(want.current):
                # A placed group whose spec a reload changed is dropped from the device: place it anew.
                state.current_done = False
            if not state.current_done:
                state.current_done = self._place_current(s, want.current, served, queued)
                state.current_spec = served.get(want.current) if want.current is not None else None
            for group in want.cached:
                if group in state.cached_done or group not in served or group in s.failed_groups():
                    continue
                self._prefetch(device, group, served[group])  # skips what is cached, or has no room
                state.cached_done.add(group)
        return queued

    def _place_current(
        self, s: DeviceScheduler, group: str | None, served: Mapping[str, GroupSpec], queued: list[tuple[str, str]]
    ) -> bool:
        """Queue the placed group on ``s`` unless it is there or on its way; False: not yet possible."""
        if group is None:
            return True
        if group not in served or group in s.failed_groups() or s.closing:
            return False
        current = s.residency.current_group == group and not s.current_is_stale()
        if current or s.switching_to == group or any(j.group == group for j in s.jobs()):
            return True  # there already, or demand has it queued: it becomes current in its turn
        try:
            s.place(group)
        except GpufleetError as exc:  # a full queue: try again on the next call
            log.warning("placement deferred", extra={"device": s.device, "group": group, "error": str(exc)})
            return False
        log.info("placement queued", extra={"device": s.device, "group": group})
        queued.append((s.device, group))
        return True
