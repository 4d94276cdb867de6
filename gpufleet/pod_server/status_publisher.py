"""Publishes the pod's status document to its own Lease (coordination.k8s.io/v1), in a cluster.

Why a Lease and not the Pod's annotation: writing a Pod annotation needs `patch pods`,
and RBAC cannot narrow that to one pod or one annotation, so any pod server could have
rewritten any pod in its namespace (image, labels). A Lease per pod, named like the pod,
needs only `create`/`patch` on leases; the chart's ValidatingAdmissionPolicy then lets a
pod-server identity write only the Lease named by its token's pod-name claim, and readers
(router, operator) trust a Lease only when its owner reference is the live Pod's uid.

Writes happen when the state changes (coalesced over a short window) and otherwise only
on a slow heartbeat, so API-server load follows state changes, not request traffic.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from typing import Any

from gpufleet.api import labels
from gpufleet.api.pod_status import PodStatus
from gpufleet.pod_server.service import PodService
from gpufleet.pod_server.settings import PodServerSettings

log = logging.getLogger(__name__)
COALESCE_S = 0.5
FIELD_MANAGER = "gpufleet-pod-server"
APPLY = "application/apply-patch+yaml"  # a JSON body is valid YAML


def should_write(doc: PodStatus, last_key: object, last_write: float, now: float, heartbeat_s: float) -> bool:
    return doc.state_key() != last_key or now - last_write >= heartbeat_s


def lease_manifest(doc: PodStatus, settings: PodServerSettings, now_unix: float) -> dict[str, Any]:
    """The pod's status Lease (server-side applied: creates it or updates it in one call)."""
    assert settings.pod_name and settings.pod_namespace
    renew = datetime.datetime.fromtimestamp(now_unix, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    meta: dict[str, Any] = {
        "name": settings.pod_name,
        "namespace": settings.pod_namespace,
        "labels": {labels.LABEL_COMPONENT: labels.COMPONENT_POD_SERVER},
        "annotations": {labels.STATUS_ANNOTATION: doc.model_dump_json()},
    }
    if settings.pod_uid:
        # The garbage collector removes the Lease with its Pod; readers match the uid so a
        # Lease left by an earlier pod of the same (StatefulSet) name is never believed.
        meta["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Pod", "name": settings.pod_name, "uid": settings.pod_uid}
        ]
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": meta,
        "spec": {
            "holderIdentity": settings.pod_name,
            # Readers may treat a Lease not renewed for this long as a dead pod server.
            "leaseDurationSeconds": max(1, int(settings.status_heartbeat_s * 3)),
            "renewTime": renew,
        },
    }


def _coordination_api() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CoordinationV1Api()


def _apply(api: Any, manifest: dict[str, Any]) -> None:
    meta = manifest["metadata"]
    api.patch_namespaced_lease(
        meta["name"], meta["namespace"], manifest, field_manager=FIELD_MANAGER, force=True, _content_type=APPLY
    )


async def run_status_publisher(service: PodService, settings: PodServerSettings) -> None:
    if not (settings.pod_name and settings.pod_namespace):
        log.warning("status publishing disabled: POD_NAME and POD_NAMESPACE are not set")
        return
    api = await asyncio.to_thread(_coordination_api)
    last_key: object = None
    last_write = 0.0
    while True:
        try:
            await asyncio.wait_for(service.changed.wait(), timeout=settings.status_heartbeat_s)
            await asyncio.sleep(COALESCE_S)  # let a burst of changes settle into one write
        except TimeoutError:
            pass
        service.changed.clear()
        doc = service.status()
        now = time.monotonic()
        if not should_write(doc, last_key, last_write, now, settings.status_heartbeat_s):
            continue
        try:
            await asyncio.to_thread(_apply, api, lease_manifest(doc, settings, time.time()))
            last_key, last_write = doc.state_key(), now
        except Exception as exc:  # the API server being away must not hurt serving
            log.warning("status lease write failed", extra={"error": str(exc)})
