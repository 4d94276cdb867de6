"""kopf handlers: thin adapters from kopf's triggers to the Reconciler.

Triggers, all leading to the same level-triggered reconcile:
- create/update/resume of a ModelGroup: reconcile now;
- every resync_seconds, every ModelGroup again (resync_forever), so drift of any child (a
  hand-edited ConfigMap, a deleted Service) is put back even without an event;
- events of the StatefulSets we own: reconcile the owner at once (a deleted or edited
  StatefulSet comes back in seconds; its status changes update the group's);
- events of pod-server pods and of their status Leases: refresh the owner's status
  (readiness, each pod server's own status document).
Deleted pods are recreated by the StatefulSet controller; deleting a ModelGroup removes
its children through owner references (no finalizer, so it works with the operator down).

Errors: kopf.TemporaryError means "not yet" (API trouble, a name still taken), retried
with a delay; kopf.PermanentError means the spec is wrong, raised after the status says so.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import kopf
import urllib3
from kubernetes.client.exceptions import ApiException

from gpufleet.api import labels as keys
from gpufleet.operator.kube import Kube
from gpufleet.operator.peering import is_active, peering_paths
from gpufleet.operator.reconcile import InvalidSpec, Reconciler, Result, group_path
from gpufleet.operator.settings import OperatorSettings
from gpufleet.operator.status import with_leases

log = logging.getLogger(__name__)

MODELGROUPS = (keys.API_GROUP, keys.API_VERSION, keys.PLURAL)
POD_SERVER_LABELS = {keys.LABEL_COMPONENT: keys.COMPONENT_POD_SERVER, keys.LABEL_MANAGED_BY: keys.MANAGED_BY}
OWNED_LABELS = {keys.LABEL_MANAGED_BY: keys.MANAGED_BY}
LEASE_LABELS = {keys.LABEL_COMPONENT: keys.COMPONENT_POD_SERVER}
LEASES = ("coordination.k8s.io", "v1", "leases")


def _selector(match: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(match.items()))


def server_side_selectors() -> list[tuple[tuple[str, str] | tuple[str, str, str], str]]:
    """Label selectors the API server applies to our watches (kopf's handler `labels=`
    filters are client-side: without these we would receive every pod in the cluster)."""
    return [
        (("v1", "pods"), _selector(POD_SERVER_LABELS)),
        (("apps", "v1", "statefulsets"), _selector(OWNED_LABELS)),
        (LEASES, _selector(LEASE_LABELS)),
    ]


def kopf_settings(settings: OperatorSettings) -> kopf.OperatorSettings:
    s = kopf.OperatorSettings()
    # kopf's own bookkeeping goes into annotations under our domain, not into our status.
    s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=keys.OPERATOR_STATE_PREFIX)
    s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=keys.OPERATOR_STATE_PREFIX, key="last-handled-configuration"
    )
    s.persistence.finalizer = f"{keys.OPERATOR_STATE_PREFIX}/finalizer"  # unused: no deletion handlers
    # Events are for users: ours, plus kopf's warnings (e.g. a handler failing), not its chatter.
    s.posting.level = logging.WARNING
    s.execution.max_workers = 8
    for key, selector in server_side_selectors():
        s.watching.label_selectors[key] = selector
    if settings.peering:
        # Several replicas: only the one with the highest priority acts, the others wait
        # (kopf's KopfPeering objects); each replica's priority is random (equal priorities
        # would both act), so a restarted replica may take over or wait.
        s.peering.name = settings.peering
        s.peering.priority = random.randint(1, 1_000_000_000)
        s.peering.mandatory = True
        s.peering.clusterwide = not settings.namespaces
    if settings.namespaces:
        # Only the named namespaces: no need to list namespaces or watch CRDs cluster-wide
        # (which the namespaced RBAC does not allow). The CRD must exist when we start.
        s.scanning.disabled = True
    return s


def _post(kube: Kube, body: Any, events: Iterable[tuple[str, str, str]]) -> None:
    """Events for users; losing one must not fail a reconcile."""
    for kind, reason, message in events:
        try:
            kube.post_event(dict(body), kind, reason, message)
        except Exception as exc:
            log.warning("cannot post event", extra={"reason": reason, "error": str(exc)})


def _slim_pod(body: Any) -> dict[str, Any]:
    """What status.py reads from a pod: kept in the index instead of whole pods."""
    meta, status = body.get("metadata", {}), body.get("status", {})
    annotations = meta.get("annotations") or {}
    return {
        "metadata": {
            "name": meta.get("name"),
            "uid": meta.get("uid"),
            "deletionTimestamp": meta.get("deletionTimestamp"),
            "annotations": {k: v for k, v in annotations.items() if k == keys.STATUS_ANNOTATION},
        },
        "spec": {"nodeName": body.get("spec", {}).get("nodeName")},
        "status": {
            "conditions": list(status.get("conditions") or []),
            "containerStatuses": list(status.get("containerStatuses") or []),
        },
    }


def _slim_lease(body: Any) -> dict[str, Any]:
    meta = body.get("metadata", {})
    annotations = meta.get("annotations") or {}
    return {
        "metadata": {
            "name": meta.get("name"),
            "ownerReferences": list(meta.get("ownerReferences") or []),
            "annotations": {k: v for k, v in annotations.items() if k == keys.STATUS_ANNOTATION},
        }
    }


def _pods(index: Any, leases: Any, namespace: str, group: str) -> list[dict[str, Any]]:
    pods = list(index.get((namespace, group), ()))
    own = {}
    for pod in pods:
        name = pod["metadata"]["name"]
        for lease in leases.get((namespace, name), ()):
            own[name] = lease
    return with_leases(pods, own)


def _guarded(what: str, fn: Callable[[], Result]) -> Result:
    """Map failures to kopf's retry semantics."""
    try:
        return fn()
    except ApiException as exc:
        delay = 30 if exc.status in (401, 403) else 5
        raise kopf.TemporaryError(f"{what}: API server said {exc.status} {exc.reason}", delay=delay) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise kopf.TemporaryError(f"{what}: API server unreachable: {exc}", delay=5) from exc


def list_groups(reconciler: Reconciler, namespaces: list[str]) -> list[dict[str, Any]]:
    base = f"/apis/{keys.API_GROUP}/{keys.API_VERSION}"
    paths = [f"{base}/namespaces/{ns}/{keys.PLURAL}" for ns in namespaces] or [f"{base}/{keys.PLURAL}"]
    return [item for path in paths for item in reconciler.kube.list(path)]


def acting(reconciler: Reconciler, settings: OperatorSettings, identity: str, priority: int) -> bool:
    """Whether this replica is the acting one (always, without peering)."""
    if not settings.peering:
        return True
    now = datetime.datetime.now(datetime.UTC)
    for path in peering_paths(settings.peering, settings.namespaces):
        obj = reconciler.kube.get(path)
        if obj is None or not is_active(obj.get("status"), identity, priority, now):
            return False
    return True


async def resync_forever(
    reconciler: Reconciler, settings: OperatorSettings, identity: str = "", priority: int = 0
) -> None:
    """Every resync_seconds, reconcile every ModelGroup: drift of any child (a hand-edited
    ConfigMap, a deleted Service) is put back even when no event announced it. Kopf pauses
    its handlers in a standby replica, but not this task: it checks the peering itself."""
    while True:
        await asyncio.sleep(settings.resync_seconds)
        try:
            if not await asyncio.to_thread(acting, reconciler, settings, identity, priority):
                continue
        except Exception as exc:  # API trouble: try again next round
            log.warning("resync: cannot read the peering", extra={"error": str(exc)})
            continue
        try:
            groups = await asyncio.to_thread(list_groups, reconciler, settings.namespaces)
        except Exception as exc:  # API trouble: try again next round
            log.warning("resync: cannot list ModelGroups", extra={"error": str(exc)})
            continue
        for body in groups:
            if body["metadata"].get("deletionTimestamp"):
                continue
            try:
                result = await asyncio.to_thread(reconciler.reconcile, body)
                # Blocked groups stay blocked quietly: the status says why; events said it once.
                await asyncio.to_thread(_post, reconciler.kube, body, result.events)
            except Exception as exc:
                log.warning("resync failed", extra={"group": body["metadata"]["name"], "error": str(exc)})


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler, settings: OperatorSettings) -> None:
    operator_settings = settings

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> Any:
        # The same credentials as our own client: the in-cluster ServiceAccount, else KUBECONFIG.
        return kopf.login_via_client(**kwargs)

    @kopf.index("v1", "pods", id="pod_servers", labels=POD_SERVER_LABELS, registry=registry)
    def pod_servers(namespace: str | None, labels: Mapping[str, str], body: Any, **_: Any) -> Any:
        group = labels.get(keys.LABEL_MODEL_GROUP)
        return {(namespace, group): _slim_pod(body)} if group else None

    @kopf.index(*LEASES, id="status_leases", labels=LEASE_LABELS, registry=registry)
    def status_leases(namespace: str | None, name: str, body: Any, **_: Any) -> Any:
        return {(namespace, name): _slim_lease(body)}

    def reconcile(body: Any, pod_servers: Any, status_leases: Any) -> None:
        meta = body["metadata"]
        pods = _pods(pod_servers, status_leases, meta["namespace"], meta["name"])
        result = _guarded(
            f"reconciling {meta['namespace']}/{meta['name']}", lambda: reconciler.reconcile(dict(body), pods)
        )
        _post(reconciler.kube, body, result.events)
        if result.blocked is not None:
            if isinstance(result.blocked, InvalidSpec):
                raise kopf.PermanentError(str(result.blocked))
            raise kopf.TemporaryError(str(result.blocked), delay=15)

    @kopf.on.resume(*MODELGROUPS, id="reconcile", registry=registry)
    @kopf.on.create(*MODELGROUPS, id="reconcile", registry=registry)
    @kopf.on.update(*MODELGROUPS, id="reconcile", registry=registry)
    def modelgroup_changed(body: Any, pod_servers: Any = None, status_leases: Any = None, **_: Any) -> None:
        reconcile(body, pod_servers, status_leases)

    # The periodic re-check is our own task, not a kopf timer: kopf puts a finalizer on every
    # object with a timer, and a finalizer would make deleting a ModelGroup (or its namespace)
    # hang whenever the operator is not running.
    @kopf.on.startup(id="start-resync", registry=registry)
    async def start_resync(memo: Any, settings: kopf.OperatorSettings, **_: Any) -> None:
        identity, priority = str(memo.peering_identity), int(settings.peering.priority)
        memo.resync = asyncio.create_task(
            resync_forever(reconciler, operator_settings, identity, priority), name="resync"
        )

    @kopf.on.cleanup(id="stop-resync", registry=registry)
    async def stop_resync(memo: Any, **_: Any) -> None:
        task = getattr(memo, "resync", None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def owner_group(body: Any) -> str | None:
        for ref in body.get("metadata", {}).get("ownerReferences") or []:
            if ref.get("kind") == keys.KIND and ref.get("apiVersion", "").startswith(keys.API_GROUP + "/"):
                return str(ref.get("name"))
        return None

    def fetch_group(namespace: str, name: str) -> dict[str, Any] | None:
        return reconciler.kube.get(group_path(namespace, name))

    @kopf.on.event("apps", "v1", "statefulsets", id="statefulset", labels=OWNED_LABELS, registry=registry)
    def statefulset_changed(
        body: Any, namespace: str | None, pod_servers: Any = None, status_leases: Any = None, **_: Any
    ) -> None:
        name = owner_group(body)
        if namespace is None:  # StatefulSets are namespaced; this only narrows the type
            return
        group = fetch_group(namespace, name) if name else None
        if group is None or group["metadata"].get("deletionTimestamp"):
            return
        pods = _pods(pod_servers, status_leases, namespace, group["metadata"]["name"])
        result = _guarded(f"reconciling {namespace}/{name}", lambda: reconciler.reconcile(group, pods))
        _post(reconciler.kube, group, result.events)

    def refresh(namespace: str, name: str | None, pod_servers: Any, status_leases: Any) -> None:
        group = fetch_group(namespace, name) if name else None
        if group is None or group["metadata"].get("deletionTimestamp"):
            return
        pods = _pods(pod_servers, status_leases, namespace, group["metadata"]["name"])
        result = _guarded(f"status of {namespace}/{name}", lambda: reconciler.refresh_status(group, pods))
        _post(reconciler.kube, group, result.events)

    @kopf.on.event("v1", "pods", id="pod", labels=POD_SERVER_LABELS, registry=registry)
    def pod_changed(
        namespace: str | None, labels: Mapping[str, str], pod_servers: Any = None, status_leases: Any = None, **_: Any
    ) -> None:
        if namespace is None:  # Pods are namespaced; this only narrows the type
            return
        refresh(namespace, labels.get(keys.LABEL_MODEL_GROUP), pod_servers, status_leases)

    @kopf.on.event(*LEASES, id="status-lease", labels=LEASE_LABELS, registry=registry)
    def lease_changed(
        namespace: str | None, name: str, pod_servers: Any = None, status_leases: Any = None, **_: Any
    ) -> None:
        if namespace is None or pod_servers is None:  # Leases are namespaced; this only narrows the type
            return
        # The Lease is named like its pod; the pod's labels name the group.
        for (ns, group), pods in pod_servers.items():
            if ns == namespace and any(p["metadata"]["name"] == name for p in pods):
                refresh(namespace, group, pod_servers, status_leases)
                return
