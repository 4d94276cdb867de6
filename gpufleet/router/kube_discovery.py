"""Kubernetes discovery: watch pod-server Pods and their status Leases in one or more namespaces,
and the ModelGroups there (read-only: which models each group has, served by a pod or not, for
groups at zero pods; ``gpufleet.router.catalog``).

Each Pod gives its IP, readiness and node; each pod server publishes its status document
in the ``gpufleet.io/status`` annotation of a Lease named like its Pod (written on change
plus a slow heartbeat; see gpufleet.pod_server.status_publisher). Only pods the operator
manages are trusted (its managed-by label, and a controller owner reference to the
StatefulSet named by the pod's model-group label, or by its pool label on a GpuPool's
pods), and a Lease only when its owner reference is that Pod's uid: a Lease left by an
earlier pod of the same name, or made by hand, is never believed. Parsing is pure
(``parse_pod``, ``parse_lease``, ``ClusterView``) over the objects' JSON; the watches run in
threads with the synchronous ``kubernetes`` client and hand events to the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from gpufleet.api import labels
from gpufleet.api.labels import STATUS_ANNOTATION
from gpufleet.api.pod_status import PodStatus
from gpufleet.router.catalog import API_GROUP, API_VERSION, PLURAL
from gpufleet.router.polling import every, poll_status_once
from gpufleet.router.state import FleetState
from gpufleet.router.upstream import Upstream

log = logging.getLogger(__name__)
WATCH_TIMEOUT_S = 300
RETRY_S = 2.0
# ModelGroups forbidden (a chart without the router's rule for them) or unknown (no CRD): looked for
# again now and then, not every RETRY_S; the pods alone still say what they serve.
CATALOG_RETRY_S = 60.0
PODS, LEASES, MODELGROUPS = "pods", "leases", PLURAL


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
    uid: str | None = None
    managed: bool = True  # made by the operator's StatefulSet (else ignored)


@dataclass(frozen=True)
class LeaseObservation:
    id: str  # "namespace/name": the name of the pod it describes
    owner_uid: str | None  # the Pod that owns it
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


def managed_by_operator(meta: Mapping[str, Any]) -> bool:
    """The operator's label, and owned (as controller) by the StatefulSet its labels name: a
    dedicated group's (the model-group label) or a GpuPool's (the pool label)."""
    pod_labels = meta.get("labels") or {}
    owner = pod_labels.get(labels.LABEL_MODEL_GROUP) or pod_labels.get(labels.LABEL_POOL)
    if pod_labels.get(labels.LABEL_MANAGED_BY) != labels.MANAGED_BY or not owner:
        return False
    return any(
        ref.get("controller")
        and ref.get("kind") == "StatefulSet"
        and ref.get("name") == owner
        and str(ref.get("apiVersion", "")).startswith("apps/")
        for ref in meta.get("ownerReferences") or []
    )


def _status_doc(meta: Mapping[str, Any], where: str) -> tuple[PodStatus | None, str | None]:
    raw = (meta.get("annotations") or {}).get(STATUS_ANNOTATION)
    if not raw:
        return None, None
    try:
        return PodStatus.model_validate_json(raw), None
    except ValidationError as exc:
        return None, f"{where} annotation {STATUS_ANNOTATION} is not a status document: {exc.errors()[0]['msg']}"


def parse_pod(obj: Mapping[str, Any], default_port: int = 8000) -> PodObservation:
    """A Pod's JSON (as the API server sends it) as what the router needs from it.

    The status document is not read from the Pod: it comes from the pod's Lease."""
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
    url: str | None = None
    if ip:
        host = f"[{ip}]" if ":" in str(ip) else str(ip)
        url = f"http://{host}:{_port(spec, default_port)}"
    return PodObservation(
        id=f"{namespace}/{name}",
        name=name,
        namespace=namespace,
        node=spec.get("nodeName"),
        url=url,
        ready=ready,
        status=None,
        uid=meta.get("uid"),
        managed=managed_by_operator(meta),
    )


def parse_lease(obj: Mapping[str, Any]) -> LeaseObservation:
    meta = obj.get("metadata") or {}
    namespace = str(meta.get("namespace") or "default")
    owner = next(
        (
            r.get("uid")
            for r in meta.get("ownerReferences") or []
            if r.get("kind") == "Pod" and r.get("apiVersion") == "v1" and r.get("name") == meta.get("name")
        ),
        None,
    )
    doc, error = _status_doc(meta, "Lease")
    if doc is not None and doc.pod != meta.get("name"):
        error = f"Lease {meta.get('name')} carries the status of pod {doc.pod!r}"
        doc = None
    return LeaseObservation(f"{namespace}/{meta.get('name', '')}", owner, doc, error)


@dataclass
class ClusterView:
    """The Pods and Leases seen so far, joined: a pod's status is its own Lease's, if trusted."""

    pods: dict[str, PodObservation] = field(default_factory=dict)
    leases: dict[str, LeaseObservation] = field(default_factory=dict)

    def joined(self, pod_id: str) -> PodObservation | None:
        pod = self.pods.get(pod_id)
        if pod is None:
            return None
        lease = self.leases.get(pod_id)
        if lease is None or pod.uid is None or lease.owner_uid != pod.uid:
            return pod
        return replace(pod, status=lease.status, status_error=lease.status_error)

    def apply(self, resource: str, kind: str, namespace: str, payload: Any, default_port: int) -> set[str]:
        """One watch event (ADDED, MODIFIED, DELETED) or a fresh list of a namespace (RESET);
        returns the pod ids whose joined view may have changed."""
        table: dict[str, Any] = self.pods if resource == PODS else self.leases

        def parse(obj: Any) -> Any:
            return parse_pod(obj, default_port) if resource == PODS else parse_lease(obj)

        if kind == "RESET":
            fresh = {o.id: o for o in (parse(obj) for obj in payload)}
            gone = {k for k in table if k.startswith(f"{namespace}/") and k not in fresh}
            for k in gone:
                del table[k]
            table.update(fresh)
            return gone | set(fresh)
        if kind == "DELETED":
            obs = parse(payload)
            table.pop(obs.id, None)
            return {obs.id}
        if kind in ("ADDED", "MODIFIED"):
            obs = parse(payload)
            table[obs.id] = obs
            return {obs.id}
        return set()


def apply_observation(state: FleetState, obs: PodObservation) -> None:
    if not obs.managed:
        if obs.id in state.pods:
            state.remove(obs.id)
        return
    state.upsert(obs.id, obs.url, name=obs.name, node=obs.node, ready=obs.ready, tenant=obs.namespace)
    if obs.status_error:
        log.warning("bad status lease", extra={"pod": obs.id, "error": obs.status_error})
    if obs.status is not None:
        rec = state.pods[obs.id]
        if rec.status != obs.status:
            state.observe_status(obs.id, obs.status, contact=False)


def sync(state: FleetState, view: ClusterView, pod_ids: set[str]) -> None:
    """Bring the router's fleet state in line with the view for these pods."""
    for pod_id in sorted(pod_ids):
        obs = view.joined(pod_id)
        if obs is None:
            state.remove(pod_id)
        else:
            apply_observation(state, obs)


def apply_event(
    state: FleetState,
    kind: str,
    namespace: str,
    payload: Any,
    default_port: int,
    *,
    resource: str = PODS,
    view: ClusterView | None = None,
) -> ClusterView:
    """One watch event into the view and on to the fleet state; returns the view."""
    view = view if view is not None else ClusterView()
    if resource == MODELGROUPS:
        state.observe_model_groups(kind, namespace, payload)
        return view
    sync(state, view, view.apply(resource, kind, namespace, payload, default_port))
    return view


Emit = Callable[[str, str, str, Any], None]  # (resource, kind, namespace, payload)
LEASE_SELECTOR = f"{labels.LABEL_COMPONENT}={labels.COMPONENT_POD_SERVER}"


def import_kubernetes() -> None:
    """Import the client once, in the calling thread, before any watch thread starts: its
    lazily loaded modules, imported first by several threads at once, can fail with
    ``_DeadlockError`` and kill a watch for good."""
    from kubernetes import client, config, watch  # noqa: F401
    from kubernetes.client import exceptions  # noqa: F401

    for name in ("ApiClient", "Configuration", "CoreV1Api", "CoordinationV1Api", "CustomObjectsApi"):
        getattr(client, name)


def _lister(resource: str) -> tuple[Callable[..., Any], tuple[str, ...], tuple[str, ...]]:  # pragma: no cover
    """The list call of ``resource``, and the arguments before and after the namespace."""
    from kubernetes import client

    if resource == PODS:
        return client.CoreV1Api().list_namespaced_pod, (), ()
    if resource == LEASES:
        return client.CoordinationV1Api().list_namespaced_lease, (), ()
    return client.CustomObjectsApi().list_namespaced_custom_object, (API_GROUP, API_VERSION), (PLURAL,)


def _watch(resource: str, namespace: str, selector: str, emit: Emit, stop: threading.Event) -> None:  # pragma: no cover
    import_kubernetes()  # a no-op when the caller did it first, as it should
    from kubernetes import config, watch
    from kubernetes.client.exceptions import ApiException

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    lister, before, after = _lister(resource)
    args = (*before, namespace, *after)
    selected = {"label_selector": selector} if selector else {}
    while not stop.is_set():
        try:
            # _preload_content=False: the raw response (its .data), not the V1PodList the stubs promise
            listing: Any = lister(*args, **selected, _preload_content=False)
            body = json.loads(listing.data)
            emit(resource, "RESET", namespace, body.get("items") or [])
            version = (body.get("metadata") or {}).get("resourceVersion")
            w = watch.Watch()
            for event in w.stream(
                lister,
                *args,
                **selected,
                resource_version=version,
                timeout_seconds=WATCH_TIMEOUT_S,
            ):
                if stop.is_set():
                    w.stop()
                    break
                if event["type"] == "ERROR":
                    break  # typically 410 Gone: list again
                emit(resource, event["type"], namespace, event["raw_object"])
        except ApiException as exc:
            if exc.status != 410:
                log.warning("watch failed", extra={"resource": resource, "namespace": namespace, "status": exc.status})
                missing = resource == MODELGROUPS and exc.status in (403, 404)
                stop.wait(CATALOG_RETRY_S if missing else RETRY_S)
        except Exception as exc:
            log.warning("watch failed", extra={"resource": resource, "namespace": namespace, "error": str(exc)})
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
        idle_poll_s: float | None = None,
        timeout_s: float = 2.0,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.namespaces = namespaces
        self.label_selector = label_selector
        self.default_port = default_port
        self.fallback_interval_s = fallback_interval_s
        self.idle_poll_s = idle_poll_s
        self.timeout_s = timeout_s
        self.headers = headers or []

    async def run(self, state: FleetState, pool: Upstream) -> None:
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        view = ClusterView()
        import_kubernetes()

        def emit(resource: str, kind: str, namespace: str, payload: Any) -> None:
            loop.call_soon_threadsafe(
                lambda: apply_event(state, kind, namespace, payload, self.default_port, resource=resource, view=view)
            )

        threads = [
            threading.Thread(
                target=_watch, args=(resource, ns, selector, emit, stop), name=f"watch-{resource}-{ns}", daemon=True
            )
            for ns in self.namespaces
            for resource, selector in ((PODS, self.label_selector), (LEASES, LEASE_SELECTOR), (MODELGROUPS, ""))
        ]
        for t in threads:
            t.start()
        log.info("watching pod servers", extra={"namespaces": self.namespaces, "selector": self.label_selector})

        async def poll_unannotated() -> None:
            # A pod server that has not published its Lease yet (or does not publish) is still
            # served: its status document is read over HTTP instead.
            await poll_status_once(
                state, pool, self.timeout_s, self.headers, only_missing=True, idle_poll_s=self.idle_poll_s
            )

        try:
            await every(self.fallback_interval_s, poll_unannotated, "status poll (pods without a status lease)")
        finally:
            stop.set()
