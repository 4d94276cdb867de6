"""One scaling round of one pool or dedicated ModelGroup, from demand (pure glue).

Turns what the operator observes (the specs, the pods' status documents, the routers' merged
demand) into the inputs of ``gpufleet.autoscale``'s rules, and their outputs into what the
reconciler writes: the pool's placement floor (desired residency per group) and the
StatefulSet's replicas. The I/O (fetching demand, the timer, writing) is ``scaler``'s.

The operator decides, not the router: it already writes both the placement and the
StatefulSets, sees every pod's status (switch costs, what each device holds) and every
router's demand, and is elected one at a time, so one writer holds the rules' state. A router
holds only its own share of the demand and runs as several replicas.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gpufleet.api.autoscaling import AutoscalingSpec
from gpufleet.api.demand import GroupDemand
from gpufleet.api.gpupool import GpuPoolSpec
from gpufleet.autoscale.replicas import ReplicaDecision, ReplicaHistory, plan_replicas
from gpufleet.autoscale.residency import GroupLoad, ResidencyPlan, ResidencySettings, ResidencyState, plan_residency
from gpufleet.operator.builders import BoundGroup
from gpufleet.operator.pool_status import current_residency
from gpufleet.operator.status import PodView

DEFAULT_SWITCH_S = 1.0  # before any pod has measured a switch
DEFAULT_SERVICE_S = 1.0  # before any router has learned a service time


@dataclass(frozen=True)
class PoolRound:
    residency: ResidencyPlan
    replicas: ReplicaDecision | None  # None: spec.autoscaling unset (spec.replicas decides)
    current: dict[str, int]  # devices holding each group current now
    demand: dict[str, float]  # sequences per group


@dataclass
class ScaleMemory:
    """What the rules carry from one round to the next, for one object."""

    residency: ResidencyState = field(default_factory=ResidencyState)
    replicas: ReplicaHistory = field(default_factory=ReplicaHistory)


def switch_seconds(views: Sequence[PodView]) -> float:
    """The pool's switch cost: the mean of what its devices measured (from the host cache when
    known, where most switches come from, else from disk)."""
    seen: list[float] = []
    for v in views:
        if v.server is None:
            continue
        for d in v.server.devices:
            s = d.switch_seconds_from_cache if d.switch_seconds_from_cache is not None else d.switch_seconds_from_disk
            if s is not None:
                seen.append(s)
    return sum(seen) / len(seen) if seen else DEFAULT_SWITCH_S


def group_demand(demand: Mapping[str, GroupDemand], namespace: str, group: str) -> GroupDemand | None:
    return demand.get(f"{namespace}/{group}")


def plan_pool(
    namespace: str,
    spec: GpuPoolSpec,
    replicas_now: int,
    groups: Sequence[BoundGroup],
    views: Sequence[PodView],
    demand: Mapping[str, GroupDemand],
    memory: ScaleMemory,
    now: float,
) -> PoolRound:
    """The pool's residency plan (on the devices it has now) and, with ``spec.autoscaling``,
    its pod count. ``memory`` is updated in place with the rules' new state."""
    autoscaling = spec.autoscaling or AutoscalingSpec()
    switch_s = switch_seconds(views)
    current = current_residency(views)
    devices = replicas_now * spec.gpus_per_pod
    loads: list[GroupLoad] = []
    sequences: dict[str, float] = {}
    waiting = 0
    for g in groups:
        d = group_demand(demand, namespace, g.name)
        seqs = float(d.in_flight + d.waiting) if d else 0.0
        waiting += d.waiting if d else 0
        sequences[g.name] = seqs
        loads.append(
            GroupLoad(
                name=g.name,
                demand=seqs,
                resident=current.get(g.name, 0),
                service_s=(d.service_seconds if d and d.service_seconds else DEFAULT_SERVICE_S),
                min_resident=g.spec.min_resident,
                max_resident=g.spec.max_resident,
                priority=g.spec.priority,
            )
        )
    settings = ResidencySettings(
        target_sequences_per_device=autoscaling.target_sequences_per_device,
        release_delay_s=spec.switch.release_delay_seconds,
        min_residency_s=spec.switch.min_residency_seconds,
        swaps_per_device_per_minute=spec.switch.swaps_per_device_per_minute,
    )
    plan = plan_residency(loads, devices, switch_s, settings, memory.residency, now)
    memory.residency = plan.state
    decision = None
    if spec.autoscaling is not None:
        floor = max(max((g.spec.min_resident for g in groups), default=0), plan.pinned_devices)
        decision = plan_replicas(
            replicas_now, sum(sequences.values()), waiting, floor, spec.gpus_per_pod, spec.autoscaling,
            memory.replicas, now,
        )
        memory.replicas = decision.history
    return PoolRound(plan, decision, current, sequences)


def plan_group(
    namespace: str,
    name: str,
    autoscaling: AutoscalingSpec,
    gpus_per_pod: int,
    replicas_now: int,
    demand: Mapping[str, GroupDemand],
    memory: ScaleMemory,
    now: float,
) -> ReplicaDecision:
    """A dedicated ModelGroup's pod count: the same rule, every device serving the one group."""
    d = group_demand(demand, namespace, name)
    sequences = float(d.in_flight + d.waiting) if d else 0.0
    decision = plan_replicas(
        replicas_now, sequences, d.waiting if d else 0, 0, gpus_per_pod, autoscaling, memory.replicas, now
    )
    memory.replicas = decision.history
    return decision
