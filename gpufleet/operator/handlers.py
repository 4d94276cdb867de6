"""kopf handlers: thin adapters from kopf's triggers to the Reconciler.

Triggers, all leading to the same level-triggered reconcile:
- create/update/resume of a ModelGroup or a GpuPool: reconcile now; a pooled ModelGroup's
  create, update and deletion also reconcile its pool (the pool's ConfigMap gains, changes
  or loses the group), and a GpuPool's reconcile refreshes the status of its groups;
- every resync_seconds, every ModelGroup and GpuPool again (resync_forever), so drift of any
  child (a hand-edited ConfigMap, a deleted Service) is put back even without an event; each
  at its own phase of the period (gpufleet.operator.resync), so a round is no burst;
- events of the StatefulSets we own: reconcile the owner at once (a deleted or edited
  StatefulSet comes back in seconds; its status changes update the owner's);
- events of pod-server pods and of their status Leases: refresh the owner's status
  (readiness, each pod server's own status document); for a pool's pods, the pool's status
  and that of every group bound to it.
Deleted pods are recreated by the StatefulSet controller; deleting a ModelGroup or GpuPool
removes its children through owner references (no finalizer, so it works with the operator
down; a deleted pooled group leaves its pool's files at the next reconcile of the pool).

At scale: every watch but the ModelGroups' and GpuPools' carries a server-side label selector
(only what we manage crosses the wire; kopf's handler `labels=` filters are client-side), and
kopf indexes keep the ModelGroups, the GpuPools and every child we own, so a reconcile reads those
(gpufleet.operator.cache) instead of GETs: a steady-state round makes no API call.

Errors: kopf.TemporaryError means "not yet" (API trouble, a name still taken), retried
with a delay; kopf.PermanentError means the spec is wrong, raised after the status says so.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
import urllib3
from kubernetes.client.exceptions import ApiException

from gpufleet.api import gpupool
from gpufleet.api import labels as keys
from gpufleet.operator.cache import IndexedReads, slim
from gpufleet.operator.kube import Kube
from gpufleet.operator.peering import is_active, peering_paths
from gpufleet.operator.reconcile import InvalidSpec, PoolResult, Reconciler, Result, pool_of
from gpufleet.operator.resync import schedule
from gpufleet.operator.scale_round import ScaleRound
from gpufleet.operator.scaler import scale_forever
from gpufleet.operator.settings import OperatorSettings
from gpufleet.operator.status import with_leases

log = logging.getLogger(__name__)

MODELGROUPS = (keys.API_GROUP, keys.API_VERSION, keys.PLURAL)
GPUPOOLS = (keys.API_GROUP, keys.API_VERSION, gpupool.PLURAL)
POD_SERVER_LABELS = {keys.LABEL_COMPONENT: keys.COMPONENT_POD_SERVER, keys.LABEL_MANAGED_BY: keys.MANAGED_BY}
OWNED_LABELS = {keys.LABEL_MANAGED_BY: keys.MANAGED_BY}
LEASE_LABELS = {keys.LABEL_COMPONENT: keys.COMPONENT_POD_SERVER}
LEASES = ("coordination.k8s.io", "v1", "leases")
# Every kind the operator creates for a ModelGroup: (apiVersion, kind) -> kopf resource.
CHILDREN: dict[tuple[str, str], tuple[str, str] | tuple[str, str, str]] = {
    ("v1", "ServiceAccount"): ("v1", "serviceaccounts"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("rbac.authorization.k8s.io", "v1", "rolebindings"),
    ("v1", "ConfigMap"): ("v1", "configmaps"),
    ("v1", "Service"): ("v1", "services"),
    ("policy/v1", "PodDisruptionBudget"): ("policy", "v1", "poddisruptionbudgets"),
    ("v1", "PersistentVolumeClaim"): ("v1", "persistentvolumeclaims"),
    ("apps/v1", "StatefulSet"): ("apps", "v1", "statefulsets"),
}


def child_index_id(kind: str) -> str:
    return f"owned_{kind.lower()}s"


def _selector(match: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(match.items()))


def server_side_selectors() -> list[tuple[tuple[str, str] | tuple[str, str, str], str]]:
    """Label selectors the API server applies to our watches (kopf's handler `labels=`
    filters are client-side: without these we would receive every pod, ConfigMap, Service
    ... in the cluster). Only the ModelGroups' and GpuPools' watches have none: they are all ours."""
    out: list[tuple[tuple[str, str] | tuple[str, str, str], str]] = [
        (("v1", "pods"), _selector(POD_SERVER_LABELS)),
        (LEASES, _selector(LEASE_LABELS)),
    ]
    out += [(resource, _selector(OWNED_LABELS)) for resource in CHILDREN.values()]
    return out


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


def _guarded(what: str, fn: Callable[[], Any]) -> Any:
    """Map failures to kopf's retry semantics."""
    try:
        return fn()
    except ApiException as exc:
        delay = 30 if exc.status in (401, 403) else 5
        raise kopf.TemporaryError(f"{what}: API server said {exc.status} {exc.reason}", delay=delay) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise kopf.TemporaryError(f"{what}: API server unreachable: {exc}", delay=5) from exc


@dataclass(frozen=True)
class Indexes:
    """kopf's live indexes, as handlers and the resync task receive them."""

    pod_servers: Any  # (namespace, group) -> slim pods of dedicated groups
    status_leases: Any  # (namespace, pod name) -> slim Lease
    pod_groups: Any  # (namespace, pod name) -> group
    reads: IndexedReads  # ModelGroups, GpuPools and children
    pool_pods: Any = field(default_factory=dict)  # (namespace, pool) -> slim pods of a GpuPool
    pod_pools: Any = field(default_factory=dict)  # (namespace, pod name) -> pool

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> Indexes:
        children = {kind: kwargs[child_index_id(kind[1])] for kind in CHILDREN}
        return cls(kwargs["pod_servers"], kwargs["status_leases"], kwargs["pod_groups"],
                   IndexedReads(children, kwargs["model_groups"], kwargs["gpu_pools"]),
                   kwargs["pool_pods"], kwargs["pod_pools"])

    def pods(self, namespace: str, group: str) -> list[dict[str, Any]]:
        return _pods(self.pod_servers, self.status_leases, namespace, group)

    def pods_of_pool(self, namespace: str, pool: str) -> list[dict[str, Any]]:
        return _pods(self.pool_pods, self.status_leases, namespace, pool)

    def pods_for(self, body: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The pods whose documents make a ModelGroup's status: its own, or its pool's."""
        meta = body["metadata"]
        pool = pool_of(body)
        return self.pods_of_pool(meta["namespace"], pool) if pool else self.pods(meta["namespace"], meta["name"])

    def bound(self, namespace: str, pool: str) -> list[dict[str, Any]]:
        """The ModelGroups of the namespace bound to the pool (not being deleted)."""
        return [
            dict(g)
            for g in self.reads.groups(namespace) or []
            if pool_of(g) == pool and not g["metadata"].get("deletionTimestamp")
        ]


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


def refresh_bound_groups(reconciler: Reconciler, indexes: Indexes, namespace: str, pool: str) -> None:
    """The status of every group bound to the pool (their pods are the pool's); one group's
    failure does not keep the others from theirs."""
    pods = indexes.pods_of_pool(namespace, pool)
    for group in indexes.bound(namespace, pool):
        try:
            result = reconciler.refresh_status(group, pods, indexes.reads)
            _post(reconciler.kube, group, result.events)
        except Exception as exc:
            log.warning("cannot refresh a pooled group", extra={"group": group["metadata"]["name"], "error": str(exc)})


def pool_round(
    reconciler: Reconciler, indexes: Indexes, namespace: str, pool: str, *, full: bool = True, groups: bool = True
) -> PoolResult | None:
    """Reconcile the pool (``full``: children and status; else status only), then refresh
    its groups' status (``groups``). A pool that does not exist (any more) has no round,
    but its groups learn it."""
    body = indexes.reads.pool(namespace, pool)
    if body is None or body["metadata"].get("deletionTimestamp"):
        if groups:
            refresh_bound_groups(reconciler, indexes, namespace, pool)
        return None
    body = dict(body)
    pods = indexes.pods_of_pool(namespace, pool)
    step = reconciler.reconcile_pool if full else reconciler.refresh_pool_status
    result: PoolResult = _guarded(f"reconciling GpuPool {namespace}/{pool}", lambda: step(body, pods, indexes.reads))
    _post(reconciler.kube, body, result.events)
    if groups:
        refresh_bound_groups(reconciler, indexes, namespace, pool)
    return result


async def _resync_pool(reconciler: Reconciler, indexes: Indexes, namespace: str, name: str) -> None:
    try:
        await asyncio.to_thread(pool_round, reconciler, indexes, namespace, name, groups=False)
    except Exception as exc:
        log.warning("resync failed", extra={"pool": name, "error": str(exc)})


async def _resync_one(reconciler: Reconciler, indexes: Indexes, namespace: str, name: str) -> None:
    body = indexes.reads.group(namespace, name)  # as of now, not as of the round's start
    if body is None or body["metadata"].get("deletionTimestamp"):
        return
    pods = indexes.pods_for(body)
    try:
        result = await asyncio.to_thread(reconciler.reconcile, dict(body), pods, indexes.reads)
        # Blocked groups stay blocked quietly: the status says why; events said it once.
        await asyncio.to_thread(_post, reconciler.kube, body, result.events)
    except Exception as exc:
        log.warning("resync failed", extra={"group": name, "error": str(exc)})


async def resync_forever(
    reconciler: Reconciler,
    settings: OperatorSettings,
    indexes: Indexes,
    identity: str = "",
    priority: int = 0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Every resync_seconds, reconcile every ModelGroup and GpuPool: drift of any child (a
    hand-edited ConfigMap, a deleted Service) is put back even when no event announced it.
    Each at its own phase of the period (spread, no burst), read from the watch caches (no
    API call when nothing changed). Kopf pauses its handlers in a standby replica, but not this
    task: it checks the peering itself, once per round."""
    period = settings.resync_seconds
    start = clock()
    while True:
        try:
            active = await asyncio.to_thread(acting, reconciler, settings, identity, priority)
        except Exception as exc:  # API trouble: try again next round
            log.warning("resync: cannot read the peering", extra={"error": str(exc)})
            active = False
        if active:
            due = sorted(
                [(offset, ns, name, False) for offset, ns, name in schedule(indexes.reads.group_keys(), period)]
                + [(offset, ns, name, True) for offset, ns, name in schedule(indexes.reads.pool_keys(), period)]
            )
            for offset, namespace, name, is_pool in due:
                await sleep(max(0.0, start + offset - clock()))
                if is_pool:
                    await _resync_pool(reconciler, indexes, namespace, name)
                else:
                    await _resync_one(reconciler, indexes, namespace, name)
        # The next round starts one period after this one did; a round that ran late
        # (slow API) is not made up for with a burst.
        start = max(start + period, clock())
        await sleep(max(0.0, start - clock()))


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler, settings: OperatorSettings) -> None:
    operator_settings = settings
    indexed = threading.Event()  # set by the first handler kopf calls: every index is complete

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> Any:
        # The same credentials as our own client: the in-cluster ServiceAccount, else KUBECONFIG.
        return kopf.login_via_client(**kwargs)

    # The indexes are async (no I/O, a few dict operations): kopf runs sync handlers in its
    # thread pool, where they would queue behind a backlog of reconciles (1,000 new groups)
    # and every cached read would lag the cluster by that backlog.
    @kopf.index("v1", "pods", id="pod_servers", labels=POD_SERVER_LABELS, registry=registry)
    async def pod_servers(namespace: str | None, labels: Mapping[str, str], body: Any, **_: Any) -> Any:
        group = labels.get(keys.LABEL_MODEL_GROUP)
        return {(namespace, group): _slim_pod(body)} if group else None

    @kopf.index("v1", "pods", id="pod_groups", labels=POD_SERVER_LABELS, registry=registry)
    async def pod_groups(namespace: str | None, name: str, labels: Mapping[str, str], **_: Any) -> Any:
        group = labels.get(keys.LABEL_MODEL_GROUP)
        return {(namespace, name): group} if group else None

    @kopf.index("v1", "pods", id="pool_pods", labels=POD_SERVER_LABELS, registry=registry)
    async def pool_pods(namespace: str | None, labels: Mapping[str, str], body: Any, **_: Any) -> Any:
        pool = labels.get(keys.LABEL_POOL)
        return {(namespace, pool): _slim_pod(body)} if pool else None

    @kopf.index("v1", "pods", id="pod_pools", labels=POD_SERVER_LABELS, registry=registry)
    async def pod_pools(namespace: str | None, name: str, labels: Mapping[str, str], **_: Any) -> Any:
        pool = labels.get(keys.LABEL_POOL)
        return {(namespace, name): pool} if pool else None

    @kopf.index(*LEASES, id="status_leases", labels=LEASE_LABELS, registry=registry)
    async def status_leases(namespace: str | None, name: str, body: Any, **_: Any) -> Any:
        return {(namespace, name): _slim_lease(body)}

    @kopf.index(*MODELGROUPS, id="model_groups", registry=registry)
    async def model_groups(namespace: str | None, name: str, body: Any, **_: Any) -> Any:
        group = slim(body)  # one object under both keys
        return {namespace: group, (namespace, name): group}

    @kopf.index(*GPUPOOLS, id="gpu_pools", registry=registry)
    async def gpu_pools(namespace: str | None, name: str, body: Any, **_: Any) -> Any:
        pool = slim(body)
        return {namespace: pool, (namespace, name): pool}

    def index_children(kind: str, resource: tuple[str, ...]) -> None:
        async def owned(namespace: str | None, name: str, body: Any, **_: Any) -> Any:
            return {(namespace, name): slim(body)}

        kopf.index(*resource, id=child_index_id(kind), labels=OWNED_LABELS, registry=registry)(owned)

    for (_, kind), resource in CHILDREN.items():
        index_children(kind, resource)

    def reconcile(body: Any, indexes: Indexes) -> None:
        meta = body["metadata"]
        pods = indexes.pods_for(body)
        result: Result = _guarded(
            f"reconciling {meta['namespace']}/{meta['name']}",
            lambda: reconciler.reconcile(dict(body), pods, indexes.reads),
        )
        _post(reconciler.kube, body, result.events)
        if result.blocked is not None:
            if isinstance(result.blocked, InvalidSpec):
                raise kopf.PermanentError(str(result.blocked))
            raise kopf.TemporaryError(str(result.blocked), delay=15)

    @kopf.on.resume(*MODELGROUPS, id="reconcile", registry=registry)
    @kopf.on.create(*MODELGROUPS, id="reconcile", registry=registry)
    @kopf.on.update(*MODELGROUPS, id="reconcile", registry=registry)
    def modelgroup_changed(body: Any, **kwargs: Any) -> None:
        indexed.set()
        indexes = Indexes.from_kwargs(kwargs)
        pool = pool_of(body)
        if pool:  # the pool's files gain or change the group first (status: the pool's other groups)
            pool_round(reconciler, indexes, body["metadata"]["namespace"], pool, groups=False)
        reconcile(body, indexes)

    # Deleting a pooled group takes it out of its pool's files (no finalizer: a deletion
    # while the operator is down is caught up by the pool's next reconcile).
    @kopf.on.event(*MODELGROUPS, id="pooled-group-deleted", registry=registry)
    def modelgroup_event(event: Mapping[str, Any], body: Any, namespace: str | None, **kwargs: Any) -> None:
        indexed.set()
        pool = pool_of(body)
        if event.get("type") == "DELETED" and pool and namespace is not None:
            pool_round(reconciler, Indexes.from_kwargs(kwargs), namespace, pool, groups=False)

    @kopf.on.resume(*GPUPOOLS, id="reconcile-pool", registry=registry)
    @kopf.on.create(*GPUPOOLS, id="reconcile-pool", registry=registry)
    @kopf.on.update(*GPUPOOLS, id="reconcile-pool", registry=registry)
    def gpupool_changed(body: Any, **kwargs: Any) -> None:
        indexed.set()
        meta = body["metadata"]
        result = pool_round(reconciler, Indexes.from_kwargs(kwargs), meta["namespace"], meta["name"])
        if result is not None and result.blocked is not None:
            if isinstance(result.blocked, InvalidSpec):
                raise kopf.PermanentError(str(result.blocked))
            raise kopf.TemporaryError(str(result.blocked), delay=15)

    # A deleted pool: its groups say so (PoolNotFound); its children go with it (owner references).
    @kopf.on.event(*GPUPOOLS, id="pool-deleted", registry=registry)
    def gpupool_event(event: Mapping[str, Any], namespace: str | None, name: str, **kwargs: Any) -> None:
        indexed.set()
        if event.get("type") == "DELETED" and namespace is not None:
            refresh_bound_groups(reconciler, Indexes.from_kwargs(kwargs), namespace, name)

    # The periodic re-check is our own task, not a kopf timer: kopf puts a finalizer on every
    # object with a timer, and a finalizer would make deleting a ModelGroup (or its namespace)
    # hang whenever the operator is not running. kopf hands the (live) indexes to startup
    # handlers too; they are still filling then, so the task waits until kopf has called a
    # handler of ours: kopf calls none before every index is complete.
    @kopf.on.startup(id="start-resync", registry=registry)
    async def start_resync(memo: Any, settings: kopf.OperatorSettings, **kwargs: Any) -> None:
        identity, priority = str(memo.peering_identity), int(settings.peering.priority)
        indexes = Indexes.from_kwargs(kwargs)

        async def after_indexing() -> None:
            while not indexed.is_set():
                await asyncio.sleep(0.5)
            await resync_forever(reconciler, operator_settings, indexes, identity, priority)

        memo.resync = asyncio.create_task(after_indexing(), name="resync")
        if operator_settings.demand_urls:
            memo.scaler = asyncio.create_task(start_scaler(identity, priority, indexes), name="scaler")
        else:
            log.info("no GPUFLEET_OPERATOR_DEMAND_URLS: residency and spec.autoscaling do not follow demand")

    async def start_scaler(identity: str, priority: int, indexes: Indexes) -> None:
        while not indexed.is_set():
            await asyncio.sleep(0.5)

        async def reconcile_pool(namespace: str, name: str) -> None:
            await asyncio.to_thread(pool_round, reconciler, indexes, namespace, name)

        async def reconcile_group(namespace: str, name: str) -> None:
            await _resync_one(reconciler, indexes, namespace, name)

        async def post(body: dict[str, Any], events: list[tuple[str, str, str]]) -> None:
            await asyncio.to_thread(_post, reconciler.kube, body, events)

        async def is_acting() -> bool:
            return await asyncio.to_thread(acting, reconciler, operator_settings, identity, priority)

        one_round = ScaleRound(reconciler, indexes.reads, indexes.pods_of_pool, reconcile_pool, reconcile_group, post)
        await scale_forever(operator_settings.autoscale_seconds, operator_settings.demand_urls, one_round, is_acting)

    @kopf.on.cleanup(id="stop-resync", registry=registry)
    async def stop_resync(memo: Any, **_: Any) -> None:
        for task in (getattr(memo, "resync", None), getattr(memo, "scaler", None)):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def owner(body: Any, kind: str) -> str | None:
        for ref in body.get("metadata", {}).get("ownerReferences") or []:
            if ref.get("kind") == kind and ref.get("apiVersion", "").startswith(keys.API_GROUP + "/"):
                return str(ref.get("name"))
        return None

    def cached_group(indexes: Indexes, namespace: str, name: str | None) -> dict[str, Any] | None:
        group = indexes.reads.group(namespace, name) if name else None
        if group is None or group["metadata"].get("deletionTimestamp"):
            return None
        return dict(group)

    @kopf.on.event("apps", "v1", "statefulsets", id="statefulset", labels=OWNED_LABELS, registry=registry)
    def statefulset_changed(body: Any, namespace: str | None, **kwargs: Any) -> None:
        indexed.set()
        if namespace is None:  # StatefulSets are namespaced; this only narrows the type
            return
        indexes = Indexes.from_kwargs(kwargs)
        pool = owner(body, gpupool.KIND)
        if pool is not None:
            pool_round(reconciler, indexes, namespace, pool, groups=False)
            return
        name = owner(body, keys.KIND)
        group = cached_group(indexes, namespace, name)
        if group is None:
            return
        pods = indexes.pods(namespace, group["metadata"]["name"])
        result = _guarded(f"reconciling {namespace}/{name}", lambda: reconciler.reconcile(group, pods, indexes.reads))
        _post(reconciler.kube, group, result.events)

    def refresh(namespace: str, name: str | None, indexes: Indexes) -> None:
        group = cached_group(indexes, namespace, name)
        if group is None:
            return
        pods = indexes.pods(namespace, group["metadata"]["name"])
        result = _guarded(
            f"status of {namespace}/{name}", lambda: reconciler.refresh_status(group, pods, indexes.reads)
        )
        _post(reconciler.kube, group, result.events)

    @kopf.on.event("v1", "pods", id="pod", labels=POD_SERVER_LABELS, registry=registry)
    def pod_changed(namespace: str | None, labels: Mapping[str, str], **kwargs: Any) -> None:
        indexed.set()
        if namespace is None:  # Pods are namespaced; this only narrows the type
            return
        indexes = Indexes.from_kwargs(kwargs)
        pool = labels.get(keys.LABEL_POOL)
        if pool:
            pool_round(reconciler, indexes, namespace, pool, full=False)
            return
        refresh(namespace, labels.get(keys.LABEL_MODEL_GROUP), indexes)

    @kopf.on.event(*LEASES, id="status-lease", labels=LEASE_LABELS, registry=registry)
    def lease_changed(namespace: str | None, name: str, **kwargs: Any) -> None:
        indexed.set()
        if namespace is None:  # Leases are namespaced; this only narrows the type
            return
        # The Lease is named like its pod; the pod's labels name the group or the pool.
        indexes = Indexes.from_kwargs(kwargs)
        key = (namespace, name)
        for pool in indexes.pod_pools.get(key, ()):
            pool_round(reconciler, indexes, namespace, pool, full=False)
            return
        for group in indexes.pod_groups.get(key, ()):
            refresh(namespace, group, indexes)
            return
