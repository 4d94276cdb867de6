"""The operator at scale: every watch filtered by the API server, reads from the watch
caches, no API call (and no write) when nothing changed, resyncs spread over the period."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import kopf
import pytest
from kopf._cogs.structs.references import Resource

from gpufleet.api import labels
from gpufleet.operator import handlers, reconcile
from gpufleet.operator.builders import BuildOptions, ModelGroupRef, PoolRef, build_children, build_statefulset
from gpufleet.operator.cache import IndexedReads, RecentWrites, slim
from gpufleet.operator.handlers import CHILDREN, Indexes, kopf_settings, register, resync_forever
from gpufleet.operator.kube import manifest_path
from gpufleet.operator.reconcile import Reconciler, group_path, parse_pool_spec, parse_spec
from gpufleet.operator.resync import phase, schedule
from gpufleet.operator.settings import load_settings
from tests.unit.test_operator_reconcile import STS, FakeKube, group

pytestmark = pytest.mark.unit

RESOURCES = {  # what the operator watches, as kopf resolves them against the API server
    "pods": Resource("", "v1", "pods", kind="Pod", namespaced=True),
    "leases": Resource("coordination.k8s.io", "v1", "leases", kind="Lease", namespaced=True),
    "modelgroups": Resource("gpufleet.io", "v1alpha1", "modelgroups", kind="ModelGroup", namespaced=True),
    "gpupools": Resource("gpufleet.io", "v1alpha1", "gpupools", kind="GpuPool", namespaced=True),
}
for (_api_version, _kind), _res in CHILDREN.items():
    _group, _version, _plural = _res if len(_res) == 3 else ("", *_res)
    RESOURCES[_plural] = Resource(_group, _version, _plural, kind=_kind, namespaced=True)


class CountingKube(FakeKube):
    """FakeKube that also counts reads: every API call shows."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, str]] = []

    def get(self, path: str) -> dict[str, Any] | None:
        self.reads.append(("get", path))
        return super().get(path)

    def list(self, path: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        self.reads.append(("list", path))
        return super().list(path, label_selector)

    def calls(self) -> list[tuple[str, str]]:
        return [*self.reads, *self.writes]


def watch_cache(kube: FakeKube) -> IndexedReads:
    """What the kopf indexes would hold: a copy of every object (a cache lags the server)."""
    children: dict[tuple[str, str], dict[Any, list[dict[str, Any]]]] = {kind: {} for kind in CHILDREN}
    groups: dict[Any, list[dict[str, Any]]] = {}
    for obj in copy.deepcopy(list(kube.objects.values())):
        meta = obj["metadata"]
        if obj["kind"] == "ModelGroup":
            groups.setdefault(meta["namespace"], []).append(slim(obj))
            groups[(meta["namespace"], meta["name"])] = [slim(obj)]
        elif labels.LABEL_MANAGED_BY in (meta.get("labels") or {}):  # the watches' server-side selector
            children[(obj["apiVersion"], obj["kind"])][(meta["namespace"], meta["name"])] = [slim(obj)]
    return IndexedReads(children, groups)


@pytest.fixture
def kube() -> CountingKube:
    fake = CountingKube()
    fake.objects[group_path("ml", "alpha")] = group()
    return fake


def current(kube: FakeKube) -> dict[str, Any]:
    obj = FakeKube.get(kube, group_path("ml", "alpha"))
    assert obj is not None
    return obj


# ---- watches ---------------------------------------------------------------------------------


def test_every_watch_but_the_modelgroups_carries_a_server_side_label_selector() -> None:
    registry = kopf.OperatorRegistry()
    register(registry, Reconciler(FakeKube(), BuildOptions()), load_settings())
    watched = {
        name
        for reg in (registry._indexing, registry._watching, registry._changing)
        for handler in reg.get_all_handlers()
        for name, resource in RESOURCES.items()
        if handler.selector is not None and handler.selector.check(resource)
    }
    assert watched == set(RESOURCES)  # pods, leases, ModelGroups, GpuPools and every kind of child
    selectors = kopf_settings(load_settings()).watching.label_selectors
    for name in watched - {"modelgroups", "gpupools"}:
        assert selectors.collect(RESOURCES[name]), f"the {name} watch would carry every {name} of the cluster"
    assert selectors.collect(RESOURCES["modelgroups"]) == []  # users' objects: all of them are ours
    assert selectors.collect(RESOURCES["gpupools"]) == []


def _pairs(selector: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in selector.split(","))


def test_the_selectors_match_what_the_builders_label() -> None:
    """A selector naming a label the children lack would hide them from the operator."""
    spec = {"models": [{"id": "m", "source": "/m"}], "modelCache": {"size": "10Gi", "shared": True}}
    ref = ModelGroupRef("alpha", "ml", "uid-1", parse_spec({"spec": spec}))
    selectors = kopf_settings(load_settings()).watching.label_selectors
    children = build_children(ref, BuildOptions())
    assert {(c["apiVersion"], c["kind"]) for c in children} == set(CHILDREN)  # every kind we write is watched
    for child in children:
        plural = CHILDREN[(child["apiVersion"], child["kind"])][-1]
        (selector,) = selectors.collect(RESOURCES[plural])
        assert _pairs(selector).items() <= child["metadata"]["labels"].items(), child["kind"]
    pod_labels = build_statefulset(ref, BuildOptions())["spec"]["template"]["metadata"]["labels"]
    (pod_selector,) = selectors.collect(RESOURCES["pods"])
    assert _pairs(pod_selector).items() <= pod_labels.items()
    pool = PoolRef("shared", "ml", "uid-2", parse_pool_spec({"spec": {"modelCache": {"size": "1Gi", "shared": True}}}))
    for child in build_children(pool, BuildOptions()):
        plural = CHILDREN[(child["apiVersion"], child["kind"])][-1]
        (selector,) = selectors.collect(RESOURCES[plural])
        assert _pairs(selector).items() <= child["metadata"]["labels"].items(), child["kind"]
    pool_pod_labels = build_statefulset(pool, BuildOptions())["spec"]["template"]["metadata"]["labels"]
    assert _pairs(pod_selector).items() <= pool_pod_labels.items()


# ---- no API call, no write, when nothing changed ---------------------------------------------------


def test_a_steady_state_reconcile_from_the_caches_makes_no_api_call(kube: CountingKube) -> None:
    rec = Reconciler(kube, BuildOptions())
    rec.reconcile(current(kube), pods=[])  # creates everything (through the API: no caches yet)
    reads = watch_cache(kube)
    kube.reads.clear()
    kube.writes.clear()
    for _ in range(50):
        result = rec.reconcile(reads.group("ml", "alpha") or {}, pods=[], reads=reads)
        assert result.events == []
        rec.refresh_status(reads.group("ml", "alpha") or {}, pods=[], reads=reads)
    assert kube.calls() == []
    assert rec.metrics.cache_reads.labels("miss")._value.get() == 0
    assert rec.metrics.cache_reads.labels("hit")._value.get() == 50 * 7  # 6 children + the StatefulSet again


def test_a_child_missing_from_the_cache_is_read_from_the_api_not_overwritten(kube: CountingKube) -> None:
    """Not ours (no labels): the watch never shows it; the GET finds it and it is refused."""
    cm = manifest_path(build_children(ModelGroupRef("alpha", "ml", "mg-uid", parse_spec(group())), BuildOptions())[2])
    kube.objects[cm] = {"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "alpha-model-groups", "namespace": "ml", "resourceVersion": "1"},
                        "data": {"theirs": "yes"}}
    result = Reconciler(kube, BuildOptions()).reconcile(current(kube), pods=[], reads=watch_cache(kube))
    assert result.blocked is not None and result.blocked.reason == "NameConflict"
    assert ("get", cm) in kube.reads and kube.objects[cm]["data"] == {"theirs": "yes"}


def test_a_stale_cache_after_our_own_write_causes_no_second_write(kube: CountingKube) -> None:
    rec = Reconciler(kube, BuildOptions())
    rec.reconcile(current(kube), pods=[])
    kube.edit(STS, {"spec": {"replicas": 7}})  # a hand edit...
    stale = watch_cache(kube)  # ...which the cache shows, and keeps showing for a while
    kube.writes.clear()
    rec.reconcile(stale.group("ml", "alpha") or {}, pods=[], reads=stale)
    assert kube.writes == [("apply", STS)]  # put back once
    for _ in range(3):  # the watch has not delivered our write yet
        result = rec.reconcile(stale.group("ml", "alpha") or {}, pods=[], reads=stale)
        assert result.events == []
    assert kube.writes == [("apply", STS)]


def test_status_is_written_only_when_it_changes_and_keeps_transition_times(
    kube: CountingKube, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = iter(f"2026-01-01T00:00:{s:02d}Z" for s in range(60))
    monkeypatch.setattr(reconcile, "now_rfc3339", lambda: next(clock))
    rec = Reconciler(kube, BuildOptions())
    rec.reconcile(current(kube), pods=[])
    first = {c["type"]: c for c in current(kube)["status"]["conditions"]}
    stale_body = current(kube)
    kube.writes.clear()
    for _ in range(5):  # later clock, same observations: nothing to write
        rec.refresh_status(current(kube), pods=[])
    assert kube.writes == []
    ann = ('{"pod": "alpha-0", "ready": true, "groups": ["alpha"], "timestamp": 1,'
           ' "devices": [{"device": "cuda:0", "current_group": "alpha"}]}')
    pod = {"metadata": {"name": "alpha-0", "annotations": {labels.STATUS_ANNOTATION: ann}},
           "spec": {"nodeName": "gpu-0"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    kube.objects[STS]["status"] = {"observedGeneration": 1, "currentRevision": "a", "updateRevision": "a"}
    kube.objects[STS]["metadata"]["generation"] = 1
    result = rec.refresh_status(current(kube), pods=[pod])
    assert kube.writes == [("patch", group_path("ml", "alpha") + "/status")]
    now = {c["type"]: c for c in current(kube)["status"]["conditions"]}
    assert now["Ready"]["status"] == "True"
    assert now["Ready"]["lastTransitionTime"] != first["Ready"]["lastTransitionTime"]
    assert now["Degraded"]["lastTransitionTime"] == first["Degraded"]["lastTransitionTime"]  # still False
    assert [r for _, r, _ in result.events] == ["Ready"]
    # A handler holding the ModelGroup as it was before that write (a lagging cache) writes
    # nothing more and announces nothing twice.
    kube.writes.clear()
    again = rec.refresh_status(stale_body, pods=[pod])
    assert kube.writes == [] and again.events == []


def test_recent_writes_step_aside_once_the_cache_catches_up() -> None:
    t = [0.0]
    recent = RecentWrites(ttl_s=10, clock=lambda: t[0])
    old = {"metadata": {"resourceVersion": "1"}, "v": "old"}
    new = {"metadata": {"resourceVersion": "2"}, "v": "new"}
    recent.note("/x", old, new)
    assert recent.fresh("/x", old) is new  # the cache still shows what we replaced
    assert recent.fresh("/x", new) is new  # caught up
    assert recent.fresh("/x", old) is old  # entry gone: the cache is the truth again
    recent.note("/y", None, new)  # created
    assert recent.fresh("/y", None) is new
    t[0] = 11
    assert recent.fresh("/y", None) is None  # never showed up: believe the cache (then GET)


# ---- resync spread ---------------------------------------------------------------------------------


def test_resync_phases_spread_a_round_evenly_and_stay_put() -> None:
    period = 30.0
    uids = [f"uid-{i}" for i in range(1000)]
    offsets = sorted(phase(u, period) for u in uids)
    assert all(0 <= o < period for o in offsets)
    per_second = [sum(1 for o in offsets if s <= o < s + 1) for s in range(30)]
    assert max(per_second) < 2 * 1000 / 30  # no second carries twice its share
    assert phase("uid-7", period) == phase("uid-7", period)  # the same slot every round, every process
    order = schedule([("ml", f"g{i}", u) for i, u in enumerate(uids)], period)
    assert [o for o, _, _ in order] == offsets


async def test_resync_reconciles_each_group_at_its_phase_from_the_caches(kube: CountingKube) -> None:
    names = [f"g{i}" for i in range(8)]
    del kube.objects[group_path("ml", "alpha")]
    for i, name in enumerate(names):
        body = group(models=[{"id": f"m{i}", "source": "/m"}])
        body["metadata"].update({"name": name, "uid": f"uid-{i}"})
        kube.objects[group_path("ml", name)] = body
    rec = Reconciler(kube, BuildOptions())
    for name in names:
        assert rec.reconcile(FakeKube.get(kube, group_path("ml", name)) or {}, pods=[]).blocked is None
    indexes = Indexes({}, {}, {}, watch_cache(kube))
    kube.reads.clear()
    kube.writes.clear()

    now = [100.0]
    seen: list[tuple[float, str]] = []
    original = rec.reconcile

    def recording(body: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        seen.append((now[0], body["metadata"]["name"]))
        return original(body, *args, **kwargs)

    rec.reconcile = recording  # type: ignore[method-assign]

    async def fake_sleep(seconds: float) -> None:
        now[0] += seconds
        await asyncio.sleep(0)

    task = asyncio.ensure_future(
        resync_forever(rec, load_settings(resync_seconds=10), indexes, clock=lambda: now[0], sleep=fake_sleep)
    )
    for _ in range(10_000):
        if len(seen) >= 2 * len(names):
            break
        await asyncio.sleep(0.001)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    expected = schedule([("ml", n, f"uid-{i}") for i, n in enumerate(names)], 10.0)
    first, second = seen[: len(names)], seen[len(names) : 2 * len(names)]
    assert [n for _, n in first] == [n for _, _, n in expected] == [n for _, n in second]
    assert [round(t - 100.0, 6) for t, _ in first] == [round(o, 6) for o, _, _ in expected]
    assert [round(t - 110.0, 6) for t, _ in second] == [round(o, 6) for o, _, _ in expected]
    assert kube.calls() == []  # a whole round of steady groups: not one API call


def test_handlers_module_keeps_kopf_out_of_the_reconciler() -> None:
    assert "kopf" not in reconcile.__dict__ and handlers.kopf is kopf
