"""Kubernetes discovery: watch pod-server Pods by label in one or more namespaces.

Each Pod gives its IP, readiness and node, and the pod server's status document in the
``gpufleet.io/status`` annotation (written on change plus a slow heartbeat). Parsing a Pod
is a pure function (``parse_pod``) over the Pod's JSON; the watch runs in one thread per
namespace with the synchronous ``kubernetes`` client and hands events to the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from gpufleet.api.labels import STATUS_ANNOTATION
from gpufleet.api.pod_status import PodStatus
from gpufleet.router.polling import every, poll_status_once
from gpufleet.router.state import FleetState
from gpufleet.router.upstream import UpstreamPool

log = logging.getLogger(__name__)
WATCH_TIMEOUT_S = 300
RETRY_S = 2.0


@dataclass(frozen=True)
class PodObservation:
    id: str  # "namespace/name"
    name: str
    namespace: str
    node: str | None
    url: str | None
    ready: bool
    status: PodStatus | None
    status_error: str | None = None


def _port(spec: Mapping[str, Any], default_port: int) -> int:
    first: int | None = None
    for container in spec.get("containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == "http" and p.get("containerPort"):
                return int(p["containerPort"])
            if first is None and p.get("containerPort"):
                first = int(p["containerPort"])
    return first or default_port


def parse_pod(obj: Mapping[str, Any], default_port: int = 8000) -> PodObservation:
    """A Pod's JSON (as the API server sends it) as what the router needs from it."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    name = str(meta.get("name", ""))
    namespace = str(meta.get("namespace") or "default")
    ip = status.get("podIP")
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    ready = (
        status.get("phase") == "Running"
        and conditions.get("Ready") == "True"
        and not meta.get("deletionTimestamp")
        and bool(ip)
    )
    doc: PodStatus | None = None
    error: str | None = None
    raw = (meta.get("annotations") or {}).get(STATUS_ANNOTATION)
    if raw:
        try:
            doc = PodStatus.model_validate_json(raw)
        except ValidationError as exc:
            error = f"annotation {STATUS_ANNOTATION} is not a status document: {exc.errors()[0]['msg']}"
    url: str | None = None
    if ip:
        host = f"[{ip}]" if ":" in str(ip) else str(ip)
        url = f"http://{host}:{_port(spec, default_port)}"
    elif doc is not None and doc.url:
        url = doc.url.rstrip("/")
    return PodObservation(
        id=f"{namespace}/{name}",
        name=name,
        namespace=namespace,
        node=spec.get("nodeName"),
        url=url,
        ready=ready,
        status=doc,
        status_error=error,
    )


def apply_observation(state: FleetState, obs: PodObservation) -> None:
    state.upsert(obs.id, obs.url, name=obs.name, node=obs.node, ready=obs.ready)
    if obs.status_error:
        log.warning("bad status annotation", extra={"pod": obs.id, "error": obs.status_error})
    if obs.status is not None:
        rec = state.pods[obs.id]
        if rec.status != obs.status:
            state.observe_status(obs.id, obs.status, contact=False)


def apply_event(state: FleetState, kind: str, namespace: str, payload: Any, default_port: int) -> None:
    """One watch event (ADDED, MODIFIED, DELETED) or a fresh list of a namespace (RESET)."""
    if kind == "RESET":
        observations = [parse_pod(o, default_port) for o in payload]
        keep = {o.id for o in observations}
        for pod_id in [p for p in state.pods if p.startswith(f"{namespace}/") and p not in keep]:
            state.remove(pod_id)
        for obs in observations:
            apply_observation(state, obs)
    elif kind == "DELETED":
        state.remove(parse_pod(payload, default_port).id)
    elif kind in ("ADDED", "MODIFIED"):
        apply_observation(state, parse_pod(payload, default_port))


Emit = Callable[[str, str, Any], None]


def _watch_namespace(namespace: str, selector: str, emit: Emit, stop: threading.Event) -> None:  # pragma: no cover
    from kubernetes import client, config, watch
    from kubernetes.client.exceptions import ApiException

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.CoreV1Api()
    while not stop.is_set():
        try:
            # _preload_content=False: the raw response (its .data), not the V1PodList the stubs promise
            listing: Any = api.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
            body = json.loads(listing.data)
            emit("RESET", namespace, body.get("items") or [])
            version = (body.get("metadata") or {}).get("resourceVersion")
            w = watch.Watch()
            for event in w.stream(
                api.list_namespaced_pod,
                namespace,
                label_selector=selector,
                resource_version=version,
                timeout_seconds=WATCH_TIMEOUT_S,
            ):
                if stop.is_set():
                    w.stop()
                    break
                if event["type"] == "ERROR":
                    break  # typically 410 Gone: list again
                emit(event["type"], namespace, event["raw_object"])
        except ApiException as exc:
            if exc.status != 410:
                log.warning("pod watch failed", extra={"namespace": namespace, "status": exc.status})
                stop.wait(RETRY_S)
        except Exception as exc:
            log.warning("pod watch failed", extra={"namespace": namespace, "error": str(exc)})
            stop.wait(RETRY_S)


class KubernetesDiscovery:
    kind = "kubernetes"

    def __init__(
        self,
        namespaces: list[str],
        label_selector: str,
        *,
        default_port: int = 8000,
        fallback_interval_s: float = 2.0,
        timeout_s: float = 2.0,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.namespaces = namespaces
        self.label_selector = label_selector
        self.default_port = default_port
        self.fallback_interval_s = fallback_interval_s
        self.timeout_s = timeout_s
        self.headers = headers or []

    async def run(self, state: FleetState, pool: UpstreamPool) -> None:
        loop = asyncio.get_running_loop()
        stop = threading.Event()

        def emit(kind: str, namespace: str, payload: Any) -> None:
            loop.call_soon_threadsafe(apply_event, state, kind, namespace, payload, self.default_port)

        threads = [
            threading.Thread(
                target=_watch_namespace, args=(ns, self.label_selector, emit, stop), name=f"watch-{ns}", daemon=True
            )
            for ns in self.namespaces
        ]
        for t in threads:
            t.start()
        log.info("watching pod servers", extra={"namespaces": self.namespaces, "selector": self.label_selector})

        async def poll_unannotated() -> None:
            # A pod server that does not write its annotation (STATUS_ANNOTATION off) is still served:
            # its status document is read over HTTP instead.
            await poll_status_once(state, pool, self.timeout_s, self.headers, only_missing=True)

        try:
            await every(self.fallback_interval_s, poll_unannotated, "status poll (pods without annotation)")
        finally:
            stop.set()
