"""The reconciler against an in-memory API: idempotent, restores drift, reports what it did."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from gpufleet.api import labels
from gpufleet.operator.builders import BuildOptions
from gpufleet.operator.kube import manifest_path, object_path
from gpufleet.operator.reconcile import InvalidSpec, NotOwned, Reconciler, group_path

pytestmark = pytest.mark.unit


def _merge(into: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


class FakeKube:
    """Just enough of the API server: objects by path, applies that bump resourceVersion
    only when something changes (like the real one), and a write log."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.writes: list[tuple[str, str]] = []
        self.rv = 0
        self.reject: str | None = None  # kind whose apply gets HTTP 422

    def _bump(self, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    def get(self, path: str) -> dict[str, Any] | None:
        obj = self.objects.get(path)
        return copy.deepcopy(obj) if obj else None

    def list(self, path: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        if label_selector:  # pods and Leases: none in these tests
            return []
        return [copy.deepcopy(o) for p, o in self.objects.items() if p.rpartition("/")[0] == path]

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        if manifest["kind"] == self.reject:
            raise ApiException(status=422, reason="Invalid", body='{"message": "bad affinity"}')
        path = manifest_path(manifest)
        current = self.objects.get(path)
        merged = copy.deepcopy(current) if current else {}
        _merge(merged, manifest)
        if merged != current:
            if current is None:
                merged["metadata"]["uid"] = f"uid-{len(self.objects)}"
            self._bump(merged)
            self.objects[path] = merged
            self.writes.append(("apply", path))
        return copy.deepcopy(self.objects[path])

    def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        obj = self.objects[path.removesuffix("/status")]
        _merge(obj, patch)
        self._bump(obj)
        self.writes.append(("patch", path))
        return copy.deepcopy(obj)

    def edit(self, path: str, change: dict[str, Any]) -> None:
        _merge(self.objects[path], change)
        self._bump(self.objects[path])


def group(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "gpufleet.io/v1alpha1",
        "kind": "ModelGroup",
        "metadata": {"name": "alpha", "namespace": "ml", "uid": "mg-uid", "generation": 1},
        "spec": {"models": [{"id": "m", "source": "/m"}], **spec},
    }


@pytest.fixture
def kube() -> FakeKube:
    fake = FakeKube()
    body = group()
    fake.objects[group_path("ml", "alpha")] = body
    return fake


def current(kube: FakeKube) -> dict[str, Any]:
    obj = kube.get(group_path("ml", "alpha"))
    assert obj is not None
    return obj


STS = object_path("apps/v1", "StatefulSet", "ml", "alpha")
CM = object_path("v1", "ConfigMap", "ml", "alpha-model-groups")


def test_first_reconcile_creates_every_child_and_a_status(kube: FakeKube) -> None:
    result = Reconciler(kube, BuildOptions()).reconcile(current(kube), pods=[])
    kinds = [r for t, r, _ in result.events if r == "Created"]
    assert len(kinds) == 6  # ServiceAccount, RoleBinding, ConfigMap, Service, PodDisruptionBudget, StatefulSet
    assert {STS, CM} <= set(kube.objects)
    status = current(kube)["status"]
    assert status["readyReplicas"] == 0
    assert {c["type"] for c in status["conditions"]} == {"Ready", "Progressing", "Degraded"}


def test_reconciling_again_writes_nothing(kube: FakeKube) -> None:
    rec = Reconciler(kube, BuildOptions())
    rec.reconcile(current(kube), pods=[])
    kube.writes.clear()
    for _ in range(100):
        result = rec.reconcile(current(kube), pods=[])
        assert result.events == []
    assert kube.writes == []


def test_hand_edit_is_restored_and_reported(kube: FakeKube) -> None:
    rec = Reconciler(kube, BuildOptions())
    rec.reconcile(current(kube), pods=[])
    kube.edit(STS, {"spec": {"replicas": 7}})
    kube.edit(CM, {"data": {"model_groups.json": "{}"}})
    result = rec.reconcile(current(kube), pods=[])
    assert kube.objects[STS]["spec"]["replicas"] == 1
    assert '"alpha"' in kube.objects[CM]["data"]["model_groups.json"]
    restored = [m for _, r, m in result.events if r == "Restored"]
    assert len(restored) == 2 and ".spec.replicas" in " ".join(restored)


def test_deleted_child_is_recreated(kube: FakeKube) -> None:
    rec = Reconciler(kube, BuildOptions())
    rec.reconcile(current(kube), pods=[])
    del kube.objects[STS]
    result = rec.reconcile(current(kube), pods=[])
    assert STS in kube.objects
    assert ("Normal", "Created", "created StatefulSet alpha") in result.events


def test_spec_change_is_an_update(kube: FakeKube) -> None:
    rec = Reconciler(kube, BuildOptions())
    rec.reconcile(current(kube), pods=[])
    kube.objects[group_path("ml", "alpha")]["spec"]["replicas"] = 3
    result = rec.reconcile(current(kube), pods=[])
    assert kube.objects[STS]["spec"]["replicas"] == 3
    assert ("Normal", "Updated", "updated StatefulSet alpha to the current spec") in result.events


def test_invalid_spec_is_recorded_then_blocked(kube: FakeKube) -> None:
    kube.objects[group_path("ml", "alpha")]["spec"]["models"] = [{"id": "m", "source": "/m"}] * 2
    result = Reconciler(kube, BuildOptions()).reconcile(current(kube), pods=[])
    assert isinstance(result.blocked, InvalidSpec)
    conditions = {c["type"]: c for c in current(kube)["status"]["conditions"]}
    assert conditions["Degraded"]["reason"] == "InvalidSpec"
    assert "duplicate model ids" in conditions["Degraded"]["message"]
    assert conditions["Ready"]["status"] == "False"
    assert ("Warning", "InvalidSpec") in [(t, r) for t, r, _ in result.events]
    assert STS not in kube.objects


def test_api_rejection_of_a_child_is_an_invalid_spec(kube: FakeKube) -> None:
    kube.reject = "StatefulSet"
    result = Reconciler(kube, BuildOptions()).reconcile(current(kube), pods=[])
    assert isinstance(result.blocked, InvalidSpec)
    assert "StatefulSet rejected: bad affinity" in str(result.blocked)


def test_a_name_taken_by_someone_else_is_not_touched(kube: FakeKube) -> None:
    kube.objects[CM] = {"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "alpha-model-groups", "namespace": "ml", "resourceVersion": "1"},
                        "data": {"theirs": "yes"}}
    result = Reconciler(kube, BuildOptions()).reconcile(current(kube), pods=[])
    assert isinstance(result.blocked, NotOwned)
    assert kube.objects[CM]["data"] == {"theirs": "yes"}
    degraded = next(c for c in current(kube)["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "NameConflict"


def test_status_follows_pods_without_touching_children(kube: FakeKube) -> None:
    rec = Reconciler(kube, BuildOptions())
    rec.reconcile(current(kube), pods=[])
    kube.writes.clear()
    ann = ('{"pod": "alpha-0", "ready": true, "groups": ["alpha"], "timestamp": 1,'
           ' "devices": [{"device": "cuda:0", "current_group": "alpha"}]}')
    pod = {"metadata": {"name": "alpha-0", "annotations": {labels.STATUS_ANNOTATION: ann}},
           "spec": {"nodeName": "gpu-0"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    kube.objects[STS]["status"] = {"observedGeneration": 1, "currentRevision": "a", "updateRevision": "a"}
    kube.objects[STS]["metadata"]["generation"] = 1
    result = rec.refresh_status(current(kube), pods=[pod])
    assert [w[0] for w in kube.writes] == ["patch"]
    status = current(kube)["status"]
    assert status["readyReplicas"] == 1
    assert status["placements"] == [{"pod": "alpha-0", "node": "gpu-0", "device": "cuda:0", "state": "current"}]
    assert ("Normal", "Ready", "1/1 pod servers ready") in result.events


def test_a_model_id_claimed_twice_in_a_namespace_degrades_the_later_group(kube: FakeKube) -> None:
    first = current(kube)
    first["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    kube.objects[group_path("ml", "alpha")] = first
    later = group(models=[{"id": "m", "source": "/other"}, {"id": "n", "source": "/n"}])
    later["metadata"].update({"name": "beta", "uid": "beta-uid", "creationTimestamp": "2026-01-02T00:00:00Z"})
    kube.objects[group_path("ml", "beta")] = copy.deepcopy(later)
    result = Reconciler(kube, BuildOptions()).reconcile(later, pods=[])
    assert result.blocked is None and result.status is not None
    degraded = next(c for c in result.status.conditions if c.type == "Degraded")
    assert (degraded.status, degraded.reason) == ("True", "ModelIdConflict")
    assert "model id 'm' is already served by ModelGroup 'alpha'" in degraded.message
    assert ("Warning", "ModelIdConflict", degraded.message) in result.events
    # beta serves only its other model; alpha keeps 'm' and is not degraded.
    beta_cm = kube.get(object_path("v1", "ConfigMap", "ml", "beta-model-groups"))
    assert beta_cm is not None and '"id": "n"' in beta_cm["data"]["model_groups.json"]
    assert '"id": "m"' not in beta_cm["data"]["model_groups.json"]
    assert result.status.models == "n"
    first_result = Reconciler(kube, BuildOptions()).reconcile(current(kube), pods=[])
    assert next(c for c in first_result.status.conditions if c.type == "Degraded").status == "False"


def test_a_group_whose_every_model_id_is_taken_is_blocked(kube: FakeKube) -> None:
    kube.objects[group_path("ml", "alpha")]["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    later = group()
    later["metadata"].update({"name": "beta", "uid": "beta-uid", "creationTimestamp": "2026-01-02T00:00:00Z"})
    kube.objects[group_path("ml", "beta")] = copy.deepcopy(later)
    result = Reconciler(kube, BuildOptions()).reconcile(later, pods=[])
    assert result.blocked is not None and result.blocked.reason == "ModelIdConflict"
    assert kube.get(object_path("apps/v1", "StatefulSet", "ml", "beta")) is None


def test_a_group_deleted_meanwhile_is_no_error(kube: FakeKube) -> None:
    body = current(kube)
    del kube.objects[group_path("ml", "alpha")]  # deleted between the event and the status write

    def gone(path: str, patch: dict[str, Any]) -> dict[str, Any]:
        raise ApiException(status=404, reason="Not Found")

    kube.merge_patch = gone  # type: ignore[method-assign]
    result = Reconciler(kube, BuildOptions()).refresh_status(body, pods=[])
    assert result.status is not None
