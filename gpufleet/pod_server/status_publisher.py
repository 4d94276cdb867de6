"""Writes the pod's status document to its own Pod annotation, in a cluster.

Writes happen when the state changes (coalesced over a short window) and otherwise only
on a slow heartbeat, so API-server load follows state changes, not request traffic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from gpufleet.api.labels import STATUS_ANNOTATION
from gpufleet.api.pod_status import PodStatus
from gpufleet.pod_server.service import PodService
from gpufleet.pod_server.settings import PodServerSettings

log = logging.getLogger(__name__)
COALESCE_S = 0.5


def should_write(doc: PodStatus, last_key: object, last_write: float, now: float, heartbeat_s: float) -> bool:
    return doc.state_key() != last_key or now - last_write >= heartbeat_s


def _core_api() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CoreV1Api()


async def run_status_publisher(service: PodService, settings: PodServerSettings) -> None:
    if not (settings.pod_name and settings.pod_namespace):
        log.warning("status annotation disabled: POD_NAME and POD_NAMESPACE are not set")
        return
    api = await asyncio.to_thread(_core_api)
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
        patch = {"metadata": {"annotations": {STATUS_ANNOTATION: doc.model_dump_json()}}}
        try:
            await asyncio.to_thread(api.patch_namespaced_pod, settings.pod_name, settings.pod_namespace, patch)
            last_key, last_write = doc.state_key(), now
        except Exception as exc:  # the API server being away must not hurt serving
            log.warning("status annotation write failed", extra={"error": str(exc)})
