"""Pure status computation: the observed StatefulSet and pods in, a ModelGroupStatus out.

A pod server counts as ready when Kubernetes says the pod is Ready *and* the pod server's
own status document (gpufleet.api.pod_status) says it is ready and serves this group.
The document is the stronger signal: it is what the router routes by. It is published in
the status annotation of a Lease named like the pod (gpufleet.pod_server.status_publisher)
and believed only when that Lease's owner reference is the pod's uid; ``with_leases``
attaches it to the pod before anything here reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from gpufleet.api import labels
from gpufleet.api.gpupool import GpuPoolStatus
from gpufleet.api.modelgroup import Condition, ModelGroupSpec, ModelGroupStatus, Placement
from gpufleet.api.pod_status import PodStatus
from gpufleet.operator.builders import child_names, selector_string

# Container waiting reasons that will not fix themselves soon.
FAILING_REASONS = frozenset(
    {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError", "InvalidImageName"}
)


@dataclass(frozen=True)
class PodView:
    """What the status needs to know about one pod server pod."""

    name: str
    node: str | None
    terminating: bool
    pod_ready: bool
    unschedulable: str | None  # the scheduler's message, when it cannot place the pod
    failing: str | None  # "<reason>: <message>" of a container stuck failing
    server: PodStatus | None  # the pod server's status annotation, if present and valid


def lease_owner_uid(lease: dict[str, Any]) -> str | None:
    meta = lease.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == "Pod" and ref.get("apiVersion") == "v1" and ref.get("name") == meta.get("name"):
            return str(ref.get("uid"))
    return None


def with_leases(pods: list[dict[str, Any]], leases: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The pods, each carrying the status annotation of its own Lease (name -> Lease), if
    that Lease is owned by this very pod; a status annotation on the Pod itself is dropped
    (pod servers cannot write pods, so it would come from someone else)."""
    out = []
    for pod in pods:
        meta = dict(pod.get("metadata") or {})
        annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != labels.STATUS_ANNOTATION}
        lease = leases.get(str(meta.get("name")))
        if lease is not None and meta.get("uid") and lease_owner_uid(lease) == meta.get("uid"):
            raw = ((lease.get("metadata") or {}).get("annotations") or {}).get(labels.STATUS_ANNOTATION)
            if raw:
                annotations[labels.STATUS_ANNOTATION] = raw
        meta["annotations"] = annotations
        out.append({**pod, "metadata": meta})
    return out


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


def pod_view(pod: dict[str, Any]) -> PodView:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    ready = _condition(pod, "Ready")
    scheduled = _condition(pod, "PodScheduled")
    unschedulable = None
    if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        unschedulable = str(scheduled.get("message") or "the scheduler cannot place the pod")
    failing = None
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in FAILING_REASONS:
            failing = f"{waiting['reason']}: {waiting.get('message') or ''}".rstrip(": ")
            # Why it last exited, in the pod server's own words (terminationMessagePolicy
            # FallbackToLogsOnError: its last log lines), e.g. "DEVICES: 'cuda:0' is unavailable".
            last = ((cs.get("lastState") or {}).get("terminated") or {}).get("message") or ""
            lines = [line.strip() for line in str(last).splitlines() if line.strip()]
            if lines:
                failing += f"; last exit: {lines[-1][:300]}"
    server = None
    raw = (meta.get("annotations") or {}).get(labels.STATUS_ANNOTATION)
    if raw:
        try:
            doc = PodStatus.model_validate_json(raw)
        except ValidationError:
            doc = None
        # A copied annotation (e.g. from a pod template) describes another pod: ignore it.
        if doc is not None and doc.pod == meta.get("name"):
            server = doc
    return PodView(
        name=str(meta.get("name", "")),
        node=(pod.get("spec") or {}).get("nodeName"),
        terminating=bool(meta.get("deletionTimestamp")),
        pod_ready=bool(ready and ready.get("status") == "True"),
        unschedulable=unschedulable,
        failing=failing,
        server=server,
    )


def serves(view: PodView, group: str) -> bool:
    """Ready in Kubernetes' eyes and in the pod server's own, for this group."""
    return bool(view.pod_ready and view.server and view.server.ready and group in view.server.groups)


def placements(views: list[PodView], group: str) -> list[Placement]:
    out = []
    for v in sorted(views, key=lambda v: v.name):
        if v.server is None or v.terminating:
            continue
        for d in v.server.devices:
            if d.current_group == group:
                out.append(Placement(pod=v.name, node=v.node or v.server.node, device=d.device, state="current"))
            elif group in d.cached_groups:
                out.append(Placement(pod=v.name, node=v.node or v.server.node, device=d.device, state="cached"))
    return out


@dataclass
class Conds:
    """The three conditions being decided: type -> (status, reason, message)."""

    items: dict[str, tuple[str, str, str]] = field(default_factory=dict)

    def set(self, kind: str, status: bool, reason: str, message: str) -> None:
        self.items[kind] = ("True" if status else "False", reason, message)

    def conditions(self, previous: list[Condition], now: str, observed: int | None) -> list[Condition]:
        """As Condition objects; each keeps its transition time while its status does not change."""
        before = {c.type: c for c in previous}
        out = []
        for kind in ("Ready", "Progressing", "Degraded"):
            status, reason, message = self.items[kind]
            old = before.get(kind)
            since = old.last_transition_time if old is not None and old.status == status else now
            out.append(
                Condition.model_validate(
                    {
                        "type": kind,
                        "status": status,
                        "reason": reason,
                        "message": message,
                        "lastTransitionTime": since,
                        "observedGeneration": observed,
                    }
                )
            )
        return out


def pod_problems(live: list[PodView]) -> list[tuple[str, str]]:
    """(reason, message) of what keeps pods from running: unschedulable, failing."""
    problems: list[tuple[str, str]] = []
    unschedulable = [v for v in live if v.unschedulable]
    if unschedulable:
        v = unschedulable[0]
        message = f"{len(unschedulable)} pod(s) cannot be scheduled; {v.name}: {v.unschedulable}"
        problems.append(("Unschedulable", message))
    failing = [v for v in live if v.failing]
    if failing:
        problems.append(("PodFailing", f"{len(failing)} pod(s) failing; {failing[0].name}: {failing[0].failing}"))
    return problems


def pods_progress(statefulset: dict[str, Any] | None, live: list[PodView], desired: int) -> tuple[str, str] | None:
    """(reason, message) while the pods are being rolled out or scaled; None once they are in place."""
    rollout = _rollout(statefulset, desired)
    if rollout:
        return ("RollingOut", rollout)
    if len(live) < desired:
        return ("ScalingUp", f"{len(live)}/{desired} pods exist")
    if len(live) > desired:
        return ("ScalingDown", f"{len(live)} pods exist, {desired} desired")
    return None


def observed_generation(
    generation: int | None, statefulset: dict[str, Any] | None, previous: int | None
) -> int | None:
    """The status speaks for a generation only once the StatefulSet controller has seen the
    StatefulSet we made from it: until then `kubectl wait` must not take an older
    generation's Ready for this one."""
    return generation if _statefulset_caught_up(statefulset) else previous


def _rollout(sts: dict[str, Any] | None, desired: int) -> str | None:
    """Why the StatefulSet is still rolling out, or None when it is done."""
    if sts is None:
        return "creating the StatefulSet"
    meta, spec, st = sts.get("metadata") or {}, sts.get("spec") or {}, sts.get("status") or {}
    if st.get("observedGeneration", 0) < meta.get("generation", 0):
        return "the StatefulSet controller has not seen the latest spec yet"
    replicas = int(spec.get("replicas", desired))
    if st.get("updateRevision") and st.get("currentRevision") != st.get("updateRevision"):
        return f"rolling update: {st.get('updatedReplicas', 0)}/{replicas} pods updated"
    return None


def _statefulset_caught_up(sts: dict[str, Any] | None) -> bool:
    if sts is None:
        return False
    return int((sts.get("status") or {}).get("observedGeneration", 0)) >= int(
        (sts.get("metadata") or {}).get("generation", 0)
    )


def set_ready_by_replicas(conds: Conds, ready: int, desired: int) -> None:
    """Ready when every desired pod server is (a dedicated group's, or a pool's); zero replicas is ready."""
    if desired == 0:
        conds.set("Ready", True, "ScaledToZero", "replicas is 0")
    elif ready >= desired:
        conds.set("Ready", True, "AllReplicasReady", f"{ready}/{desired} pod servers ready")
    else:
        conds.set("Ready", False, "ReplicasNotReady", f"{ready}/{desired} pod servers ready")


def compute_status(
    name: str,
    generation: int | None,
    spec: ModelGroupSpec,
    statefulset: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    previous: ModelGroupStatus | None,
    now: str,
    conflict: str | None = None,
) -> ModelGroupStatus:
    """The ModelGroup's status from what is observed; conditions keep their transition time
    while their status does not change."""
    views = [pod_view(p) for p in pods]
    live = [v for v in views if not v.terminating]
    ready = [v for v in live if serves(v, name)]
    desired = spec.replicas
    conds = Conds()

    problems: list[tuple[str, str]] = []
    if conflict:  # some model ids are served by an earlier ModelGroup (gpufleet.operator.conflicts)
        problems.append(("ModelIdConflict", conflict))
    problems.extend(pod_problems(live))
    load_failed = sorted(
        f"{v.name}/{d.device}" for v in live if v.server for d in v.server.devices if name in d.failed_groups
    )
    if load_failed:
        problems.append(("LoadFailed", f"the group failed to load on {', '.join(load_failed)}"))
    if problems:
        conds.set("Degraded", True, problems[0][0], "; ".join(m for _, m in problems))
    else:
        conds.set("Degraded", False, "AsExpected", "")

    progress = pods_progress(statefulset, live, desired)
    if progress:
        conds.set("Progressing", True, *progress)
    elif len(ready) < desired:
        conds.set("Progressing", True, "Loading", f"{len(ready)}/{desired} pod servers have the group loaded")
    else:
        conds.set("Progressing", False, "Complete", f"{desired} pod server(s) up to date")

    set_ready_by_replicas(conds, len(ready), desired)

    observed = observed_generation(generation, statefulset, previous.observed_generation if previous else None)
    conditions = conds.conditions(previous.conditions if previous else [], now, observed)
    return ModelGroupStatus(
        observed_generation=observed,
        replicas=len(live),
        ready_replicas=len(ready),
        selector=selector_string(name),
        models=",".join(m.id for m in spec.models),
        conditions=conditions,
        placements=placements(live, name),
        service=child_names(name).service,
    )


def condition_events(
    previous: ModelGroupStatus | GpuPoolStatus | None, new: ModelGroupStatus | GpuPoolStatus
) -> list[tuple[str, str, str]]:
    """Events worth showing users for condition changes: (type, reason, message)."""
    old = {c.type: c for c in (previous.conditions if previous else [])}
    out = []
    for c in new.conditions:
        before = old.get(c.type)
        if before is not None and (before.status, before.reason) == (c.status, c.reason):
            continue
        if c.type == "Ready" and c.status == "True":
            out.append(("Normal", "Ready", c.message))
        elif c.type == "Ready" and before is not None and before.status == "True":
            out.append(("Warning", "NotReady", c.message))
        elif c.type == "Degraded" and c.status == "True":
            out.append(("Warning", c.reason, c.message))
        elif c.type == "Degraded" and before is not None and before.status == "True":
            out.append(("Normal", "Recovered", f"no longer degraded (was: {before.reason})"))
    return out


def status_body(status: ModelGroupStatus | GpuPoolStatus) -> dict[str, Any]:
    """The JSON for the status subresource."""
    body: dict[str, Any] = status.model_dump(by_alias=True, mode="json", exclude_none=True)
    return body
