"""Device utilisation and memory: NVML on CUDA devices, host figures on CPU devices.

``StatsSource`` is the small boundary interface: ``NvmlSource`` is the real one (tested on
GPU machines), ``HostSource`` serves CPU devices and is what runs where there is no GPU.
Neither ever raises to the caller: a failing read degrades to ``available: false``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from gpufleet.pod_server.memory import MemoryLedger

log = logging.getLogger(__name__)
GB = 1024**3


@dataclass(frozen=True)
class DeviceReading:
    available: bool  # True when the figures come from the GPU itself
    utilization: float  # percent
    memory_used: float  # GB
    memory_total: float  # GB
    name: str = ""
    uuid: str = ""

    @property
    def memory_percent(self) -> float:
        return round(100.0 * self.memory_used / self.memory_total, 2) if self.memory_total else 0.0


class StatsSource(Protocol):
    def read(self, device: str) -> DeviceReading: ...

    def uuid(self, device: str) -> str | None:
        """The physical GPU's UUID ("GPU-..."), published as an exclusive target; None on CPU."""
        ...

    def close(self) -> None: ...


class HostSource:
    """CPU devices share the host: utilisation and memory of the whole machine."""

    def __init__(self) -> None:
        psutil.cpu_percent(interval=None)  # prime the counter so the first read is meaningful

    def read(self, device: str) -> DeviceReading:
        mem = psutil.virtual_memory()
        return DeviceReading(
            available=False,
            utilization=float(psutil.cpu_percent(interval=None)),
            memory_used=round((mem.total - mem.available) / GB, 3),
            memory_total=round(mem.total / GB, 3),
            name="cpu",
        )

    def uuid(self, device: str) -> str | None:
        return None

    def close(self) -> None:
        pass


class NvmlSource:
    """Reads CUDA devices through NVML, mapping cuda:N to the physical GPU by UUID so that
    CUDA_VISIBLE_DEVICES renumbering cannot point at the wrong card."""

    def __init__(self, nvml: Any = None, cuda_uuid: Callable[[int], str] | None = None) -> None:
        # ``nvml``: the pynvml module (a fake of its few calls in tests); ``cuda_uuid``: torch's
        # UUID of CUDA device N as this process numbers it.
        if nvml is None:
            import pynvml

            nvml = pynvml
        self._nvml: Any = nvml
        self._cuda_uuid = cuda_uuid or _torch_cuda_uuid
        nvml.nvmlInit()
        self._handles: dict[str, Any] = {}
        self._fallback = HostSource()

    def _handle(self, device: str) -> Any:
        if device not in self._handles:
            uuid = str(self._cuda_uuid(int(device.split(":")[1])))
            uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
            self._handles[device] = self._nvml.nvmlDeviceGetHandleByUUID(uuid)
        return self._handles[device]

    def uuid(self, device: str) -> str | None:
        if not device.startswith("cuda"):
            return None
        try:
            raw = self._nvml.nvmlDeviceGetUUID(self._handle(device))
        except Exception as exc:  # a target we cannot name is only a missing convenience
            log.warning("nvml uuid failed", extra={"device": device, "error": str(exc)})
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def read(self, device: str) -> DeviceReading:
        if not device.startswith("cuda"):
            return self._fallback.read(device)
        try:
            h = self._handle(device)
            mem = self._nvml.nvmlDeviceGetMemoryInfo(h)
            util = self._nvml.nvmlDeviceGetUtilizationRates(h)
            name = self._nvml.nvmlDeviceGetName(h)
            uuid = self._nvml.nvmlDeviceGetUUID(h)
            return DeviceReading(
                available=True,
                utilization=float(util.gpu),
                memory_used=round(mem.used / GB, 3),
                memory_total=round(mem.total / GB, 3),
                name=name.decode() if isinstance(name, bytes) else str(name),
                uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
            )
        except Exception as exc:  # NVML errors must never reach a client
            log.warning("nvml read failed", extra={"device": device, "error": str(exc)})
            return DeviceReading(False, 0.0, 0.0, 0.0)

    def close(self) -> None:
        # It may be shut down already, or never fully initialised.
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()


def _torch_cuda_uuid(index: int) -> str:
    import torch

    return str(torch.cuda.get_device_properties(index).uuid)


def open_stats_source(devices: list[str]) -> StatsSource:
    if any(d.startswith("cuda") for d in devices):
        try:
            return NvmlSource()
        except Exception as exc:
            log.warning("NVML unavailable, using host figures", extra={"error": str(exc)})
    return HostSource()


class GpuStats:
    """Keeps the peak utilisation per device and renders the /api/gpu_stats document."""

    def __init__(self, source: StatsSource, devices: list[str], ledger: MemoryLedger | None = None) -> None:
        self.source = source
        self.devices = devices
        self.ledger = ledger  # adds the bytes the pod itself placed on each device, and its capacity
        self.peak: dict[str, float] = {d: 0.0 for d in devices}

    def sample(self) -> dict[str, DeviceReading]:
        readings = {d: self.source.read(d) for d in self.devices}
        for d, r in readings.items():
            self.peak[d] = max(self.peak[d], r.utilization)
        return readings

    def document(self) -> dict[str, Any]:
        readings = self.sample()
        devices = {
            d: {
                "utilization": r.utilization,
                "memory_used": r.memory_used,
                "memory_total": r.memory_total,
                "memory_percent": r.memory_percent,
                "peak_utilization": self.peak[d],
                "uuid": r.uuid or None,  # the GPU's NVML UUID: an exclusive and lease target
            }
            for d, r in readings.items()
        }
        if self.ledger is not None:
            for d in self.devices:
                devices[d].update(self.ledger.device_document(d))
        doc: dict[str, Any] = {"available": any(r.available for r in readings.values()), "devices": devices}
        doc.update(devices[self.devices[0]])  # the original single-device fields, kept for old clients
        return doc
