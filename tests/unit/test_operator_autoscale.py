"""Demand drives a pool's residency and pod count, and a dedicated group's pod count: the
scaling round against the in-memory API (the rules themselves: test_autoscale_*)."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Mapping
from typing import Any

import pytest

from gpufleet.api import labels
from gpufleet.api.demand import GroupDemand
from gpufleet.api.pod_status import DeviceStatus, PodStatus
from gpufleet.operator.builders import BuildOptions
from gpufleet.operator.handlers import Indexes, pool_round
from gpufleet.operator.kube import object_path
from gpufleet.operator.reconcile import Reconciler, group_path
from gpufleet.operator.scale_round import ScaleRound
from tests.unit.test_operator_pool_reconcile import (
    POOL,
    STS,
    _indexes,
    add,
    caches,
    group_body,
    placement_file,
    pool_body,
    stored,
)
from tests.unit.test_operator_scale import CountingKube

pytestmark = pytest.mark.unit


def pod(name: str, *current: str | None, switch_s: float = 0.2) -> dict[str, Any]:
    """A ready pool pod whose devices hold ``current`` (one device each)."""
    doc = PodStatus(
        pod=name, ready=True, groups=["chat", "beta"], timestamp=1, models={"chat-model": "chat", "beta-model": "beta"},
        devices=[DeviceStatus(device=f"cuda:{i}", current_group=g, switch_seconds_from_cache=switch_s)
                 for i, g in enumerate(current)],
    )
    return {"metadata": {"name": name, "uid": f"{name}-uid",
                         "annotations": {labels.STATUS_ANNOTATION: doc.model_dump_json()}},
            "spec": {"nodeName": "n0"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


class Harness:
    """The scaler's round wired as the handlers wire it, over the in-memory API."""

    def __init__(self, kube: CountingKube, pods: list[dict[str, Any]], rec: Reconciler | None = None) -> None:
        self.kube = kube
        self.rec = rec or Reconciler(kube, BuildOptions())
        self.pods = pods
        self.events: list[tuple[str, str, str, str]] = []

    def indexes(self) -> Indexes:
        return _indexes(self.kube, self.pods)

    def run(self, demand: Mapping[str, GroupDemand], now: float) -> None:
        indexes = self.indexes()

        async def reconcile_pool(namespace: str, name: str) -> None:
            pool_round(self.rec, self.indexes(), namespace, name)

        async def reconcile_group(namespace: str, name: str) -> None:
            self.rec.reconcile(copy.deepcopy(self.kube.objects[group_path(namespace, name)]), pods=[])

        async def post(body: dict[str, Any], events: list[tuple[str, str, str]]) -> None:
            self.events += [(body["metadata"]["name"], *e) for e in events]

        one = ScaleRound(self.rec, indexes.reads, indexes.pods_of_pool, reconcile_pool, reconcile_group, post)
        asyncio.run(one(demand, now))


def demand(**groups: tuple[int, int]) -> dict[str, GroupDemand]:
    """group=(in_flight, waiting), in namespace ml."""
    return {f"ml/{g}": GroupDemand(namespace="ml", group=g, in_flight=f, waiting=w, service_seconds=1.0)
            for g, (f, w) in groups.items()}


def test_a_hot_group_gains_devices_through_the_placement_and_gives_them_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="gpufleet.operator.scaler")
    kube = CountingKube()
    kube.objects[POOL] = pool_body(replicas=3, switch={"releaseDelaySeconds": 30, "minResidencySeconds": 0})
    add(kube, group_body("chat"))
    add(kube, group_body("beta"))
    h = Harness(kube, [pod("shared-0", "chat"), pod("shared-1", "chat"), pod("shared-2", "beta")])
    pool_round(h.rec, h.indexes(), "ml", "shared")
    h.run(demand(chat=(2, 0), beta=(2, 0)), now=1000)
    floor = placement_file(kube)  # on first sight, what the devices hold is the intent
    assert {p: d.devices["0"].current for p, d in floor.pods.items()} == {
        "shared-0": "chat", "shared-1": "chat", "shared-2": "beta"}
    status = stored(kube, POOL)["status"]
    assert {r["group"]: (r["current"], r["desired"]) for r in status["residency"]} == {"chat": (2, 2), "beta": (1, 1)}

    # beta turns hot: 40 sequences on 1 device wait ~4 s, far over a 0.2 s switch.
    h.run(demand(chat=(1, 0), beta=(40, 0)), now=1005)
    placed = placement_file(kube)
    held = sorted(d.current or "" for p in placed.pods.values() for d in p.devices.values())
    assert held.count("beta") == 2  # chat keeps the one device its demand needs
    status = stored(kube, POOL)["status"]
    assert {r["group"]: r["desired"] for r in status["residency"]} == {"chat": 1, "beta": 2}
    assert any(e[2] == "ResidencyChanged" and "group beta: 1 -> 2" in e[3] for e in h.events)

    # The pods switch; beta cools: it keeps both devices for the release delay, then gives one back.
    h.pods = [pod("shared-0", "chat"), pod("shared-1", "beta"), pod("shared-2", "beta")]
    for now in (1010, 1020, 1030):
        h.run(demand(chat=(1, 0), beta=(1, 0)), now=now)
        assert placement_file(kube) == placed
    h.run(demand(chat=(1, 0), beta=(1, 0)), now=1041)
    status = stored(kube, POOL)["status"]
    assert {r["group"]: r["desired"] for r in status["residency"]} == {"chat": 1, "beta": 1}
    assert any(e[2] == "ResidencyChanged" and "group beta: 2 -> 1" in e[3] for e in h.events)
    changes = [(r.group, r.before, r.after) for r in caplog.records
               if r.getMessage() == "residency decision" and r.levelno == logging.INFO]
    assert ("beta", 1, 2) in changes and ("beta", 2, 1) in changes
    pooled = stored(kube, group_path("ml", "beta"))["status"]
    assert (pooled["residency"], pooled["desiredResidency"]) == (2, 1)


def sts_replicas(kube: CountingKube, path: str = STS) -> int:
    return int(kube.objects[path]["spec"]["replicas"])


def test_a_pool_scales_from_zero_for_a_waiting_request_and_back_to_zero_when_idle(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="gpufleet.operator.scaler")  # every decision's line is written
    kube = CountingKube()
    kube.objects[POOL] = pool_body(replicas=0, autoscaling={"minReplicas": 0, "maxReplicas": 3,
                                                            "scaleDownDelaySeconds": 60})
    add(kube, group_body("chat"))
    h = Harness(kube, [])
    pool_round(h.rec, h.indexes(), "ml", "shared")
    assert sts_replicas(kube) == 0
    h.run({}, now=0)
    assert sts_replicas(kube) == 0
    h.run(demand(chat=(0, 1)), now=5)  # one request held at a router
    assert sts_replicas(kube) == 1
    assert stored(kube, POOL)["status"]["desiredReplicas"] == 1
    assert any(e[2] == "ScaledUp" and "pods 0 -> 1" in e[3] for e in h.events)
    assert stored(kube, group_path("ml", "chat"))["status"]["desiredReplicas"] == 1  # the pool's, on its group
    h.pods = [pod("shared-0", "chat")]
    h.run(demand(chat=(20, 0)), now=10)  # 20 sequences at 8 per device
    assert sts_replicas(kube) == 3
    for now in (20, 40, 69):  # idle, but within the scale-down delay of the last busy round
        h.run({}, now=now)
        assert sts_replicas(kube) == 3
    h.run({}, now=71)
    assert sts_replicas(kube) == 0
    assert any(e[2] == "ScaledDown" and "pods 3 -> 0" in e[3] for e in h.events)
    assert stored(kube, POOL)["status"]["lastScaleTime"]
    lines = [r for r in caplog.records if r.getMessage() == "replicas decision" and r.levelno == logging.INFO]
    assert [(r.before, r.after, r.object) for r in lines] == [(0, 1, "shared"), (1, 3, "shared"), (3, 0, "shared")]
    assert all(r.reason and r.sequences is not None for r in lines)  # with its inputs


def test_a_restarted_operator_keeps_the_pods_it_finds_until_demand_says_otherwise() -> None:
    kube = CountingKube()
    kube.objects[POOL] = pool_body(replicas=1, autoscaling={"maxReplicas": 4, "scaleDownDelaySeconds": 60})
    add(kube, group_body("chat"))
    first = Harness(kube, [])
    first.run(demand(chat=(30, 0)), now=0)
    assert sts_replicas(kube) == 4
    again = Harness(kube, [pod(f"shared-{i}", "chat") for i in range(4)])  # a new operator: empty memory
    pool_round(again.rec, again.indexes(), "ml", "shared")
    assert sts_replicas(kube) == 4  # not back to spec.replicas (1)
    again.run({}, now=100)
    assert sts_replicas(kube) == 4  # not on its first look either


def test_a_pool_without_autoscaling_keeps_spec_replicas() -> None:
    kube = CountingKube()
    kube.objects[POOL] = pool_body(replicas=2)
    add(kube, group_body("chat"))
    h = Harness(kube, [])
    h.run(demand(chat=(100, 5)), now=0)
    assert sts_replicas(kube) == 2
    assert "desiredReplicas" not in stored(kube, POOL)["status"]
    text = h.rec.metrics.registry.get_sample_value(
        "gpufleet_autoscale_sequences", {"kind": "GpuPool", "namespace": "ml", "name": "shared"}
    )
    assert text == 105  # exported for an HPA or KEDA all the same


def test_a_dedicated_group_follows_demand_with_the_same_rule() -> None:
    kube = CountingKube()
    body = group_body("solo", pool=None, replicas=1, autoscaling={"minReplicas": 0, "maxReplicas": 2,
                                                                  "scaleDownDelaySeconds": 30})
    add(kube, body)
    h = Harness(kube, [])
    h.rec.reconcile(copy.deepcopy(body), pods=[])
    path = object_path("apps/v1", "StatefulSet", "ml", "solo")
    assert sts_replicas(kube, path) == 1
    h.run(demand(solo=(12, 0)), now=0)
    assert sts_replicas(kube, path) == 2
    assert stored(kube, group_path("ml", "solo"))["status"]["desiredReplicas"] == 2
    h.run({}, now=10)
    h.run({}, now=31)
    assert sts_replicas(kube, path) == 0
    assert [e[2] for e in h.events] == ["ScaledUp", "ScaledDown"]


def test_objects_that_are_gone_are_forgotten() -> None:
    kube = CountingKube()
    kube.objects[POOL] = pool_body(replicas=1, autoscaling={"maxReplicas": 2})
    add(kube, group_body("chat"))
    h = Harness(kube, [])
    h.run(demand(chat=(9, 0)), now=0)
    assert h.rec.book.replicas(("GpuPool", "ml", "shared")) == 2
    del kube.objects[POOL]
    h.run({}, now=1)
    assert h.rec.book.replicas(("GpuPool", "ml", "shared")) is None
    assert caches(kube).pool("ml", "shared") is None
