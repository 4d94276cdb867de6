"""Pure status computation from observed pods and StatefulSet."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gpufleet.api import labels
from gpufleet.api.modelgroup import ModelGroupSpec, ModelGroupStatus
from gpufleet.api.pod_status import DeviceStatus, PodStatus
from gpufleet.operator.status import compute_status, condition_events, pod_view, status_body, with_leases

pytestmark = pytest.mark.unit

SPEC2 = ModelGroupSpec.model_validate({"replicas": 2, "models": [{"id": "m", "source": "/m"}]})
T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z"


def annotation(name: str, *, ready: bool = True, current: str | None = "alpha", cached: tuple[str, ...] = (),
               failed: tuple[str, ...] = ()) -> str:
    doc = PodStatus(pod=name, namespace="ml", node="gpu-0", ready=ready, groups=["alpha"], timestamp=1.0,
                    devices=[DeviceStatus(device="cuda:0", current_group=current, cached_groups=list(cached),
                                          failed_groups=list(failed))])
    return doc.model_dump_json()


def pod(name: str, *, ready: bool = True, ann: str | None = None, node: str = "gpu-0", **extra: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    status.update(extra.pop("status", {}))
    meta: dict[str, Any] = {"name": name, "annotations": {labels.STATUS_ANNOTATION: ann} if ann else {}}
    meta.update(extra.pop("metadata", {}))
    return {"metadata": meta, "spec": {"nodeName": node}, "status": status}


def sts(
    generation: int = 1, observed: int = 1, current: str = "r1", update: str = "r1", replicas: int = 2
) -> dict[str, Any]:
    return {"metadata": {"generation": generation}, "spec": {"replicas": replicas},
            "status": {"observedGeneration": observed, "currentRevision": current, "updateRevision": update,
                       "updatedReplicas": replicas}}


def conds(status: ModelGroupStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


def test_all_ready() -> None:
    pods = [pod("alpha-0", ann=annotation("alpha-0")), pod("alpha-1", ann=annotation("alpha-1"))]
    st = compute_status("alpha", 4, SPEC2, sts(), pods, None, T0)
    assert (st.replicas, st.ready_replicas, st.observed_generation) == (2, 2, 4)
    assert conds(st) == {"Ready": ("True", "AllReplicasReady"), "Progressing": ("False", "Complete"),
                         "Degraded": ("False", "AsExpected")}
    assert [(p.pod, p.device, p.state) for p in st.placements] == [("alpha-0", "cuda:0", "current"),
                                                                    ("alpha-1", "cuda:0", "current")]
    assert st.selector == "gpufleet.io/component=pod-server,gpufleet.io/model-group=alpha"
    assert all(c.observed_generation == 4 for c in st.conditions)


def test_kube_ready_is_not_enough_without_the_pod_servers_word() -> None:
    pods = [pod("alpha-0", ann=annotation("alpha-0")), pod("alpha-1"),
            pod("alpha-2", ann=annotation("alpha-2", ready=False))]
    st = compute_status("alpha", 1, SPEC2, sts(), pods, None, T0)
    assert st.ready_replicas == 1
    assert conds(st)["Ready"] == ("False", "ReplicasNotReady")


def test_annotation_of_another_pod_is_ignored() -> None:
    view = pod_view(pod("alpha-1", ann=annotation("alpha-0")))
    assert view.server is None
    assert pod_view(pod("alpha-1", ann="{not json")).server is None


def test_cached_placements_and_terminating_pods() -> None:
    pods = [pod("alpha-0", ann=annotation("alpha-0", current="beta", cached=("alpha",))),
            pod("alpha-1", ann=annotation("alpha-1"), metadata={"deletionTimestamp": "2026-01-01T00:00:00Z"})]
    st = compute_status("alpha", 1, SPEC2, sts(), pods, None, T0)
    assert st.replicas == 1
    assert [(p.pod, p.state) for p in st.placements] == [("alpha-0", "cached")]


def test_unschedulable_is_degraded_with_the_schedulers_message() -> None:
    stuck = pod("alpha-1", ready=False, status={"conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."}]})
    st = compute_status("alpha", 1, SPEC2, sts(), [pod("alpha-0", ann=annotation("alpha-0")), stuck], None, T0)
    degraded = next(c for c in st.conditions if c.type == "Degraded")
    assert (degraded.status, degraded.reason) == ("True", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in degraded.message


def test_crashloop_and_load_failures_are_degraded() -> None:
    crash = pod("alpha-0", ready=False, status={"containerStatuses": [
        {"state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}}}]})
    failed = pod("alpha-1", ann=annotation("alpha-1", current=None, failed=("alpha",)))
    st = compute_status("alpha", 1, SPEC2, sts(), [crash, failed], None, T0)
    degraded = next(c for c in st.conditions if c.type == "Degraded")
    assert degraded.reason == "PodFailing"
    assert "LoadFailed" not in degraded.reason and "failed to load on alpha-1/cuda:0" in degraded.message


@pytest.mark.parametrize(
    ("statefulset", "pods", "reason"),
    [
        (None, [], "RollingOut"),
        (sts(generation=2, observed=1), [], "RollingOut"),
        (sts(current="r1", update="r2"), [], "RollingOut"),
        (sts(), [pod("alpha-0")], "ScalingUp"),
        (sts(), [pod(f"alpha-{i}") for i in range(3)], "ScalingDown"),
        (sts(), [pod("alpha-0"), pod("alpha-1")], "Loading"),
    ],
)
def test_progressing_reasons(statefulset: dict[str, Any] | None, pods: list[dict[str, Any]], reason: str) -> None:
    st = compute_status("alpha", 1, SPEC2, statefulset, pods, None, T0)
    assert conds(st)["Progressing"] == ("True", reason)


def test_scaled_to_zero_is_ready() -> None:
    spec = SPEC2.model_copy(update={"replicas": 0})
    assert conds(compute_status("alpha", 1, spec, sts(replicas=0), [], None, T0))["Ready"] == ("True", "ScaledToZero")


def test_transition_time_kept_while_status_unchanged() -> None:
    pods = [pod("alpha-0", ann=annotation("alpha-0"))]
    first = compute_status("alpha", 1, SPEC2, sts(), pods, None, T0)
    again = compute_status("alpha", 1, SPEC2, sts(), pods, first, T1)
    assert [c.last_transition_time for c in again.conditions] == [T0, T0, T0]
    both = [*pods, pod("alpha-1", ann=annotation("alpha-1"))]
    ready = compute_status("alpha", 1, SPEC2, sts(), both, again, T1)
    times = {c.type: c.last_transition_time for c in ready.conditions}
    assert times == {"Ready": T1, "Progressing": T1, "Degraded": T0}


def test_condition_events() -> None:
    one = [pod("alpha-0", ann=annotation("alpha-0"))]
    two = [*one, pod("alpha-1", ann=annotation("alpha-1"))]
    not_ready = compute_status("alpha", 1, SPEC2, sts(), one, None, T0)
    assert condition_events(None, not_ready) == []
    ready = compute_status("alpha", 1, SPEC2, sts(), two, not_ready, T1)
    assert condition_events(not_ready, ready) == [("Normal", "Ready", "2/2 pod servers ready")]
    assert condition_events(ready, ready) == []
    lost = compute_status("alpha", 1, SPEC2, sts(), one, ready, T1)
    assert condition_events(ready, lost) == [("Warning", "NotReady", "1/2 pod servers ready")]


def test_status_body_is_camel_case_json() -> None:
    body = status_body(compute_status("alpha", 1, SPEC2, sts(), [], None, T0))
    json.dumps(body)
    assert {"observedGeneration", "readyReplicas", "conditions", "selector", "service"} <= set(body)
    assert body["conditions"][0]["lastTransitionTime"] == T0


def _lease(name: str, owner_uid: str | None, ann: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "annotations": {labels.STATUS_ANNOTATION: ann}}
    if owner_uid:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": owner_uid}]
    return {"metadata": meta}


def test_status_comes_from_the_pods_own_lease_only() -> None:
    forged = pod("alpha-0", ann=annotation("alpha-0"), metadata={"uid": "u0"})  # on the Pod: not believed
    fresh = pod("alpha-1", metadata={"uid": "u1"})
    stale = pod("alpha-2", metadata={"uid": "u2-new"})
    leases = {"alpha-1": _lease("alpha-1", "u1", annotation("alpha-1")),
              "alpha-2": _lease("alpha-2", "u2-old", annotation("alpha-2"))}  # left by the pod's predecessor
    views = [pod_view(p) for p in with_leases([forged, fresh, stale], leases)]
    assert [v.server is not None for v in views] == [False, True, False]


def test_observed_generation_waits_for_the_statefulset_controller() -> None:
    pods = [pod("alpha-0", ann=annotation("alpha-0")), pod("alpha-1", ann=annotation("alpha-1"))]
    before = compute_status("alpha", 4, SPEC2, sts(), pods, None, T0)
    # Generation 5 applied: the StatefulSet's generation moved on, its controller has not seen it yet.
    lagging = compute_status("alpha", 5, SPEC2, sts(generation=2, observed=1), pods, before, T1)
    assert lagging.observed_generation == 4 and all(c.observed_generation == 4 for c in lagging.conditions)
    caught_up = compute_status("alpha", 5, SPEC2, sts(generation=2, observed=2), pods, lagging, T1)
    assert caught_up.observed_generation == 5 and all(c.observed_generation == 5 for c in caught_up.conditions)
    assert compute_status("alpha", 1, SPEC2, None, [], None, T0).observed_generation is None


def test_a_crashing_pod_server_says_why_in_degraded() -> None:
    """The pod server told DEVICES=cuda:0 on a node without a usable GPU exits with one line;
    the kubelet keeps it as the termination message; the group's Degraded condition shows it."""
    crash = pod("alpha-0", ready=False, status={"containerStatuses": [{
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
        "lastState": {"terminated": {"exitCode": 2, "message":
                      "gpufleet: configuration error: DEVICES: 'cuda:0' is unavailable: this machine has no visible"
                      " CUDA device (is the NVIDIA container runtime set up for this pod?)\n"}}}]})
    st = compute_status("alpha", 1, SPEC2, sts(), [crash], None, T0)
    degraded = next(c for c in st.conditions if c.type == "Degraded")
    assert degraded.reason == "PodFailing" and "last exit: gpufleet: configuration error: DEVICES: 'cuda:0'" in \
        degraded.message
