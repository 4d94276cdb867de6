"""Status of a GpuPool and of its pooled ModelGroups, from the pool pods' status documents (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from gpufleet.api import labels
from gpufleet.api.gpupool import GpuPoolSpec, GpuPoolStatus
from gpufleet.api.modelgroup import ModelGroupSpec, ModelGroupStatus
from gpufleet.api.pod_status import DeviceStatus, PodStatus
from gpufleet.operator.pool_status import compute_pool_status, compute_pooled_status, observed_placement
from gpufleet.operator.status import pod_view

pytestmark = pytest.mark.unit

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z"
POOL = GpuPoolSpec.model_validate({"replicas": 2})
MODELS = {"chat": ["tiny-chat"], "beta": ["b1", "b2"], "big": ["huge"]}
NEED = "model group 'big' needs 90000000000 bytes (90.000 GB) on cuda:0, which has 80000000000 bytes (80.000 GB)"


def device(current: str | None = None, cached: tuple[str, ...] = (), *, failed: tuple[str, ...] = (),
           unfit: dict[str, str] | None = None, switching: str | None = None, name: str = "cuda:0") -> DeviceStatus:
    return DeviceStatus(device=name, current_group=current, cached_groups=list(cached), failed_groups=list(failed),
                        insufficient_memory_groups=unfit or {}, switching_to=switching)


def pod(name: str, *devices: DeviceStatus, ready: bool = True, groups: tuple[str, ...] = ("chat", "beta", "big"),
        refused: dict[str, str] | None = None, kube_ready: bool = True, models: dict[str, str] | None = None,
        **doc: Any) -> dict[str, Any]:
    served = {m: g for g in groups for m in MODELS.get(g, [g])} if models is None else models
    status = PodStatus(pod=name, namespace="ml", node="gpu-" + name[-1], ready=ready, groups=list(groups),
                       models=served, timestamp=1.0, devices=list(devices) or [device()],
                       refused_groups=refused or {}, **doc)
    return {"metadata": {"name": name, "annotations": {labels.STATUS_ANNOTATION: status.model_dump_json()}},
            "spec": {"nodeName": "gpu-" + name[-1]},
            "status": {"conditions": [{"type": "Ready", "status": "True" if kube_ready else "False"}]}}


def sts(replicas: int = 2) -> dict[str, Any]:
    return {"metadata": {"generation": 1}, "spec": {"replicas": replicas},
            "status": {"observedGeneration": 1, "currentRevision": "r", "updateRevision": "r"}}


def conds(status: ModelGroupStatus | GpuPoolStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


def message(status: ModelGroupStatus | GpuPoolStatus, kind: str) -> str:
    return next(c.message for c in status.conditions if c.type == kind)


def group(name: str = "chat", **spec: Any) -> ModelGroupSpec:
    models = [{"id": i, "source": f"/m/{i}"} for i in MODELS[name]]
    return ModelGroupSpec.model_validate({"pool": "shared", "models": models, **spec})


def pooled(name: str, pods: list[dict[str, Any]], previous: ModelGroupStatus | None = None, **kwargs: Any
           ) -> ModelGroupStatus:
    spec = kwargs.pop("spec", None) or group(name)
    return compute_pooled_status(name, 5, spec, "shared", kwargs.pop("pool_spec", POOL), pods, previous, T0, **kwargs)


# ---- the pool ----------------------------------------------------------------------------------


def test_pool_ready_with_every_devices_residency() -> None:
    pods = [pod("shared-0", device("chat", ("beta",))), pod("shared-1", device(None, switching="beta"))]
    st = compute_pool_status("shared", 3, POOL, sts(), pods, None, T0, served=["beta", "big", "chat"],
                             placement_generation=4)
    assert (st.replicas, st.ready_replicas, st.observed_generation, st.placement_generation) == (2, 2, 3, 4)
    assert conds(st) == {"Ready": ("True", "AllReplicasReady"), "Progressing": ("False", "Complete"),
                         "Degraded": ("False", "AsExpected")}
    assert [(d.pod, d.node, d.device, d.current, d.switching_to, d.cached) for d in st.devices] == [
        ("shared-0", "gpu-0", "cuda:0", "chat", None, ["beta"]),
        ("shared-1", "gpu-1", "cuda:0", None, "beta", []),
    ]
    assert st.selector == "gpufleet.io/component=pod-server,gpufleet.io/pool=shared"
    assert st.groups == "beta,big,chat" and st.refused_groups == {}


def test_pool_refused_groups_from_the_operator_the_pods_and_memory() -> None:
    unfit = {"big": NEED}
    pods = [pod("shared-0", device("chat", unfit=unfit), refused={"beta": "source '/m/b1' does not exist"}),
            pod("shared-1", device(None, unfit=unfit))]
    st = compute_pool_status("shared", 1, POOL, sts(), pods, None, T0, served=["beta", "big", "chat"],
                             refused={"late": "model id 'tiny-chat' is already served by ModelGroup 'chat'"})
    assert st.refused_groups == {
        "beta": "shared-0: source '/m/b1' does not exist",
        "big": f"fits none of the pool's 2 device(s); {NEED}",
        "late": "model id 'tiny-chat' is already served by ModelGroup 'chat'",
    }
    assert st.groups == "chat"


def test_a_group_that_fits_some_device_is_not_refused() -> None:
    pods = [pod("shared-0", device(unfit={"big": NEED})), pod("shared-1", device())]
    st = compute_pool_status("shared", 1, POOL, sts(), pods, None, T0, served=["big"])
    assert st.refused_groups == {}


@pytest.mark.parametrize(
    ("pods", "kwargs", "expected"),
    [
        ([pod("shared-0")], {}, ("ScalingUp", "Ready", "False")),
        ([pod("shared-0"), pod("shared-1", kube_ready=False)], {}, ("Starting", "Ready", "False")),
        ([pod("shared-0", groups_hash="old"), pod("shared-1", groups_hash="new")], {"groups_hash": "new"},
         ("ApplyingGroups", "Ready", "True")),
        ([pod("shared-0", placement_generation=2), pod("shared-1", placement_generation=3)],
         {"placement_generation": 3}, ("ApplyingGroups", "Ready", "True")),
        ([pod("shared-0", groups_hash="new", placement_generation=3), pod("shared-1")],
         {"groups_hash": "new", "placement_generation": 3}, ("Complete", "Ready", "True")),
    ],
)
def test_pool_progressing(pods: list[dict[str, Any]], kwargs: dict[str, Any], expected: tuple[str, str, str]) -> None:
    st = compute_pool_status("shared", 1, POOL, sts(), pods, None, T0, **kwargs)
    reason, kind, ready = expected
    assert next(c.reason for c in st.conditions if c.type == "Progressing") == reason
    assert conds(st)[kind][0] == ready


def test_pool_config_error_is_degraded() -> None:
    pods = [pod("shared-0", config_error="MODEL_GROUPS: /etc/gpufleet/model_groups.json is not valid JSON"),
            pod("shared-1")]
    st = compute_pool_status("shared", 1, POOL, sts(), pods, None, T0)
    assert conds(st)["Degraded"] == ("True", "ConfigError")
    assert "keep their previous files; shared-0: MODEL_GROUPS" in message(st, "Degraded")


def test_observed_placement_names_devices_by_index() -> None:
    views = [pod_view(pod("shared-0", device("chat", ("beta",)), device(None, name="cuda:1")))]
    observed = observed_placement(views)
    assert observed.for_device("shared-0", 0).current == "chat"
    assert observed.for_device("shared-0", 0).cached == ("beta",)
    assert observed.for_device("shared-0", 1).current is None


# ---- a pooled group ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "spec", "pods", "ready", "reason"),
    [
        # minResident 0: served on demand by any ready pool pod that lists it.
        ("chat", {}, [pod("shared-0"), pod("shared-1")], True, "Served"),
        ("chat", {}, [pod("shared-0", groups=("beta",))], False, "NotServed"),
        ("chat", {}, [pod("shared-0", ready=False)], False, "NotServed"),
        # minResident: that many devices hold it, current or cached.
        ("chat", {"minResident": 2}, [pod("shared-0", device("chat")), pod("shared-1", device("beta", ("chat",)))],
         True, "Resident"),
        ("chat", {"minResident": 2}, [pod("shared-0", device("chat")), pod("shared-1", device("beta"))],
         False, "NotResident"),
        # A pod listing the group with older models (before the kubelet refreshed its files) does not count.
        ("chat", {}, [pod("shared-0", models={"old-id": "chat"})], False, "NotServed"),
    ],
)
def test_pooled_ready(name: str, spec: dict[str, Any], pods: list[dict[str, Any]], ready: bool, reason: str) -> None:
    st = pooled(name, pods, spec=group(name, **spec))
    assert conds(st)["Ready"] == ("True" if ready else "False", reason)
    assert st.pool == "shared" and st.service == "shared"
    assert st.selector == "gpufleet.io/component=pod-server,gpufleet.io/pool=shared"


def test_pooled_replicas_and_placements() -> None:
    pods = [pod("shared-0", device("chat", ("beta",))), pod("shared-1", device("beta")),
            pod("shared-2", groups=("beta",))]
    st = pooled("chat", pods)
    assert (st.replicas, st.ready_replicas) == (3, 2)  # pool pods; those serving chat
    assert [(p.pod, p.node, p.device, p.state) for p in st.placements] == [("shared-0", "gpu-0", "cuda:0", "current")]
    beta = pooled("beta", pods)
    assert [(p.pod, p.state) for p in beta.placements] == [("shared-0", "cached"), ("shared-1", "current")]
    assert beta.models == "b1,b2" and beta.observed_generation == 5


def test_insufficient_memory_on_every_device_is_degraded_with_the_pods_message() -> None:
    unfit = {"big": NEED}
    pods = [pod("shared-0", device("chat", unfit=unfit)), pod("shared-1", device(unfit=unfit))]
    st = pooled("big", pods)
    assert conds(st) == {"Ready": ("False", "NotServed"), "Progressing": ("False", "InsufficientMemory"),
                         "Degraded": ("True", "InsufficientMemory")}
    assert "90000000000 bytes" in message(st, "Degraded") and "80000000000 bytes" in message(st, "Degraded")
    some = pooled("big", [pod("shared-0", device(unfit=unfit)), pod("shared-1", device())])
    assert conds(some)["Ready"] == ("True", "Served") and conds(some)["Degraded"][0] == "False"


def test_a_group_the_pods_refuse_is_degraded_with_their_reason() -> None:
    pods = [pod("shared-0", groups=("chat",), refused={"beta": "models.0.source: not found"})]
    st = pooled("beta", pods)
    assert conds(st)["Degraded"] == ("True", "Refused")
    assert message(st, "Degraded") == "shared-0: models.0.source: not found"
    assert conds(st)["Ready"][0] == "False"


def test_a_missing_pool_is_degraded_and_not_ready() -> None:
    st = pooled("chat", [], pool_found=False, pool_spec=None)
    assert conds(st) == {"Ready": ("False", "PoolNotFound"), "Progressing": ("False", "PoolNotFound"),
                         "Degraded": ("True", "PoolNotFound")}
    assert "GpuPool 'shared' does not exist" in message(st, "Degraded")
    assert st.replicas == 0 and st.placements == []


def test_min_resident_beyond_the_pool_and_load_failures() -> None:
    st = pooled("chat", [pod("shared-0", device(failed=("chat",)))], spec=group("chat", minResident=3))
    assert conds(st)["Degraded"] == ("True", "MinResidentTooHigh")
    assert "minResident 3 exceeds the 2 device(s)" in message(st, "Degraded")
    assert "failed to load on shared-0/cuda:0" in message(st, "Degraded")
    # Unfit devices list the group as failed too: that is InsufficientMemory, not LoadFailed.
    unfit = pooled("big", [pod("shared-0", device(failed=("big",), unfit={"big": NEED}))])
    assert "failed to load" not in message(unfit, "Degraded")


def test_pooled_conditions_keep_transition_times_and_conflicts_show() -> None:
    first = pooled("chat", [pod("shared-0")])
    later = compute_pooled_status("chat", 5, group("chat"), "shared", POOL, [pod("shared-0")], first, T1,
                                  conflict="model id 'x' is already served by ModelGroup 'a'")
    times = {c.type: c.last_transition_time for c in later.conditions}
    assert times == {"Ready": T0, "Progressing": T0, "Degraded": T1}
    assert conds(later)["Degraded"] == ("True", "ModelIdConflict") and conds(later)["Ready"][0] == "True"
