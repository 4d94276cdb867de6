"""A seeded emulated fleet: which group sits current (and which cached) on every device of
every pod (pure; the emulator serves it, benchmarks and tests read it).

Group popularity is Zipf-like (a few groups on many devices, a long tail on few), which is
what an affinity router meets in practice; every pod can serve every group of the catalog,
as pod servers sharing one model_groups.json do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class EmulatedDevice:
    device: str
    current_group: str | None
    cached_groups: list[str] = field(default_factory=list)
    running: int = 0  # requests being answered here now
    queued: int = 0


@dataclass
class EmulatedPod:
    name: str
    node: str
    devices: list[EmulatedDevice]


@dataclass(frozen=True)
class FleetLayout:
    pods: list[EmulatedPod]
    groups: list[str]
    models: dict[str, str]  # model id -> group id

    @property
    def device_count(self) -> int:
        return sum(len(p.devices) for p in self.pods)


def group_names(count: int) -> list[str]:
    return [f"g{i:03d}" for i in range(count)]


def model_ids(group: str) -> list[str]:
    """Two models per group, as the demo groups have: a chat and a completion model."""
    return [f"{group}-chat", f"{group}-complete"]


def make_layout(
    pods: int,
    devices_per_pod: int = 8,
    groups: int = 32,
    cached_per_device: int = 2,
    seed: int = 0,
    zipf_s: float = 1.1,
    prefix: str = "emu",
) -> FleetLayout:
    """`pods` pods of `devices_per_pod` devices each; each device's current group and up to
    `cached_per_device` cached ones drawn from a Zipf(`zipf_s`) popularity over `groups` groups."""
    if pods < 1 or devices_per_pod < 1 or groups < 1:
        raise ValueError("pods, devices_per_pod and groups must be at least 1")
    rng = random.Random(seed)
    names = group_names(groups)
    weights = [1.0 / (rank + 1) ** zipf_s for rank in range(groups)]
    out = []
    for p in range(pods):
        devices = []
        for d in range(devices_per_pod):
            current = rng.choices(names, weights)[0]
            cached: list[str] = []
            for _ in range(min(cached_per_device, groups - 1)):
                pick = rng.choices(names, weights)[0]
                if pick != current and pick not in cached:
                    cached.append(pick)
            devices.append(EmulatedDevice(f"cuda:{d}", current, cached))
        out.append(EmulatedPod(f"{prefix}-{p:05d}", f"{prefix}-node-{p:05d}", devices))
    models = {m: g for g in names for m in model_ids(g)}
    return FleetLayout(out, names, models)
