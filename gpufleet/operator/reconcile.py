"""Level-triggered reconciliation of one ModelGroup or GpuPool: make the children match the
spec, then write what is observed into the status.

A dedicated ModelGroup owns its pod servers. A GpuPool owns pod servers for every ModelGroup
of its namespace whose ``spec.pool`` names it: its ConfigMap lists them (and where the
placement keeps them), and changes with them without restarting the pods. A pooled
ModelGroup owns nothing: its reconcile only writes its status, from the pool's pods.

No kopf here (handlers.py maps outcomes to kopf's retry semantics) and no decisions of its
own: manifests come from builders.py, the status from status.py, drift from drift.py.
Every step reads the actual state first, so running it again, from any handler, at any
time, converges to the same result and writes nothing when nothing differs.

Reads come from the watch caches when the caller passes them (``Observed``, see
gpufleet.operator.cache), else from the API server: a steady-state reconcile then makes no
API call at all.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from gpufleet.api import gpupool, labels
from gpufleet.api.gpupool import GpuPoolSpec, GpuPoolStatus, GroupResidency
from gpufleet.api.model_groups import groups_digest
from gpufleet.api.modelgroup import Condition, ConditionType, ModelGroupSpec, ModelGroupStatus
from gpufleet.api.placement import PLACEMENT_FILE, PoolPlacement
from gpufleet.operator.builders import (
    MODEL_GROUPS_FILE,
    BoundGroup,
    BuildOptions,
    ModelGroupRef,
    PodServerOwner,
    PoolRef,
    build_children,
    child_names,
    pool_selector_string,
    quantity_gb,
    selector_string,
)
from gpufleet.operator.cache import Observed, RecentWrites
from gpufleet.operator.conflicts import claimed_earlier, conflict_message
from gpufleet.operator.drift import drift
from gpufleet.operator.kube import Kube, manifest_path, object_path
from gpufleet.operator.metrics import OperatorMetrics
from gpufleet.operator.placement import GroupDemand, place
from gpufleet.operator.pool_status import compute_pool_status, compute_pooled_status, observed_placement
from gpufleet.operator.scale_book import ScaleBook
from gpufleet.operator.status import compute_status, condition_events, pod_view, status_body, with_leases

log = logging.getLogger(__name__)

Event = tuple[str, str, str]  # (type, reason, message)
LEASE_SELECTOR = f"{labels.LABEL_COMPONENT}={labels.COMPONENT_POD_SERVER}"  # pod servers' status Leases


class Blocked(Exception):
    """Reconciliation cannot go on until something changes; the status says why."""

    reason = "Blocked"


class InvalidSpec(Blocked):
    """The spec cannot be served as written (a user must change it)."""

    reason = "InvalidSpec"


class ModelIdConflict(Blocked):
    """Every model id of this ModelGroup is served by an earlier one in the namespace."""

    reason = "ModelIdConflict"


class NotOwned(Blocked):
    """A child's name is taken by an object this owner does not own (may clear by itself,
    e.g. while the children of a deleted ModelGroup of the same name are garbage collected)."""

    reason = "NameConflict"


@dataclass
class Result:
    events: list[Event] = field(default_factory=list)
    status: ModelGroupStatus | None = None
    blocked: Blocked | None = None


@dataclass
class PoolResult:
    events: list[Event] = field(default_factory=list)
    status: GpuPoolStatus | None = None
    blocked: Blocked | None = None
    groups: list[str] = field(default_factory=list)  # every ModelGroup bound to the pool (served or not)


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def group_path(namespace: str, name: str) -> str:
    return f"/apis/{labels.API_GROUP}/{labels.API_VERSION}/namespaces/{namespace}/{labels.PLURAL}/{name}"


def pool_path(namespace: str, name: str) -> str:
    return f"/apis/{labels.API_GROUP}/{labels.API_VERSION}/namespaces/{namespace}/{gpupool.PLURAL}/{name}"


def pool_of(body: Mapping[str, Any]) -> str | None:
    """The GpuPool a ModelGroup is bound to (spec.pool), if pooled."""
    pool = (body.get("spec") or {}).get("pool")
    return str(pool) if pool else None


def _problem(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "spec"
    return f"spec.{where}: {first['msg']}"


def parse_spec(body: dict[str, Any], defaults: Mapping[str, Any] | None = None) -> ModelGroupSpec:
    """The spec, with the installation's defaults for the pod-template fields it does not set
    (none for a pooled group: it has no pods, and its validator refuses pod fields)."""
    spec = body.get("spec") or {}
    try:
        return ModelGroupSpec.model_validate({**({} if spec.get("pool") else defaults or {}), **spec})
    except ValidationError as exc:
        raise InvalidSpec(_problem(exc)) from None


def parse_pool_spec(body: dict[str, Any], defaults: Mapping[str, Any] | None = None) -> GpuPoolSpec:
    """The GpuPool's spec, with the installation's defaults as for a dedicated group."""
    try:
        spec = GpuPoolSpec.model_validate({**(defaults or {}), **(body.get("spec") or {})})
    except ValidationError as exc:
        raise InvalidSpec(_problem(exc)) from None
    for where, value in (("hostCache.size", spec.host_cache.size), ("kvCache", spec.kv_cache)):
        if value is not None:
            try:
                quantity_gb(value)
            except ValueError as exc:
                raise InvalidSpec(f"spec.{where}: {exc}") from None
    return spec


def bound_groups(
    pool: str, groups: list[dict[str, Any]]
) -> tuple[list[BoundGroup], dict[str, str], dict[str, str]]:
    """The ModelGroups of a namespace bound to ``pool``: (served, refused -> why, partly
    conflicting -> message). A group is refused when its spec is invalid or an earlier group
    keeps every one of its model ids; one that keeps some serves the others (as a dedicated
    group does), so the pool's model_groups.json never names an id twice."""
    served: list[BoundGroup] = []
    refused: dict[str, str] = {}
    partial: dict[str, str] = {}
    for body in sorted(groups, key=lambda b: str(b["metadata"]["name"])):
        meta = body["metadata"]
        if pool_of(body) != pool or meta.get("deletionTimestamp"):
            continue
        name = str(meta["name"])
        try:
            spec = parse_spec(body)
        except InvalidSpec as exc:
            refused[name] = str(exc)
            continue
        conflicts = claimed_earlier(body, groups)
        if conflicts:
            kept = [m for m in spec.models if m.id not in conflicts]
            if not kept:
                refused[name] = conflict_message(conflicts)
                continue
            partial[name] = conflict_message(conflicts)
            spec = spec.model_copy(update={"models": kept})
        served.append(BoundGroup(name, spec))
    return served, refused, partial


def configmap_state(cm: dict[str, Any] | None) -> tuple[PoolPlacement, str | None]:
    """The placement in force and the hash of the model_groups.json, as a pool's ConfigMap holds them."""
    data = (cm or {}).get("data") or {}
    try:
        placement = PoolPlacement.model_validate_json(data.get(PLACEMENT_FILE) or "{}")
    except ValidationError:
        placement = PoolPlacement()
    text = data.get(MODEL_GROUPS_FILE)
    return placement, groups_digest(text.encode()) if text is not None else None


def previous_status(body: dict[str, Any]) -> ModelGroupStatus | None:
    try:
        return ModelGroupStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return None


def previous_pool_status(body: dict[str, Any]) -> GpuPoolStatus | None:
    try:
        return GpuPoolStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return None


AnyStatus = TypeVar("AnyStatus", ModelGroupStatus, GpuPoolStatus)


def blocked_status(body: dict[str, Any], reason: str, message: str, now: str) -> ModelGroupStatus:
    """Status while reconciliation is blocked: Degraded with the reason, not Ready."""
    pool = pool_of(body)
    selector = pool_selector_string(pool) if pool else selector_string(body["metadata"]["name"])
    return _blocked(previous_status(body) or ModelGroupStatus(), body, selector, reason, message, now)


def _blocked(
    before: AnyStatus, body: dict[str, Any], selector: str, reason: str, message: str, now: str
) -> AnyStatus:
    meta = body["metadata"]
    old = {c.type: c for c in before.conditions}
    generation = meta.get("generation")

    def cond(kind: ConditionType, status: str, reason: str, msg: str) -> Condition:
        prior = old.get(kind)
        since = prior.last_transition_time if prior is not None and prior.status == status else now
        return Condition.model_validate(
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": msg,
                "lastTransitionTime": since,
                "observedGeneration": generation,
            }
        )

    return before.model_copy(
        update={
            "observed_generation": generation,
            "selector": selector,
            "conditions": [
                cond("Ready", "False", reason, message),
                cond("Progressing", "False", reason, "blocked until this is resolved"),
                cond("Degraded", "True", reason, message),
            ],
        }
    )


_Spec = TypeVar("_Spec", ModelGroupSpec, GpuPoolSpec)


class Reconciler:
    def __init__(self, kube: Kube, options: BuildOptions, metrics: OperatorMetrics | None = None) -> None:
        self.kube = kube
        self.options = options
        self.metrics = metrics or OperatorMetrics()
        self.recent = RecentWrites()  # our writes, until the watch caches show them
        self._locks: defaultdict[tuple[str, str, str], threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        self.book = ScaleBook()  # what the scaler decided (gpufleet.operator.scaler)

    def _lock(self, namespace: str, name: str, kind: str = labels.KIND) -> threading.Lock:
        with self._locks_guard:
            return self._locks[(kind, namespace, name)]

    # ---- entry points --------------------------------------------------------------------

    def reconcile(
        self, body: dict[str, Any], pods: list[dict[str, Any]] | None = None, reads: Observed | None = None
    ) -> Result:
        """Children to the spec, then status to what is observed.

        When blocked (invalid spec, a name taken), the status says why and result.blocked
        holds the reason; API failures raise ApiException. A pooled group has no children:
        its status comes from its pool's pods (``pods``: those, when the caller has them)."""
        meta = body["metadata"]
        with self._lock(meta["namespace"], meta["name"]), self.metrics.reconcile_seconds.labels("full").time():
            body = self._fresh(body)
            result = Result()
            try:
                conflicts = self._conflicts(body, reads)
                ref = self._ref(body, conflicts)
                if ref.spec.pool is not None:
                    self._update_pooled_status(body, ref.spec, pods, result, reads, conflicts)
                    return result
                scaled = self.scaled_spec(ref.spec, labels.KIND, ref.namespace, ref.name, reads)
                ref = dataclasses.replace(ref, spec=scaled)
                statefulset = self.ensure_children(ref, result.events, reads)
            except Blocked as exc:
                result.blocked = exc
                status = blocked_status(body, exc.reason, str(exc), now_rfc3339())
                result.events.extend(condition_events(previous_status(body), status))
                self._write_status(body, status, result)
                return result
            self._update_status(body, ref.spec, statefulset, pods, result, conflicts)
            return result

    def refresh_status(
        self, body: dict[str, Any], pods: list[dict[str, Any]] | None = None, reads: Observed | None = None
    ) -> Result:
        """Status only (on pod changes): no writes to children."""
        meta = body["metadata"]
        with self._lock(meta["namespace"], meta["name"]), self.metrics.reconcile_seconds.labels("status").time():
            body = self._fresh(body)
            result = Result()
            try:
                conflicts = self._conflicts(body, reads)
                spec = self._ref(body, conflicts).spec
            except Blocked:
                return result  # the spec handlers own that status
            if spec.pool is not None:
                self._update_pooled_status(body, spec, pods, result, reads, conflicts)
                return result
            names = child_names(meta["name"])
            sts = self.read(object_path("apps/v1", "StatefulSet", meta["namespace"], names.statefulset), reads,
                            ("apps/v1", "StatefulSet", meta["namespace"], names.statefulset))
            self._update_status(body, spec, sts, pods, result, conflicts)
            return result

    # ---- reads ---------------------------------------------------------------------------

    def _fresh(self, body: dict[str, Any], path: Any = group_path) -> dict[str, Any]:
        """The ModelGroup (or GpuPool) with the status we last wrote, if the caller's copy predates it."""
        meta = body["metadata"]
        fresh: dict[str, Any] = self.recent.fresh(path(meta["namespace"], meta["name"]), body) or body
        return fresh

    def read(self, path: str, reads: Observed | None, key: tuple[str, str, str, str]) -> dict[str, Any] | None:
        """A child as cached (or as we just wrote it); a GET when the cache does not hold it."""
        if reads is not None:
            cached = self.recent.fresh(path, reads.child(*key))
            if cached is not None:
                self.metrics.cache_reads.labels("hit").inc()
                return cached
            self.metrics.cache_reads.labels("miss").inc()
        self.metrics.api_requests.labels("get").inc()
        return self.kube.get(path)

    # ---- children ------------------------------------------------------------------------

    def _conflicts(self, body: dict[str, Any], reads: Observed | None = None) -> dict[str, str]:
        """Model ids of this group that an earlier ModelGroup in the namespace serves."""
        return claimed_earlier(body, self._namespace_groups(body["metadata"]["namespace"], reads))

    def _namespace_groups(self, namespace: str, reads: Observed | None) -> list[dict[str, Any]]:
        """Every ModelGroup of the namespace (cached, or listed)."""
        groups = reads.groups(namespace) if reads is not None else None
        if groups is None:
            base = f"/apis/{labels.API_GROUP}/{labels.API_VERSION}/namespaces/{namespace}/{labels.PLURAL}"
            self.metrics.api_requests.labels("list").inc()
            groups = self.kube.list(base)
        return groups

    def pool_body(self, namespace: str, name: str, reads: Observed | None) -> dict[str, Any] | None:
        """The GpuPool (the watch cache is complete: not there means none), else a GET."""
        if reads is not None:
            return reads.pool(namespace, name)
        self.metrics.api_requests.labels("get").inc()
        return self.kube.get(pool_path(namespace, name))

    def _pool_pods(self, namespace: str, pool: str) -> list[dict[str, Any]]:
        return self._pods(namespace, pool_selector_string(pool))

    def _pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        """Pods of one selector, each with its own status Lease's document (two list calls)."""
        self.metrics.api_requests.labels("list").inc(2)
        listed = self.kube.list(object_path("v1", "Pod", namespace), label_selector=selector)
        leases = self.kube.list(
            object_path("coordination.k8s.io/v1", "Lease", namespace), label_selector=LEASE_SELECTOR
        )
        return with_leases(listed, {lease["metadata"]["name"]: lease for lease in leases})

    def _ref(self, body: dict[str, Any], conflicts: dict[str, str] | None = None) -> ModelGroupRef:
        meta = body["metadata"]
        spec = parse_spec(body, self.options.defaults)
        if conflicts:
            kept = [m for m in spec.models if m.id not in conflicts]
            if not kept:
                raise ModelIdConflict(conflict_message(conflicts))
            spec = spec.model_copy(update={"models": kept})  # serve the others; the status says why
        return ModelGroupRef(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
            spec=spec,
            generation=meta.get("generation"),
        )

    def scaled_spec(self, spec: _Spec, kind: str, namespace: str, name: str, reads: Observed | None) -> _Spec:
        """With ``spec.autoscaling``, the spec with the scaler's replicas; before its first
        round, with the replicas the StatefulSet has now (a restart scales nothing back)."""
        if spec.autoscaling is None:
            return spec
        replicas = self.book.replicas((kind, namespace, name))
        if replicas is None:
            key = ("apps/v1", "StatefulSet", namespace, child_names(name).statefulset)
            sts = self.read(object_path(*key), reads, key)
            replicas = (sts or {}).get("spec", {}).get("replicas")
        if replicas is None:
            replicas = min(max(spec.replicas, spec.autoscaling.min_replicas), spec.autoscaling.max_replicas)
        return spec.model_copy(update={"replicas": int(replicas)})

    def ensure_children(
        self, ref: PodServerOwner, events: list[Event], reads: Observed | None = None
    ) -> dict[str, Any] | None:
        """Create what is missing, put back what drifted; returns the StatefulSet as stored."""
        return self._ensure_all(ref, events, reads).get("StatefulSet")

    def _ensure_all(
        self, ref: PodServerOwner, events: list[Event], reads: Observed | None = None
    ) -> dict[str, dict[str, Any]]:
        """Every child as stored, by kind."""
        return {d["kind"]: self.ensure(ref, d, events, reads) for d in build_children(ref, self.options)}

    def ensure(
        self, ref: PodServerOwner, desired: dict[str, Any], events: list[Event], reads: Observed | None = None
    ) -> dict[str, Any]:
        kind, name = desired["kind"], desired["metadata"]["name"]
        key = (desired["apiVersion"], kind, desired["metadata"]["namespace"], name)
        actual = self.read(manifest_path(desired), reads, key)
        if actual is None:
            stored = self._apply(desired, None)
            events.append(("Normal", "Created", f"created {kind} {name}"))
            log.info("created child", extra={"group": ref.name, "kind": kind, "child": name})
            return stored
        owners = [o.get("uid") for o in actual["metadata"].get("ownerReferences") or []]
        if ref.uid not in owners:
            raise NotOwned(f"{kind} {name} already exists and does not belong to this {ref.kind}")
        paths = drift(desired, actual)
        if not paths:
            return actual
        stored = self._apply(desired, actual)
        if stored["metadata"].get("resourceVersion") == actual["metadata"].get("resourceVersion"):
            # The server saw nothing to change: drift() disagrees with the server's canonical
            # form of a field. Each resync would repeat this write; say so, so it gets fixed.
            log.warning("apply changed nothing", extra={"group": ref.name, "kind": kind, "drift": paths[:10]})
            return stored
        was = (actual["metadata"].get("annotations") or {}).get(labels.SPEC_HASH_ANNOTATION)
        now = desired["metadata"]["annotations"][labels.SPEC_HASH_ANNOTATION]
        if was != now:
            events.append(("Normal", "Updated", f"updated {kind} {name} to the current spec"))
        else:
            shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
            events.append(("Warning", "Restored", f"restored {kind} {name}, changed outside the operator ({shown})"))
        log.info("applied child", extra={"group": ref.name, "kind": kind, "child": name, "drift": paths[:10]})
        return stored

    def _apply(self, desired: dict[str, Any], actual: dict[str, Any] | None) -> dict[str, Any]:
        self.metrics.api_requests.labels("apply").inc()
        try:
            stored = self.kube.apply(desired)
        except ApiException as exc:
            if exc.status == 422:  # the API server refused what the spec asks for
                raise InvalidSpec(f"{desired['kind']} rejected: {_api_message(exc)}") from None
            raise
        self.recent.note(manifest_path(desired), actual, stored)
        return stored

    # ---- status --------------------------------------------------------------------------

    def _update_status(
        self,
        body: dict[str, Any],
        spec: ModelGroupSpec,
        statefulset: dict[str, Any] | None,
        pods: list[dict[str, Any]] | None,
        result: Result,
        conflicts: dict[str, str] | None = None,
    ) -> None:
        meta = body["metadata"]
        if pods is None:
            pods = self._pods(meta["namespace"], selector_string(meta["name"]))
        before = previous_status(body)
        status = compute_status(
            meta["name"],
            meta.get("generation"),
            spec,
            statefulset,
            pods,
            before,
            now_rfc3339(),
            conflict=conflict_message(conflicts) if conflicts else None,
        )
        if spec.autoscaling is not None:
            status = status.model_copy(update={"desired_replicas": spec.replicas})
        result.events.extend(condition_events(before, status))
        self._write_status(body, status, result)

    def _update_pooled_status(
        self,
        body: dict[str, Any],
        spec: ModelGroupSpec,
        pods: list[dict[str, Any]] | None,
        result: Result,
        reads: Observed | None,
        conflicts: dict[str, str] | None,
    ) -> None:
        """A pooled group's status, from its pool's pods (no children of its own)."""
        meta = body["metadata"]
        pool = spec.pool
        assert pool is not None
        pool_body = self.pool_body(meta["namespace"], pool, reads)
        pool_spec = None
        if pool_body is not None:
            try:
                pool_spec = parse_pool_spec(pool_body, self.options.defaults)
            except InvalidSpec:
                pool_spec = None  # the pool's own status says why
            if pods is None:
                pods = self._pool_pods(meta["namespace"], pool)
        before = previous_status(body)
        status = compute_pooled_status(
            meta["name"],
            meta.get("generation"),
            spec,
            pool,
            pool_spec,
            pods or [],
            before,
            now_rfc3339(),
            pool_found=pool_body is not None,
            conflict=conflict_message(conflicts) if conflicts else None,
        )
        figures = self.book.figures(meta["namespace"], pool)
        _, desired, _ = figures.groups.get(meta["name"], (0, 0, 0.0)) if figures else (0, 0, 0.0)
        pool_replicas = self.book.replicas((gpupool.KIND, meta["namespace"], pool))
        status = status.model_copy(
            update={
                "desired_residency": max(desired, spec.min_resident) if pool_spec else None,
                # The pool's pod count, when demand sets it: /api/models shows it beside the group.
                "desired_replicas": pool_replicas if pool_spec is not None and pool_spec.autoscaling else None,
            }
        )
        result.events.extend(condition_events(before, status))
        self._write_status(body, status, result)

    def _write_status(self, body: dict[str, Any], status: ModelGroupStatus, result: Result) -> None:
        result.status = status
        meta = body["metadata"]
        self._patch_status(body, status, group_path(meta["namespace"], meta["name"]))

    def _write_pool_status(self, body: dict[str, Any], status: GpuPoolStatus, result: PoolResult) -> None:
        result.status = status
        meta = body["metadata"]
        self._patch_status(body, status, pool_path(meta["namespace"], meta["name"]))

    def _patch_status(self, body: dict[str, Any], status: ModelGroupStatus | GpuPoolStatus, path: str) -> None:
        """Write the status subresource, only when it differs from the one the object holds."""
        new = status_body(status)
        old = body.get("status") or {}
        if all(old.get(k) == v for k, v in new.items()):
            return
        meta = body["metadata"]
        self.metrics.api_requests.labels("patch_status").inc()
        try:
            stored = self.kube.merge_patch(path + "/status", {"status": new})
            self.recent.note(path, body, stored)
        except ApiException as exc:
            if exc.status != 404:
                raise
            log.info("object gone before its status was written", extra={"group": meta["name"], "path": path})

    # ---- GpuPools ------------------------------------------------------------------------

    def reconcile_pool(
        self, body: dict[str, Any], pods: list[dict[str, Any]] | None = None, reads: Observed | None = None
    ) -> PoolResult:
        """The pool's children to its spec and its bound groups (the ConfigMap's files: every
        servable group and the placement), then its status to what its pods report."""
        return self._pool_round(body, pods, reads, write_children=True)

    def refresh_pool_status(
        self, body: dict[str, Any], pods: list[dict[str, Any]] | None = None, reads: Observed | None = None
    ) -> PoolResult:
        """Status only (on pod changes): no writes to children."""
        return self._pool_round(body, pods, reads, write_children=False)

    def _pool_round(
        self, body: dict[str, Any], pods: list[dict[str, Any]] | None, reads: Observed | None, write_children: bool
    ) -> PoolResult:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        timer = self.metrics.reconcile_seconds.labels("pool" if write_children else "pool_status")
        with self._lock(namespace, name, gpupool.KIND), timer.time():
            body = self._fresh(body, pool_path)
            result = PoolResult()
            names = child_names(name)
            groups = self._namespace_groups(namespace, reads)
            served, refused, _ = bound_groups(name, groups)
            result.groups = sorted([g.name for g in served] + list(refused))
            try:
                spec = self.scaled_spec(
                    parse_pool_spec(body, self.options.defaults), gpupool.KIND, namespace, name, reads
                )
                if pods is None:
                    pods = self._pool_pods(namespace, name)
                cm_key = ("v1", "ConfigMap", namespace, names.configmap)
                configmap = self.read(object_path(*cm_key), reads, cm_key)
                placement, groups_hash = configmap_state(configmap)
                sts_key = ("apps/v1", "StatefulSet", namespace, names.statefulset)
                if write_children:
                    placement = self._placement(namespace, name, spec, served, pods, placement)
                    ref = PoolRef(name, namespace, meta["uid"], spec, tuple(served), placement, meta.get("generation"))
                    stored = self._ensure_all(ref, result.events, reads)
                    statefulset: dict[str, Any] | None = stored.get("StatefulSet")
                    _, groups_hash = configmap_state(stored.get("ConfigMap"))
                else:
                    if configmap is None:
                        return result  # not reconciled yet: the spec handlers own the status
                    statefulset = self.read(object_path(*sts_key), reads, sts_key)
            except Blocked as exc:
                if not write_children:
                    return result
                result.blocked = exc
                before = previous_pool_status(body)
                status = _blocked(
                    before or GpuPoolStatus(), body, pool_selector_string(name), exc.reason, str(exc), now_rfc3339()
                )
                result.events.extend(condition_events(before, status))
                self._write_pool_status(body, status, result)
                return result
            before = previous_pool_status(body)
            status = compute_pool_status(
                name,
                meta.get("generation"),
                spec,
                statefulset,
                pods,
                before,
                now_rfc3339(),
                served=[g.name for g in served],
                refused=refused,
                placement_generation=placement.generation,
                groups_hash=groups_hash,
            )
            status = self._with_scaling(status, namespace, name, spec, served)
            result.events.extend(condition_events(before, status))
            self._write_pool_status(body, status, result)
            return result

    def _with_scaling(
        self, status: GpuPoolStatus, namespace: str, name: str, spec: GpuPoolSpec, served: list[BoundGroup]
    ) -> GpuPoolStatus:
        """The scaler's figures in the pool's status: desired pods, residency per group."""
        figures = self.book.figures(namespace, name)
        rows = []
        for g in served:
            current, desired, demand = figures.groups.get(g.name, (0, 0, 0.0)) if figures else (0, 0, 0.0)
            desired = max(desired, min(g.spec.min_resident, spec.replicas * spec.gpus_per_pod))
            rows.append(GroupResidency(group=g.name, current=current, desired=desired, demand=demand))
        return status.model_copy(
            update={
                "desired_replicas": spec.replicas if spec.autoscaling is not None else None,
                "residency": rows,
                "last_scale_time": self.book.last_scale((gpupool.KIND, namespace, name)),
            }
        )

    def _placement(
        self,
        namespace: str,
        pool: str,
        spec: GpuPoolSpec,
        served: list[BoundGroup],
        pods: list[dict[str, Any]],
        previous: PoolPlacement,
    ) -> PoolPlacement:
        """The placement for the pool's devices (pods by their StatefulSet names); a new
        generation only when it differs from the one in force."""
        devices = [(f"{pool}-{i}", spec.gpus_per_pod) for i in range(spec.replicas)]
        # The floor (minResident) raised to what demand asks (gpufleet.autoscale.residency).
        wanted = self.book.residency(namespace, pool)
        demands = [
            GroupDemand(g.name, max(g.spec.min_resident, wanted.get(g.name, 0)), g.spec.priority) for g in served
        ]
        observed = observed_placement([pod_view(p) for p in pods])
        placement = place(devices, demands, observed, previous.generation, previous)
        if placement.pods != previous.pods:
            placement = placement.model_copy(update={"generation": previous.generation + 1})
        return placement


def _api_message(exc: ApiException) -> str:
    import json

    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        return str(exc.reason)
