"""How many pods a pool or a dedicated ModelGroup runs, from demand (pure).

A recommendation each round: the devices the demand asks for at the target load,
``ceil(sequences / targetSequencesPerDevice)``, at least the devices the groups' ``minResident``
floors need, in pods of ``gpus_per_pod``, clamped to ``[minReplicas, maxReplicas]``. Then, as the
HPA stabilises its recommendations:

* **up** to the lowest recommendation of the last ``scaleUpDelaySeconds`` (0: at once);
* **down** to the highest recommendation of the last ``scaleDownDelaySeconds``, and only once
  that much has been watched (a restarted operator does not scale down on its first look);
* **from zero** at once whenever a router holds a request for it (``waiting``), whatever the
  up delay: a client is waiting on it.

In a pool the devices are shared: groups with little demand take turns on a device (the pods
switch them) instead of each holding a pod, which is where a pool beats one replica set per
model. ``gpufleet.autoscale.residency`` decides which groups the devices hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpufleet.api.autoscaling import AutoscalingSpec


@dataclass(frozen=True)
class ReplicaHistory:
    first_seen_s: float | None = None
    recommendations: tuple[tuple[float, int], ...] = ()  # (time, replicas) within the longer delay


@dataclass(frozen=True)
class ReplicaDecision:
    before: int
    after: int
    recommended: int
    sequences: float
    waiting: int
    reason: str
    history: ReplicaHistory

    @property
    def changed(self) -> bool:
        return self.after != self.before


def recommend(sequences: float, floor_devices: int, gpus_per_pod: int, spec: AutoscalingSpec) -> int:
    """Pods for this demand, before stabilisation."""
    devices = max(math.ceil(sequences / spec.target_sequences_per_device - 1e-9), floor_devices, 0)
    pods = math.ceil(devices / max(1, gpus_per_pod))
    return min(max(pods, spec.min_replicas), spec.max_replicas)


def plan_replicas(
    current: int,
    sequences: float,
    waiting: int,
    floor_devices: int,
    gpus_per_pod: int,
    spec: AutoscalingSpec,
    history: ReplicaHistory,
    now: float,
) -> ReplicaDecision:
    """The pod count for this round: ``current`` pods, ``sequences`` in flight and waiting,
    ``waiting`` of them held at routers, ``floor_devices`` owed to ``minResident`` floors and to
    groups the residency rule holds against flapping (``ResidencyPlan.pinned_devices``)."""
    rec = recommend(sequences, floor_devices, gpus_per_pod, spec)
    keep = max(spec.scale_up_delay_seconds, spec.scale_down_delay_seconds)
    first = now if history.first_seen_s is None else history.first_seen_s
    recs = (*[r for r in history.recommendations if r[0] >= now - keep], (now, rec))
    history = ReplicaHistory(first, recs)
    after, reason = current, "steady"
    bounded = min(max(current, spec.min_replicas), spec.max_replicas)
    if bounded != current:
        after, reason = bounded, "bounds"
    if rec > after:
        window = [r for t, r in recs if t >= now - spec.scale_up_delay_seconds]
        up = min(window)
        if after == 0 and waiting > 0:
            after, reason = max(up, 1, rec if spec.scale_up_delay_seconds == 0 else 1), "from zero: a request waits"
        elif up > after:
            after, reason = up, "up"
        else:
            reason = f"up: held for the {spec.scale_up_delay_seconds:g}s scale-up delay"
    elif rec < after:
        window = [r for t, r in recs if t >= now - spec.scale_down_delay_seconds]
        down = max(window)
        if now - first < spec.scale_down_delay_seconds:
            reason = "down: watching demand for the scale-down delay first"
        elif down < after:
            after, reason = down, "down" if down else "down to zero: idle"
        else:
            reason = f"down: demand asked for {down} within {spec.scale_down_delay_seconds:g}s"
    return ReplicaDecision(current, after, rec, sequences, waiting, reason, history)
