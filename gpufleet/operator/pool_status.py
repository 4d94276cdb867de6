"""Pure status computation for GpuPools and for the ModelGroups bound to them.

Both read the pool's pods as gpufleet.operator.status does for a dedicated group (a pod
counts when Kubernetes says Ready and its pod server's own status document, from its
Lease, says ready), plus what a pool's pod servers add to that document: the groups they
refuse and why, the groups that can never fit a device (with bytes needed and available),
the hash of the model_groups.json they serve and the placement generation they honour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gpufleet.api.gpupool import DeviceResidency, GpuPoolSpec, GpuPoolStatus
from gpufleet.api.modelgroup import ModelGroupSpec, ModelGroupStatus
from gpufleet.api.placement import DevicePlacement, PodPlacement, PoolPlacement
from gpufleet.operator.builders import child_names, pool_selector_string
from gpufleet.operator.status import (
    Conds,
    PodView,
    observed_generation,
    placements,
    pod_problems,
    pod_view,
    pods_progress,
    set_ready_by_replicas,
)


def _up(live: list[PodView]) -> list[PodView]:
    """Pods that are ready in Kubernetes' eyes and in their pod server's own."""
    return [v for v in live if v.pod_ready and v.server is not None and v.server.ready]


def observed_placement(views: Sequence[PodView]) -> PoolPlacement:
    """What each device of the pool holds now, in the placement's own shape (devices by their
    index in the pod's document, which lists them in DEVICES order)."""
    pods: dict[str, PodPlacement] = {}
    for v in views:
        if v.server is None or v.terminating:
            continue
        devices = {
            str(i): DevicePlacement(current=d.current_group, cached=tuple(d.cached_groups))
            for i, d in enumerate(v.server.devices)
        }
        pods[v.name] = PodPlacement(devices=devices)
    return PoolPlacement(pods=pods)


def current_residency(views: Sequence[PodView]) -> dict[str, int]:
    """Devices holding each group current now (healthy ones of pods not terminating)."""
    out: dict[str, int] = {}
    for v in views:
        if v.server is None or v.terminating:
            continue
        for d in v.server.devices:
            if d.current_group is not None and d.healthy:
                out[d.current_group] = out.get(d.current_group, 0) + 1
    return out


def unfit_everywhere(live: Sequence[PodView], group: str) -> str | None:
    """The pod server's message (bytes needed and available) when every device of the pool
    that reports says the group can never fit it; None while any device may take it."""
    reasons = [
        d.insufficient_memory_groups.get(group) for v in live if v.server is not None for d in v.server.devices
    ]
    if not reasons or not all(reasons):
        return None
    return f"fits none of the pool's {len(reasons)} device(s); {reasons[0]}"


def pod_refusal(live: Sequence[PodView], group: str) -> str | None:
    """Why the pool's pod servers refuse the group (the first that says so), if any does."""
    for v in sorted(live, key=lambda v: v.name):
        if v.server is not None and group in v.server.refused_groups:
            return f"{v.name}: {v.server.refused_groups[group]}"
    return None


def compute_pool_status(
    name: str,
    generation: int | None,
    spec: GpuPoolSpec,
    statefulset: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    previous: GpuPoolStatus | None,
    now: str,
    *,
    served: Sequence[str] = (),
    refused: Mapping[str, str] | None = None,
    placement_generation: int | None = None,
    groups_hash: str | None = None,
) -> GpuPoolStatus:
    """The GpuPool's status: its pods (as a dedicated group's), the residency of each device,
    and the bound groups it does not serve (``refused``: the operator's reasons; the pods'
    own refusals and groups that fit no device are added here)."""
    live = [v for v in (pod_view(p) for p in pods) if not v.terminating]
    ready = _up(live)
    desired = spec.replicas
    conds = Conds()

    problems = pod_problems(live)
    broken = [v for v in live if v.server is not None and v.server.config_error]
    if broken:
        first = broken[0]
        assert first.server is not None
        problems.append(
            ("ConfigError", f"{len(broken)} pod server(s) keep their previous files; {first.name}: "
                            f"{first.server.config_error}")
        )
    if problems:
        conds.set("Degraded", True, problems[0][0], "; ".join(m for _, m in problems))
    else:
        conds.set("Degraded", False, "AsExpected", "")

    # Pods that have not loaded the files the operator wrote last (only pod servers that say).
    behind = [
        v.name
        for v in ready
        if v.server is not None
        and (
            (groups_hash is not None and v.server.groups_hash is not None and v.server.groups_hash != groups_hash)
            or (
                placement_generation is not None
                and v.server.placement_generation is not None
                and v.server.placement_generation < placement_generation
            )
        )
    ]
    progress = pods_progress(statefulset, live, desired)
    if progress:
        conds.set("Progressing", True, *progress)
    elif len(ready) < desired:
        conds.set("Progressing", True, "Starting", f"{len(ready)}/{desired} pod servers ready")
    elif behind:
        conds.set(
            "Progressing", True, "ApplyingGroups",
            f"{len(behind)}/{len(ready)} pod servers have not loaded the pool's current files yet ({behind[0]})",
        )
    else:
        conds.set("Progressing", False, "Complete", f"{desired} pod server(s) up to date, {len(served)} group(s)")

    set_ready_by_replicas(conds, len(ready), desired)

    refusals = dict(refused or {})
    for group in served:
        why = pod_refusal(live, group) or unfit_everywhere(live, group)
        if why:
            refusals[group] = why
    devices = [
        DeviceResidency(
            pod=v.name,
            node=v.node or v.server.node,
            device=d.device,
            current=d.current_group,
            switching_to=d.switching_to,
            cached=list(d.cached_groups),
        )
        for v in sorted(live, key=lambda v: v.name)
        if v.server is not None
        for d in v.server.devices
    ]
    observed = observed_generation(generation, statefulset, previous.observed_generation if previous else None)
    return GpuPoolStatus(
        observed_generation=observed,
        replicas=len(live),
        ready_replicas=len(ready),
        selector=pool_selector_string(name),
        groups=",".join(sorted(g for g in served if g not in refusals)) or None,
        conditions=conds.conditions(previous.conditions if previous else [], now, observed),
        devices=devices,
        refused_groups=dict(sorted(refusals.items())),
        placement_generation=placement_generation,
    )


def _serves_current(view: PodView, group: str, ids: set[str]) -> bool:
    """The pod server serves the group with its current models (not an older definition)."""
    server = view.server
    if server is None or group not in server.groups:
        return False
    served = {m for m, g in server.models.items() if g == group}
    return served == ids


def compute_pooled_status(
    name: str,
    generation: int | None,
    spec: ModelGroupSpec,
    pool: str,
    pool_spec: GpuPoolSpec | None,
    pods: list[dict[str, Any]],
    previous: ModelGroupStatus | None,
    now: str,
    *,
    pool_found: bool = True,
    conflict: str | None = None,
) -> ModelGroupStatus:
    """A pooled ModelGroup's status, from the pool's pods.

    Ready: at least ``minResident`` devices hold the group (current or cached); with
    ``minResident`` 0, at least one ready pool pod serves it and some device can fit it.
    Degraded: ``PoolNotFound``, ``Refused`` (a pod server's reason), ``InsufficientMemory``
    (every device of the pool says it can never fit: bytes needed and available),
    ``ModelIdConflict`` (ids an earlier group keeps), ``MinResidentTooHigh``, ``LoadFailed``."""
    live = [v for v in (pod_view(p) for p in pods) if not v.terminating] if pool_found else []
    up = _up(live)
    ids = {m.id for m in spec.models}
    serving = [v for v in up if _serves_current(v, name, ids)]
    holding = sorted(
        f"{v.name}/{d.device}"
        for v in up
        if v.server is not None
        for d in v.server.devices
        if d.current_group == name or name in d.cached_groups
    )
    conds = Conds()
    want = spec.min_resident

    problems: list[tuple[str, str]] = []
    if not pool_found:
        problems.append(("PoolNotFound", f"GpuPool {pool!r} does not exist in this namespace"))
    refusal = pod_refusal(live, name)
    if refusal:
        problems.append(("Refused", refusal))
    unfit = unfit_everywhere(live, name)
    if unfit:
        problems.append(("InsufficientMemory", unfit))
    if conflict:
        problems.append(("ModelIdConflict", conflict))
    pool_devices = pool_spec.replicas * pool_spec.gpus_per_pod if pool_spec is not None else None
    if pool_devices is not None and want > pool_devices:
        problems.append(
            ("MinResidentTooHigh", f"minResident {want} exceeds the {pool_devices} device(s) of GpuPool {pool!r}")
        )
    load_failed = sorted(
        f"{v.name}/{d.device}"
        for v in live
        if v.server is not None
        for d in v.server.devices
        if name in d.failed_groups and name not in d.insufficient_memory_groups
    )
    if load_failed:
        problems.append(("LoadFailed", f"the group failed to load on {', '.join(load_failed)}"))
    if problems:
        conds.set("Degraded", True, problems[0][0], "; ".join(m for _, m in problems))
    else:
        conds.set("Degraded", False, "AsExpected", "")

    if not pool_found:
        ready, reason, message = False, "PoolNotFound", f"waiting for GpuPool {pool!r}"
    elif want > 0:
        ready = len(holding) >= want
        reason = "Resident" if ready else "NotResident"
        message = f"{len(holding)}/{want} device(s) of GpuPool {pool!r} hold the group"
    else:
        ready = bool(serving) and unfit is None
        reason = "Served" if ready else "NotServed"
        message = f"{len(serving)} pod server(s) of GpuPool {pool!r} serve the group on demand"
    conds.set("Ready", ready, reason, message)
    blocking = next((p for p in problems if p[0] in ("PoolNotFound", "Refused", "InsufficientMemory")), None)
    if ready:
        conds.set("Progressing", False, "Complete", message)
    elif blocking:
        conds.set("Progressing", False, blocking[0], "blocked until this is resolved")
    else:
        conds.set("Progressing", True, "Loading", f"waiting for the pool's pod servers: {message}")

    return ModelGroupStatus(
        observed_generation=generation,
        replicas=len(live),
        ready_replicas=len(serving),
        selector=pool_selector_string(pool),
        models=",".join(m.id for m in spec.models),
        conditions=conds.conditions(previous.conditions if previous else [], now, generation),
        placements=placements(live, name),
        service=child_names(pool).service,
        pool=pool,
        residency=current_residency(live).get(name, 0),
    )
