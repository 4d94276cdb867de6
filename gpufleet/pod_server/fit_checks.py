"""Whether a group can ever be current on a device, estimated before anything loads.

A group's need on a device (weights from the checkpoint headers, and the KV caches its engines
will reserve) is estimated once per device, group and spec: a spec a reload changed is estimated
anew, and a group that left the file is forgotten. Estimating reads files, so every call here is
blocking: device threads and the prefetch thread make them, never the event loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping

from gpufleet.api.model_groups import GroupSpec
from gpufleet.pod_server.devices import is_cuda
from gpufleet.pod_server.group_runtime import kv_budget_bytes, max_sequences
from gpufleet.pod_server.memory import Fit, GroupNeed, MemoryLedger, check_fit, estimate_group_need
from gpufleet.pod_server.settings import PodServerSettings

log = logging.getLogger(__name__)


class FitChecks:
    def __init__(self, settings: PodServerSettings, ledger: MemoryLedger) -> None:
        self.settings = settings
        self.ledger = ledger
        # (device, group) -> the spec it was estimated for, and its need.
        self._needs: dict[tuple[str, str], tuple[GroupSpec, GroupNeed]] = {}
        self._lock = threading.Lock()

    def reserve_bytes(self, device: str) -> int:
        gb = self.settings.device_memory_reserve_gb
        return int((gb if gb is not None else (0.5 if is_cuda(device) else 0.0)) * 1e9)

    def need(self, device: str, group: str, spec: GroupSpec) -> GroupNeed:
        """What the group will take on ``device``."""
        key = (device, group)
        with self._lock:
            known = self._needs.get(key)
        if known is not None and known[0] == spec:
            return known[1]
        need = estimate_group_need(
            group,
            spec,
            device,
            kv_budget_bytes(device, self.settings.kv_cache_gb),
            max_sequences(device, self.settings.max_sequences_per_device),
        )
        with self._lock:
            self._needs[key] = (spec, need)
        return need

    def fit(self, device: str, group: str, spec: GroupSpec) -> Fit:
        """The fit check before a switch (reads checkpoint headers and the device's memory)."""
        return check_fit(
            self.need(device, group, spec), self.ledger.capacity(device).total_bytes, self.reserve_bytes(device)
        )

    def unfit(self, devices: list[str], specs: Mapping[str, GroupSpec]) -> Iterator[tuple[str, str, GroupSpec, Fit]]:
        """Every (device, group) pair that can never fit; a group whose need cannot be estimated
        (missing files, an unreadable config) is skipped: its switch will say what is wrong."""
        for device in devices:
            for group, spec in specs.items():
                try:
                    fit = self.fit(device, group, spec)
                except Exception as exc:
                    log.debug("fit check skipped", extra={"device": device, "group": group, "error": str(exc)})
                    continue
                if not fit.fits:
                    yield device, group, spec, fit

    def forget(self, group: str) -> None:
        with self._lock:
            for key in [k for k in self._needs if k[1] == group]:
                del self._needs[key]

    def known(self) -> set[str]:
        """Groups with an estimate on some device."""
        with self._lock:
            return {group for _, group in self._needs}
