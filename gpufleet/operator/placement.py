"""Which group each device of a GpuPool should hold (pure): the pool's placement.json.

``place`` gives every bound group with ``minResident > 0`` that many devices of the pool:
current where there are devices enough, else cached (parked in the pod's host cache, so a
switch back is a copy, not a load). Groups with ``minResident`` 0 are not placed: demand
alone brings them in.

The rules, in order:

1. **Priority when scarce.** Each group asks for ``minResident`` units (at most one per
   device). Units are ranked highest ``priority`` first, then units a device already holds
   for the group (see 2), then by group name; the first units, one per device, are current,
   the rest cached.
2. **Stable.** A device keeps the group it was placed with (the previous placement), or, if
   it was placed with none, the group it holds now (``observed``, from the pods' status
   documents), while that group still needs it: adding a group never moves another one, and
   removing one frees its devices for the others.
3. **Spread.** A group's new units go to pods that hold it least (a pod lost costs it one
   unit, not all), preferring a device that has it cached already; then pod order, device order.

It is a floor, not a cage: the pods honour it when idle and with zero-weight jobs, and
demand may switch any device afterwards (gpufleet.api.placement).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from gpufleet.api.placement import DevicePlacement, PodPlacement, PoolPlacement

Device = tuple[str, int]  # (pod name, device index)


@dataclass(frozen=True)
class GroupDemand:
    """A group bound to the pool, as the placement sees it."""

    name: str
    min_resident: int = 0
    priority: int = 0


def place(
    pods: Sequence[tuple[str, int]],
    groups: Sequence[GroupDemand],
    observed: PoolPlacement,
    generation: int,
    previous: PoolPlacement | None = None,
) -> PoolPlacement:
    """The placement of ``groups`` on ``pods`` ((name, devices), in order), given what the
    devices hold now (``observed``, in the placement's own shape) and the placement in force
    (``previous``), stamped with ``generation``."""
    previous = previous or PoolPlacement()
    devices: list[Device] = [(pod, i) for pod, count in pods for i in range(count)]
    pod_rank = {pod: k for k, (pod, _) in enumerate(pods)}
    demands = {g.name: g for g in groups if g.min_resident > 0}
    wanted = {name: min(g.min_resident, len(devices)) for name, g in demands.items()}

    # Incumbents: the group each device was placed with, else the one it holds now.
    incumbent: dict[Device, str] = {}
    for source in (previous, observed):
        for d in devices:
            group = source.for_device(*d).current
            if d not in incumbent and group is not None and group in demands:
                incumbent[d] = group
    held = Counter(incumbent.values())

    units = sorted(
        ((name, k) for name, count in wanted.items() for k in range(count)),
        key=lambda u: (-demands[u[0]].priority, u[1] >= held[u[0]], u[0], u[1]),
    )
    entitled = Counter(name for name, _ in units[: len(devices)])
    current: dict[Device, str] = {}
    cached: dict[Device, set[str]] = {d: set() for d in devices}

    def on_pod(pod: str, group: str) -> int:
        return sum(1 for (p, _), g in current.items() if p == pod and g == group) + sum(
            1 for (p, _), gs in cached.items() if p == pod and group in gs
        )

    def was_cached(d: Device, group: str) -> int:
        if group in previous.for_device(*d).cached:
            return 0
        return 1 if group in observed.for_device(*d).cached else 2

    # Current: incumbents first (the previous placement's before what is observed), then the rest.
    for source in (previous, observed):
        for d in devices:
            group = source.for_device(*d).current
            if d not in current and group is not None and incumbent.get(d) == group and entitled[group] > 0:
                current[d] = group
                entitled[group] -= 1
    for name, _ in units[: len(devices)]:
        if entitled[name] == 0:
            continue
        free = [d for d in devices if d not in current]
        d = min(free, key=lambda d: (on_pod(d[0], name), was_cached(d, name) > 1, pod_rank[d[0]], d[1]))
        current[d] = name
        entitled[name] -= 1

    # Cached: the units beyond one per device, where they were cached before if possible.
    for name, _ in units[len(devices) :]:
        candidates = [d for d in devices if current.get(d) != name and name not in cached[d]]
        if not candidates:
            continue
        d = min(
            candidates,
            key=lambda d: (was_cached(d, name), on_pod(d[0], name), len(cached[d]), pod_rank[d[0]], d[1]),
        )
        cached[d].add(name)

    out: dict[str, PodPlacement] = {}
    for pod, count in pods:
        placed = {
            str(i): DevicePlacement(current=current.get((pod, i)), cached=tuple(sorted(cached[(pod, i)])))
            for i in range(count)
            if (pod, i) in current or cached[(pod, i)]
        }
        if placed:
            out[pod] = PodPlacement(devices=placed)
    return PoolPlacement(generation=generation, pods=out)
