"""The pod server's status Lease (pure part of gpufleet.pod_server.status_publisher)."""

from __future__ import annotations

import kubernetes_validate
import pytest

from gpufleet.api import labels
from gpufleet.api.pod_status import PodStatus
from gpufleet.pod_server.settings import PodServerSettings
from gpufleet.pod_server.status_publisher import lease_manifest
from gpufleet.router.kube_discovery import parse_lease

pytestmark = pytest.mark.unit


def test_the_lease_is_named_and_owned_like_the_pod_and_readers_accept_it() -> None:
    settings = PodServerSettings(devices="cpu:0", pod_name="alpha-0", pod_namespace="ml", pod_uid="u-1",
                                 status_heartbeat_s=20)
    doc = PodStatus(pod="alpha-0", namespace="ml", ready=True, timestamp=1.0)
    lease = lease_manifest(doc, settings, 1_700_000_000.25)
    kubernetes_validate.validate(lease, kubernetes_validate.latest_version(), strict=True)
    meta = lease["metadata"]
    assert (meta["name"], meta["namespace"]) == ("alpha-0", "ml")
    assert meta["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": "alpha-0", "uid": "u-1"}]
    assert meta["labels"] == {labels.LABEL_COMPONENT: labels.COMPONENT_POD_SERVER}
    assert lease["spec"]["renewTime"] == "2023-11-14T22:13:20.250000Z"
    assert lease["spec"]["leaseDurationSeconds"] == 60
    seen = parse_lease(lease)  # what the router makes of it
    assert seen.owner_uid == "u-1" and seen.status == doc
