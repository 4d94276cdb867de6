"""Device names: parsing, validation against what this machine has, and torch mapping.

Logical devices are ``cuda:N`` or ``cpu:N``. Several ``cpu:N`` devices share the host's
processor but each has its own workers, queue and cache, so every multi-device code path
runs (and is tested) on a machine without a GPU.
"""

from __future__ import annotations

import re

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d{1,3}))?$")


def cuda_device_count() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of the pod server
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def parse_device_list(raw: list[str], *, cuda_count: int | None = None) -> list[str]:
    """Normalise and validate ``DEVICES``; raises ValueError naming the bad entry."""
    if not raw:
        count = cuda_device_count() if cuda_count is None else cuda_count
        return [f"cuda:{i}" for i in range(count)] or ["cpu:0"]
    out: list[str] = []
    for item in raw:
        m = _DEVICE.match(item.strip().lower())
        if not m:
            raise ValueError(f"DEVICES: {item!r} is not a device; use cuda:N or cpu:N")
        kind, index = m.group(1), int(m.group(2) or 0)
        if kind == "cuda" and cuda_count is None:
            cuda_count = cuda_device_count()  # importing torch is slow: only when a GPU is named
        if kind == "cuda" and index >= (cuda_count or 0):
            seen = f"{cuda_count} visible CUDA device(s)" if cuda_count else "no visible CUDA device"
            # In a pod this usually means the GPU runtime is missing (e.g. runtimeClassName: nvidia).
            hint = "" if cuda_count else " (is the NVIDIA container runtime set up for this pod?)"
            raise ValueError(f"DEVICES: {item!r} is unavailable: this machine has {seen}{hint}")
        name = f"{kind}:{index}"
        if name in out:
            raise ValueError(f"DEVICES: {name!r} is listed twice")
        out.append(name)
    return out


def torch_device(name: str) -> str:
    """The torch device string for a logical device (every cpu:N is torch's one 'cpu')."""
    return "cpu" if name.startswith("cpu") else name


def is_cuda(name: str) -> bool:
    return name.startswith("cuda")
