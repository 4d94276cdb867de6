"""What each model really takes on its device, what each device has, and whether a group fits.

``check_fit`` is the one decision, a pure function over numbers. The rest is the edge that
feeds it: a group's bytes estimated from its checkpoint headers and config before it is
loaded, a device's capacity (``torch.cuda.mem_get_info`` on CUDA; host RAM on CPU devices,
capped by ``DEVICE_MEMORY_GB``), and a thread-safe ledger of what was really loaded (weights
measured on the loaded tensors, KV bytes the engines reserved, host copies in the CPU cache).
"""

from __future__ import annotations

import gc
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from gpufleet.api.model_groups import GroupSpec, ModelSpec
from gpufleet.pod_server.devices import is_cuda

log = logging.getLogger(__name__)

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


# --- settings -------------------------------------------------------------------------------


def parse_device_memory(raw: str | None, devices: list[str]) -> dict[str, int]:
    """``DEVICE_MEMORY_GB``: one number for every device, or ``cpu:0=0.06,cuda:1=70``; bytes per device."""
    if raw is None or not raw.strip():
        return {}
    text = raw.strip()
    if "=" not in text:
        return {d: _gb(text, "DEVICE_MEMORY_GB") for d in devices}
    out: dict[str, int] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in devices:
            raise ValueError(f"DEVICE_MEMORY_GB: {item.strip()!r} does not name a device of DEVICES ({devices})")
        out[name] = _gb(value, "DEVICE_MEMORY_GB")
    return out


def _gb(value: str, setting: str) -> int:
    try:
        gb = float(value)
    except ValueError:
        raise ValueError(f"{setting}: {value.strip()!r} is not a number of GB") from None
    if gb <= 0:
        raise ValueError(f"{setting}: {gb} must be > 0")
    return int(gb * 1e9)


def default_cpu_cache_bytes() -> int:
    """Half of the host RAM that is available at start-up: parked groups must never get the pod OOM-killed."""
    return int(psutil.virtual_memory().available * 0.5)


# --- the decision -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupNeed:
    group: str
    weight_bytes: int
    kv_bytes: int

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_bytes


@dataclass(frozen=True)
class Fit:
    fits: bool
    needed_bytes: int
    available_bytes: int  # what the device may ever give a group: capacity less the reserve

    def message(self, group: str, device: str) -> str:
        return (
            f"model group {group!r} needs {self.needed_bytes} bytes ({self.needed_bytes / 1e9:.3f} GB: weights + KV "
            f"cache) on {device}, which has {self.available_bytes} bytes ({self.available_bytes / 1e9:.3f} GB) "
            f"available for a group after its reserve"
        )


def check_fit(need: GroupNeed, capacity_bytes: int, reserve_bytes: int) -> Fit:
    """Whether a group can ever be current on a device: the switch frees the previous group first,
    so the whole capacity less the reserve (allocator overhead, CUDA context) is the bound."""
    available = max(0, capacity_bytes - reserve_bytes)
    return Fit(need.total <= available, need.total, available)


# --- estimates before loading (headers and config only, no weights read) ----------------------


def checkpoint_weight_bytes(spec: ModelSpec, dtype_itemsize: int | None) -> int:
    """Bytes of a model's weights as loaded: tensor sizes from the safetensors headers, at the
    dtype they will be loaded in (``dtype_itemsize``; None keeps the stored dtype)."""
    root = Path(spec.source)
    files = sorted(root.glob("*.safetensors")) if root.is_dir() else []
    if not files:  # pickled checkpoints: their file size is the best cheap estimate
        return sum(f.stat().st_size for f in root.glob("*.bin")) if root.is_dir() else 0
    total = 0
    for f in files:
        with f.open("rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header: dict[str, Any] = json.loads(fh.read(header_len))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for n in info["shape"]:
                numel *= int(n)
            stored = _ST_ITEMSIZE.get(str(info["dtype"]), 4)
            is_float = str(info["dtype"]) in ("F64", "F32", "F16", "BF16")
            total += numel * (dtype_itemsize if dtype_itemsize and is_float else stored)
    return total


def estimate_group_need(
    group_id: str,
    group: GroupSpec,
    device: str,
    kv_budget_bytes: int,
    max_sequences: int,
) -> GroupNeed:
    """Weights and the KV caches the engines will reserve (the same ``size_kv_cache`` they use)."""
    from transformers import AutoConfig

    from gpufleet.pod_server.engine.kv_sizing import kv_bytes_per_token, size_kv_cache
    from gpufleet.pod_server.inference import context_length_of

    weights = kv = 0
    generative = [m for m in group.models if m.task in ("chat", "completion")]
    share = kv_budget_bytes // max(1, len(generative))
    for spec in group.models:
        itemsize = _itemsize(spec, device)
        weights += checkpoint_weight_bytes(spec, itemsize)
        if spec in generative:
            config = AutoConfig.from_pretrained(spec.source)
            per_token = kv_bytes_per_token(config, itemsize or 4)
            try:
                sizing = size_kv_cache(
                    model_id=spec.id,
                    bytes_per_token=per_token,
                    budget_bytes=share,
                    max_sequences=max_sequences,
                    context_length=context_length_of(config, spec),
                    on_gpu=is_cuda(device),
                )
                kv += sizing.bytes
            except Exception:  # a budget below one context fails in the engine, with its own message
                kv += share
    return GroupNeed(group_id, weights, kv)


def _itemsize(spec: ModelSpec, device: str) -> int | None:
    if spec.dtype != "auto":
        return _ITEMSIZE[spec.dtype]
    return 2 if is_cuda(device) else 4  # inference.resolve_dtype: bf16 on GPUs, float32 on CPUs


# --- the device's own figures -----------------------------------------------------------------


@dataclass(frozen=True)
class DeviceCapacity:
    total_bytes: int  # what a group may use on this device (capped by DEVICE_MEMORY_GB)
    free_bytes: int  # free now, as the device or host reports it (capped like the total)
    source: str  # "cuda" (mem_get_info), "host" (psutil), with "+cap" when DEVICE_MEMORY_GB applies


def read_capacity(device: str, cap_bytes: int | None) -> DeviceCapacity:
    if is_cuda(device):
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(device))
        source = "cuda"
    else:
        mem = psutil.virtual_memory()
        free, total, source = mem.available, mem.total, "host"
    if cap_bytes is not None:
        return DeviceCapacity(min(total, cap_bytes), min(free, cap_bytes), source + "+cap")
    return DeviceCapacity(int(total), int(free), source)


def release_device_memory(device: str) -> None:
    """Drop unreferenced tensors and hand cached allocator blocks back before a retry or restore.
    On CPU devices there is no allocator cache to return, and a full collection costs ~0.1 s."""
    if not is_cuda(device):
        return
    import torch

    gc.collect()
    with torch.cuda.device(torch.device(device)):
        torch.cuda.empty_cache()


# --- the ledger -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    model: str
    group: str
    weight_bytes: int
    kv_bytes: int


class MemoryLedger:
    """What is really where: per device the models resident on it with their weight and KV bytes,
    and per model its host copy in the pod's CPU cache. Written by device threads, read by the API."""

    def __init__(self, devices: list[str], caps: dict[str, int] | None = None, reserve_bytes: int = 0) -> None:
        self.devices = list(devices)
        self.caps = dict(caps or {})
        self.reserve_bytes = reserve_bytes
        self._lock = threading.Lock()
        self._resident: dict[str, dict[str, ModelEntry]] = {d: {} for d in devices}
        self._host: dict[str, int] = {}  # model id -> bytes of its one host copy
        self.host_copies_made = 0  # host copies ever created (a second device reusing one adds none)

    # writers
    def set_resident(self, device: str, group: str, weights: dict[str, int]) -> None:
        with self._lock:
            self._resident[device] = {m: ModelEntry(m, group, b, 0) for m, b in weights.items()}

    def set_kv(self, device: str, model: str, kv_bytes: int) -> None:
        with self._lock:
            e = self._resident[device].get(model)
            if e is not None:
                self._resident[device][model] = ModelEntry(e.model, e.group, e.weight_bytes, kv_bytes)

    def clear_kv(self, device: str) -> None:
        with self._lock:
            self._resident[device] = {
                m: ModelEntry(e.model, e.group, e.weight_bytes, 0) for m, e in self._resident[device].items()
            }

    def clear_resident(self, device: str) -> None:
        with self._lock:
            self._resident[device] = {}

    def add_host_copy(self, model: str, nbytes: int) -> None:
        with self._lock:
            if model not in self._host:
                self.host_copies_made += 1
            self._host[model] = nbytes

    def drop_host_copy(self, model: str) -> None:
        with self._lock:
            self._host.pop(model, None)

    # readers
    def resident(self, device: str) -> dict[str, ModelEntry]:
        with self._lock:
            return dict(self._resident[device])

    def host_copies(self) -> dict[str, int]:
        with self._lock:
            return dict(self._host)

    def device_used_bytes(self, device: str) -> int:
        return sum(e.weight_bytes + e.kv_bytes for e in self.resident(device).values())

    def capacity(self, device: str) -> DeviceCapacity:
        return read_capacity(device, self.caps.get(device))

    def device_document(self, device: str) -> dict[str, Any]:
        """Bytes on one device: capacity, free, reserve, and what the ledger has placed there."""
        try:
            cap = self.capacity(device)
        except Exception as exc:  # a failing read must not break the API
            log.warning("device memory read failed", extra={"device": device, "error": str(exc)})
            cap = DeviceCapacity(0, 0, "unavailable")
        used = self.device_used_bytes(device)
        capped = device in self.caps
        return {
            "memory_total_bytes": cap.total_bytes,
            # Under a cap the device's free memory is the cap less what the ledger placed there.
            "memory_free_bytes": max(0, cap.total_bytes - used) if capped else cap.free_bytes,
            "memory_reserved_bytes": self.reserve_bytes,
            "memory_ledger_bytes": used,
            "memory_source": cap.source,
        }
