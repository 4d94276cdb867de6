"""Router leases as coordination.k8s.io Lease objects: building and parsing (pure), and the
watch cache's ordering. The API calls themselves run against a real API server (tests/e2e)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gpufleet.api import labels
from gpufleet.router.kube_leases import KubeLeaseStore, label_value, lease_object, parse_lease_object
from gpufleet.routing.leases import Lease

pytestmark = pytest.mark.unit

LEASE = Lease(
    "lease-0123456789abcdef", "node-a/cuda:1", ("alpha-1/cuda:0",), 600, acquired_at=1_800_000_000.25,
    renewed_at=1_800_000_100.5, uuids=("GPU-1234",),
)


def with_version(obj: dict[str, Any], version: int) -> dict[str, Any]:
    return {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(version)}}


def test_object_round_trip_and_shape() -> None:
    obj = lease_object(LEASE, "gpufleet-system")
    assert obj["metadata"]["name"] == LEASE.id and obj["metadata"]["namespace"] == "gpufleet-system"
    assert obj["metadata"]["labels"][labels.LABEL_MANAGED_BY] == "gpufleet-router"
    assert obj["metadata"]["labels"][labels.LABEL_LEASE_TARGET] == "node-a.cuda.1"  # a valid label value
    assert obj["metadata"]["labels"][labels.LABEL_COMPONENT] == "router"  # never "pod-server"
    spec = obj["spec"]
    assert spec == {
        "holderIdentity": LEASE.id,
        "leaseDurationSeconds": 600,
        "acquireTime": "2027-01-15T08:00:00.250000Z",
        "renewTime": "2027-01-15T08:01:40.500000Z",
    }
    assert parse_lease_object(json.loads(json.dumps(obj))) == LEASE


def test_pod_status_leases_and_broken_objects_are_not_router_leases() -> None:
    obj = lease_object(LEASE, "ns")
    status_lease = {**obj, "metadata": {**obj["metadata"], "labels": {labels.LABEL_COMPONENT: "pod-server"}}}
    assert parse_lease_object(status_lease) is None
    bad_devices = {**obj, "metadata": {**obj["metadata"], "annotations": {labels.LEASE_DEVICES_ANNOTATION: "{"}}}
    assert parse_lease_object(bad_devices) is None
    assert parse_lease_object({**obj, "spec": {**obj["spec"], "renewTime": None}}) is None
    assert parse_lease_object({**obj, "spec": {**obj["spec"], "leaseDurationSeconds": "600"}}) is None


@pytest.mark.parametrize(
    ("target", "value"),
    [("GPU-1234-abcd", "GPU-1234-abcd"), ("node/cuda:1", "node.cuda.1"), ("/", "target"), ("x" * 80, "x" * 63)],
)
def test_label_values_are_valid(target: str, value: str) -> None:
    assert label_value(target) == value


def test_the_cache_keeps_the_newest_version() -> None:
    store = KubeLeaseStore("ns", clock=lambda: 1_800_000_200.0)
    obj = lease_object(LEASE, "ns")
    store.apply_event("RESET", [with_version(obj, 10)])
    assert [x.id for x in store.all()] == [LEASE.id]
    renewed = lease_object(LEASE.renewed(1_800_000_190.0), "ns")
    store.observe(with_version(renewed, 12))  # our own write's answer
    store.apply_event("MODIFIED", with_version(obj, 11))  # a late watch event: older, ignored
    assert store.all()[0].renewed_at == 1_800_000_190.0
    store.apply_event("DELETED", with_version(renewed, 13))
    assert store.all() == []
    store.apply_event("ADDED", with_version(obj, 9))  # a stale replay cannot bring it back
    assert store.all() == []
    store.apply_event("RESET", [])
    assert store.cache == {}
