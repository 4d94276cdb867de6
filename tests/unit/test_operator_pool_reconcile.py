"""GpuPools and pooled ModelGroups against the in-memory API: the pool's children follow its
bound groups without touching its pods, pooled groups own nothing, statuses say why."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import kopf
import pytest

from gpufleet.api import labels
from gpufleet.api.placement import PoolPlacement
from gpufleet.api.pod_status import DeviceStatus, PodStatus
from gpufleet.operator.builders import BuildOptions
from gpufleet.operator.cache import IndexedReads, slim
from gpufleet.operator.handlers import CHILDREN, Indexes, child_index_id, pool_round, register, resync_forever
from gpufleet.operator.kube import object_path
from gpufleet.operator.reconcile import InvalidSpec, NotOwned, Reconciler, group_path, pool_path
from gpufleet.operator.settings import load_settings
from tests.unit.test_operator_scale import CountingKube

pytestmark = pytest.mark.unit

CM = object_path("v1", "ConfigMap", "ml", "shared-model-groups")
STS = object_path("apps/v1", "StatefulSet", "ml", "shared")
POOL = pool_path("ml", "shared")


def pool_body(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "gpufleet.io/v1alpha1", "kind": "GpuPool",
            "metadata": {"name": "shared", "namespace": "ml", "uid": "pool-uid", "generation": 1},
            "spec": {"replicas": 2, **spec}}


def group_body(name: str, *ids: str, created: str = "2026-01-01T00:00:00Z", **spec: Any) -> dict[str, Any]:
    models = [{"id": i, "source": f"/m/{i}"} for i in ids or (f"{name}-model",)]
    return {"apiVersion": "gpufleet.io/v1alpha1", "kind": "ModelGroup",
            "metadata": {"name": name, "namespace": "ml", "uid": f"{name}-uid", "generation": 1,
                         "creationTimestamp": created},
            "spec": {"models": models, **({"pool": "shared"} | spec)}}


@pytest.fixture
def kube() -> CountingKube:
    fake = CountingKube()
    fake.objects[POOL] = pool_body()
    return fake


def add(kube: CountingKube, body: dict[str, Any]) -> None:
    kube.objects[group_path("ml", body["metadata"]["name"])] = body


def stored(kube: CountingKube, path: str) -> dict[str, Any]:
    obj = kube.objects[path]
    return copy.deepcopy(obj)


def groups_file(kube: CountingKube) -> dict[str, list[str]]:
    doc = json.loads(kube.objects[CM]["data"]["model_groups.json"])
    assert "default_group" not in doc
    return {g: [m["id"] for m in spec["models"]] for g, spec in doc["groups"].items()}


def placement_file(kube: CountingKube) -> PoolPlacement:
    return PoolPlacement.model_validate_json(kube.objects[CM]["data"]["placement.json"])


def conditions(body: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in body["status"]["conditions"]}


def test_a_pool_serves_every_group_bound_to_it(kube: CountingKube) -> None:
    add(kube, group_body("chat", "tiny-chat"))
    add(kube, group_body("beta", "b1", "b2"))
    add(kube, group_body("elsewhere", "e1", pool="other"))
    add(kube, group_body("dedicated", "d1", pool=None))
    result = Reconciler(kube, BuildOptions()).reconcile_pool(stored(kube, POOL), pods=[])
    assert result.blocked is None and result.groups == ["beta", "chat"]
    assert len([r for _, r, _ in result.events if r == "Created"]) == 6
    assert groups_file(kube) == {"beta": ["b1", "b2"], "chat": ["tiny-chat"]}
    status = stored(kube, POOL)["status"]
    assert status["groups"] == "beta,chat" and status["refusedGroups"] == {}
    assert status["selector"] == "gpufleet.io/component=pod-server,gpufleet.io/pool=shared"
    assert {c["type"] for c in status["conditions"]} == {"Ready", "Progressing", "Degraded"}


def test_reconciling_a_pool_again_writes_nothing(kube: CountingKube) -> None:
    add(kube, group_body("chat", minResident=1))
    rec = Reconciler(kube, BuildOptions())
    rec.reconcile_pool(stored(kube, POOL), pods=[])
    kube.writes.clear()
    for _ in range(50):
        assert rec.reconcile_pool(stored(kube, POOL), pods=[]).events == []
    assert kube.writes == []


def test_groups_join_and_leave_through_the_configmap_only(kube: CountingKube) -> None:
    add(kube, group_body("chat", minResident=1))
    rec = Reconciler(kube, BuildOptions())
    rec.reconcile_pool(stored(kube, POOL), pods=[])
    sts = json.dumps(kube.objects[STS], sort_keys=True)
    kube.writes.clear()
    add(kube, group_body("beta", minResident=1))
    rec.reconcile_pool(stored(kube, POOL), pods=[])
    assert groups_file(kube) == {"beta": ["beta-model"], "chat": ["chat-model"]}
    assert ("apply", CM) in kube.writes and ("apply", STS) not in kube.writes
    assert json.dumps(kube.objects[STS], sort_keys=True) == sts  # the pods do not roll
    del kube.objects[group_path("ml", "chat")]  # deleted: gone from the file at the next reconcile
    rec.reconcile_pool(stored(kube, POOL), pods=[])
    assert groups_file(kube) == {"beta": ["beta-model"]}
    assert json.dumps(kube.objects[STS], sort_keys=True) == sts


def test_the_placement_is_stable_and_its_generation_moves_only_on_change(kube: CountingKube) -> None:
    add(kube, group_body("a", minResident=1))
    add(kube, group_body("b", minResident=1))
    rec = Reconciler(kube, BuildOptions())
    rec.reconcile_pool(stored(kube, POOL), pods=[])
    first = placement_file(kube)
    assert first.generation == 1
    assert {p: d.devices["0"].current for p, d in first.pods.items()} == {"shared-0": "a", "shared-1": "b"}
    rec.reconcile_pool(stored(kube, POOL), pods=[])
    assert placement_file(kube) == first
    add(kube, group_body("c", minResident=1))  # a third group on two devices: cached, nothing moves
    rec.reconcile_pool(stored(kube, POOL), pods=[])
    second = placement_file(kube)
    assert second.generation == 2
    assert {p: d.devices["0"].current for p, d in second.pods.items()} == {"shared-0": "a", "shared-1": "b"}
    assert "c" in second.pods["shared-0"].devices["0"].cached
    assert stored(kube, POOL)["status"]["placementGeneration"] == 2
    add(kube, group_body("ondemand"))  # minResident 0: in the file, not in the placement
    rec.reconcile_pool(stored(kube, POOL), pods=[])
    assert placement_file(kube) == second and "ondemand" in groups_file(kube)


def test_invalid_and_conflicting_groups_are_refused_by_name(kube: CountingKube) -> None:
    add(kube, group_body("chat", "tiny-chat"))
    add(kube, group_body("styled", image="mine:1"))  # slipped past an outdated CRD
    add(kube, group_body("dup", "tiny-chat", created="2026-01-02T00:00:00Z"))
    add(kube, group_body("half", "tiny-chat", "own", created="2026-01-02T00:00:00Z"))
    Reconciler(kube, BuildOptions()).reconcile_pool(stored(kube, POOL), pods=[])
    assert groups_file(kube) == {"chat": ["tiny-chat"], "half": ["own"]}  # ids are unique in the file
    refused = stored(kube, POOL)["status"]["refusedGroups"]
    assert set(refused) == {"styled", "dup"}
    assert "spec.image is a pod setting" in refused["styled"] and "GpuPool 'shared'" in refused["styled"]
    assert refused["dup"] == "model id 'tiny-chat' is already served by ModelGroup 'chat'"


def test_the_pools_status_carries_the_pods_refusals(kube: CountingKube) -> None:
    add(kube, group_body("chat", "tiny-chat"))
    add(kube, group_body("big", "huge"))
    doc = PodStatus(pod="shared-0", ready=True, groups=["chat"], models={"tiny-chat": "chat"}, timestamp=1,
                    refused_groups={"big": "models.0.source: no such folder"},
                    devices=[DeviceStatus(device="cuda:0", current_group="chat")])
    pod = {"metadata": {"name": "shared-0", "annotations": {labels.STATUS_ANNOTATION: doc.model_dump_json()}},
           "spec": {"nodeName": "n0"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    Reconciler(kube, BuildOptions()).reconcile_pool(stored(kube, POOL), pods=[pod])
    status = stored(kube, POOL)["status"]
    assert status["refusedGroups"] == {"big": "shared-0: models.0.source: no such folder"}
    assert status["devices"] == [{"pod": "shared-0", "node": "n0", "device": "cuda:0", "current": "chat",
                                  "cached": []}]
    assert status["readyReplicas"] == 1 and status["groups"] == "chat"


def test_hand_edits_of_the_pools_children_are_restored(kube: CountingKube) -> None:
    add(kube, group_body("chat"))
    rec = Reconciler(kube, BuildOptions())
    rec.reconcile_pool(stored(kube, POOL), pods=[])
    kube.edit(CM, {"data": {"model_groups.json": "{}"}})
    kube.edit(STS, {"spec": {"replicas": 9}})
    result = rec.reconcile_pool(stored(kube, POOL), pods=[])
    assert groups_file(kube) == {"chat": ["chat-model"]} and kube.objects[STS]["spec"]["replicas"] == 2
    assert len([r for _, r, _ in result.events if r == "Restored"]) == 2


def test_an_invalid_pool_is_blocked_with_the_reason(kube: CountingKube) -> None:
    kube.objects[POOL]["spec"]["resources"] = {"limits": {"nvidia.com/gpu": 2}}
    result = Reconciler(kube, BuildOptions()).reconcile_pool(stored(kube, POOL), pods=[])
    assert isinstance(result.blocked, InvalidSpec) and STS not in kube.objects
    state = conditions(stored(kube, POOL))
    assert state["Degraded"][:2] == ("True", "InvalidSpec") and "gpusPerPod" in state["Degraded"][2]
    assert state["Ready"][0] == "False"


def test_a_name_taken_by_a_dedicated_group_blocks_the_pool(kube: CountingKube) -> None:
    dedicated = group_body("shared", "s1", pool=None)
    add(kube, dedicated)
    Reconciler(kube, BuildOptions()).reconcile(stored(kube, group_path("ml", "shared")), pods=[])
    result = Reconciler(kube, BuildOptions()).reconcile_pool(stored(kube, POOL), pods=[])
    assert isinstance(result.blocked, NotOwned)
    assert "does not belong to this GpuPool" in str(result.blocked)
    assert conditions(stored(kube, POOL))["Degraded"][1] == "NameConflict"


def test_a_pooled_group_owns_nothing_and_reports_from_the_pools_pods(kube: CountingKube) -> None:
    add(kube, group_body("chat", "tiny-chat"))
    rec = Reconciler(kube, BuildOptions())
    rec.reconcile_pool(stored(kube, POOL), pods=[])
    before = set(kube.objects)
    doc = PodStatus(pod="shared-0", ready=True, groups=["chat"], models={"tiny-chat": "chat"}, timestamp=1,
                    devices=[DeviceStatus(device="cuda:0", current_group="chat")])
    pod = {"metadata": {"name": "shared-0", "annotations": {labels.STATUS_ANNOTATION: doc.model_dump_json()}},
           "spec": {"nodeName": "n0"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    result = rec.reconcile(stored(kube, group_path("ml", "chat")), pods=[pod])
    assert result.blocked is None and set(kube.objects) == before  # no child of its own
    status = stored(kube, group_path("ml", "chat"))["status"]
    assert status["pool"] == "shared" and status["readyReplicas"] == 1 and status["service"] == "shared"
    assert status["placements"] == [{"pod": "shared-0", "node": "n0", "device": "cuda:0", "state": "current"}]
    assert conditions(stored(kube, group_path("ml", "chat")))["Ready"][:2] == ("True", "Served")
    assert ("Normal", "Ready", "1 pod server(s) of GpuPool 'shared' serve the group on demand") in result.events


def test_a_pooled_group_without_its_pool_is_degraded(kube: CountingKube) -> None:
    del kube.objects[POOL]
    add(kube, group_body("chat"))
    result = Reconciler(kube, BuildOptions()).reconcile(stored(kube, group_path("ml", "chat")))
    assert result.blocked is None and result.status is not None
    state = conditions(stored(kube, group_path("ml", "chat")))
    assert state["Degraded"][:2] == ("True", "PoolNotFound") and state["Ready"][:2] == ("False", "PoolNotFound")
    assert ("Warning", "PoolNotFound") in [(t, r) for t, r, _ in result.events]


def test_a_pooled_group_with_a_pod_field_is_an_invalid_spec(kube: CountingKube) -> None:
    add(kube, group_body("chat", replicas=3))
    result = Reconciler(kube, BuildOptions(defaults={"runtimeClassName": "nvidia"})).reconcile(
        stored(kube, group_path("ml", "chat")))
    assert isinstance(result.blocked, InvalidSpec)
    assert "spec.replicas is a pod setting" in str(result.blocked)
    fine = group_body("ok")  # chart defaults are not merged into a pooled group's spec
    add(kube, fine)
    assert Reconciler(kube, BuildOptions(defaults={"runtimeClassName": "nvidia"})).reconcile(
        stored(kube, group_path("ml", "ok"))).blocked is None


# ---- from the watch caches -----------------------------------------------------------------------


def caches(kube: CountingKube) -> IndexedReads:
    """What the kopf indexes would hold (ModelGroups, GpuPools, and children with our labels)."""
    children: dict[tuple[str, str], dict[Any, list[dict[str, Any]]]] = {kind: {} for kind in CHILDREN}
    groups: dict[Any, list[dict[str, Any]]] = {}
    pools: dict[Any, list[dict[str, Any]]] = {}
    for obj in copy.deepcopy(list(kube.objects.values())):
        meta = obj["metadata"]
        if obj["kind"] in ("ModelGroup", "GpuPool"):
            index = groups if obj["kind"] == "ModelGroup" else pools
            index.setdefault(meta["namespace"], []).append(slim(obj))
            index[(meta["namespace"], meta["name"])] = [slim(obj)]
        elif labels.LABEL_MANAGED_BY in (meta.get("labels") or {}):
            children[(obj["apiVersion"], obj["kind"])][(meta["namespace"], meta["name"])] = [slim(obj)]
    return IndexedReads(children, groups, pools)


def test_steady_state_pool_and_pooled_group_rounds_make_no_api_call(kube: CountingKube) -> None:
    add(kube, group_body("chat", minResident=1))
    add(kube, group_body("beta"))
    rec = Reconciler(kube, BuildOptions())
    rec.reconcile_pool(stored(kube, POOL), pods=[])
    for name in ("chat", "beta"):
        rec.reconcile(stored(kube, group_path("ml", name)), pods=[])
    reads = caches(kube)
    kube.reads.clear()
    kube.writes.clear()
    for _ in range(20):
        assert rec.reconcile_pool(reads.pool("ml", "shared") or {}, pods=[], reads=reads).events == []
        rec.refresh_pool_status(reads.pool("ml", "shared") or {}, pods=[], reads=reads)
        for name in ("chat", "beta"):
            assert rec.reconcile(reads.group("ml", name) or {}, pods=[], reads=reads).events == []
    assert kube.calls() == []
    assert reads.pool_keys() == [("ml", "shared", "pool-uid")]


# ---- the handlers' rounds --------------------------------------------------------------------------


def _indexes(kube: CountingKube, pods: list[dict[str, Any]]) -> Indexes:
    """The handlers' indexes: the pool's pods, and their status Leases (the documents are there)."""
    kube.post_event = lambda *args: None  # type: ignore[attr-defined]
    leases, slim_pods = {}, []
    for pod in pods:
        name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
        doc = pod["metadata"]["annotations"][labels.STATUS_ANNOTATION]
        leases[("ml", name)] = [{"metadata": {
            "name": name, "annotations": {labels.STATUS_ANNOTATION: doc},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}]}}]
        slim_pods.append({**pod, "metadata": {"name": name, "uid": uid, "annotations": {}}})
    return Indexes({}, leases, {}, caches(kube), {("ml", "shared"): slim_pods}, {})


def _ready_pod(*groups: str) -> dict[str, Any]:
    doc = PodStatus(pod="shared-0", ready=True, groups=list(groups), timestamp=1,
                    models={f"{g}-model": g for g in groups},
                    devices=[DeviceStatus(device="cuda:0", current_group=groups[0] if groups else None)])
    return {"metadata": {"name": "shared-0", "uid": "pod-uid",
                         "annotations": {labels.STATUS_ANNOTATION: doc.model_dump_json()}},
            "spec": {"nodeName": "n0"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


def test_a_pool_round_reconciles_the_pool_then_its_groups(kube: CountingKube) -> None:
    add(kube, group_body("chat", minResident=1))
    add(kube, group_body("beta"))
    add(kube, group_body("other", pool="elsewhere"))
    rec = Reconciler(kube, BuildOptions())
    result = pool_round(rec, _indexes(kube, [_ready_pod("chat", "beta")]), "ml", "shared")
    assert result is not None and result.groups == ["beta", "chat"]
    assert groups_file(kube) == {"beta": ["beta-model"], "chat": ["chat-model"]}
    chat = conditions(stored(kube, group_path("ml", "chat")))
    assert chat["Ready"][:2] == ("True", "Resident")
    assert conditions(stored(kube, group_path("ml", "beta")))["Ready"][:2] == ("True", "Served")
    assert "status" not in kube.objects[group_path("ml", "other")]  # not this pool's


def test_a_deleted_pool_leaves_its_groups_pool_not_found(kube: CountingKube) -> None:
    add(kube, group_body("chat"))
    rec = Reconciler(kube, BuildOptions())
    pool_round(rec, _indexes(kube, [_ready_pod("chat")]), "ml", "shared")
    del kube.objects[POOL]
    assert pool_round(rec, _indexes(kube, []), "ml", "shared") is None
    assert conditions(stored(kube, group_path("ml", "chat")))["Degraded"][:2] == ("True", "PoolNotFound")


async def test_resync_covers_pools_and_pooled_groups(kube: CountingKube) -> None:
    add(kube, group_body("chat"))
    rec = Reconciler(kube, BuildOptions())
    pool_round(rec, _indexes(kube, []), "ml", "shared")
    indexes = _indexes(kube, [])
    seen: list[str] = []
    pool_step, group_step = rec.reconcile_pool, rec.reconcile

    def pool_recording(body: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        seen.append(f"pool/{body['metadata']['name']}")
        return pool_step(body, *args, **kwargs)

    def group_recording(body: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        seen.append(f"group/{body['metadata']['name']}")
        return group_step(body, *args, **kwargs)

    rec.reconcile_pool = pool_recording  # type: ignore[method-assign]
    rec.reconcile = group_recording  # type: ignore[method-assign]
    now = [0.0]

    async def fake_sleep(seconds: float) -> None:
        now[0] += seconds
        await asyncio.sleep(0)

    kube.reads.clear()
    kube.writes.clear()
    task = asyncio.ensure_future(
        resync_forever(rec, load_settings(resync_seconds=10), indexes, clock=lambda: now[0], sleep=fake_sleep)
    )
    for _ in range(10_000):
        if len(seen) >= 4:
            break
        await asyncio.sleep(0.001)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert sorted(seen[:2]) == ["group/chat", "pool/shared"] and sorted(seen[2:4]) == sorted(seen[:2])
    assert kube.calls() == []  # steady: from the caches, nothing written


def _handlers(rec: Reconciler) -> dict[str, Any]:
    registry = kopf.OperatorRegistry()
    register(registry, rec, load_settings())
    return {h.id: h.fn for reg in (registry._watching, registry._changing) for h in reg.get_all_handlers()}


def _kwargs(indexes: Indexes) -> dict[str, Any]:
    """The index keyword arguments kopf hands every handler."""
    reads = indexes.reads
    out: dict[str, Any] = {"pod_servers": indexes.pod_servers, "status_leases": indexes.status_leases,
                           "pod_groups": indexes.pod_groups, "pool_pods": indexes.pool_pods,
                           "pod_pools": indexes.pod_pools, "model_groups": reads._groups, "gpu_pools": reads._pools}
    out |= {child_index_id(kind): reads._children[(api, kind)] for api, kind in CHILDREN}
    return out


def test_the_kopf_handlers_keep_a_pool_and_its_groups_in_step(kube: CountingKube) -> None:
    rec = Reconciler(kube, BuildOptions())
    handlers = _handlers(rec)
    add(kube, group_body("chat"))
    indexes = _indexes(kube, [_ready_pod("chat")])
    handlers["reconcile-pool"](body=stored(kube, POOL), **_kwargs(indexes))
    assert groups_file(kube) == {"chat": ["chat-model"]}
    assert conditions(stored(kube, group_path("ml", "chat")))["Ready"][:2] == ("True", "Served")
    # A new pooled group: its create handler puts it in the pool's file first.
    add(kube, group_body("beta"))
    handlers["reconcile"](body=stored(kube, group_path("ml", "beta")), **_kwargs(_indexes(kube, [_ready_pod("chat")])))
    assert groups_file(kube) == {"beta": ["beta-model"], "chat": ["chat-model"]}
    assert conditions(stored(kube, group_path("ml", "beta")))["Ready"][:2] == ("False", "NotServed")
    # The pool's pod now lists it: a pod (or Lease) event refreshes the pool and its groups.
    indexes = _indexes(kube, [_ready_pod("chat", "beta")])
    indexes = Indexes({}, indexes.status_leases, {}, indexes.reads, indexes.pool_pods, {("ml", "shared-0"): ["shared"]})
    handlers["status-lease"](namespace="ml", name="shared-0", **_kwargs(indexes))
    assert conditions(stored(kube, group_path("ml", "beta")))["Ready"][:2] == ("True", "Served")
    assert stored(kube, POOL)["status"]["groups"] == "beta,chat"
    # Deleted: gone from the file, the pods untouched.
    gone = stored(kube, group_path("ml", "beta"))
    del kube.objects[group_path("ml", "beta")]
    kube.writes.clear()
    handlers["pooled-group-deleted"](event={"type": "DELETED"}, body=gone, namespace="ml",
                                     **_kwargs(_indexes(kube, [_ready_pod("chat", "beta")])))
    assert groups_file(kube) == {"chat": ["chat-model"]} and ("apply", STS) not in kube.writes
    # The pool deleted: its groups learn it.
    del kube.objects[POOL]
    handlers["pool-deleted"](event={"type": "DELETED"}, namespace="ml", name="shared", **_kwargs(_indexes(kube, [])))
    assert conditions(stored(kube, group_path("ml", "chat")))["Degraded"][:2] == ("True", "PoolNotFound")


def test_an_invalid_pool_is_a_permanent_error_for_kopf(kube: CountingKube) -> None:
    kube.objects[POOL]["spec"]["gpusPerPod"] = 0
    handlers = _handlers(Reconciler(kube, BuildOptions()))
    with pytest.raises(kopf.PermanentError, match="gpusPerPod"):
        handlers["reconcile-pool"](body=stored(kube, POOL), **_kwargs(_indexes(kube, [])))
