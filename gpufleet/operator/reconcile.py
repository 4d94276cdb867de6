"""Level-triggered reconciliation of one ModelGroup: make the children match the spec, then
write what is observed into the status.

No kopf here (handlers.py maps outcomes to kopf's retry semantics) and no decisions of its
own: manifests come from builders.py, the status from status.py, drift from drift.py.
Every step reads the actual state first, so running it again, from any handler, at any
time, converges to the same result and writes nothing when nothing differs.

Reads come from the watch caches when the caller passes them (``Observed``, see
gpufleet.operator.cache), else from the API server: a steady-state reconcile then makes no
API call at all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from gpufleet.api import labels
from gpufleet.api.modelgroup import Condition, ConditionType, ModelGroupSpec, ModelGroupStatus
from gpufleet.operator.builders import (
    BuildOptions,
    ModelGroupRef,
    build_children,
    child_names,
    selector_string,
)
from gpufleet.operator.cache import Observed, RecentWrites
from gpufleet.operator.conflicts import claimed_earlier, conflict_message
from gpufleet.operator.drift import drift
from gpufleet.operator.kube import Kube, manifest_path, object_path
from gpufleet.operator.metrics import OperatorMetrics
from gpufleet.operator.status import compute_status, condition_events, status_body, with_leases

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
    """A child's name is taken by an object this ModelGroup does not own (may clear by itself,
    e.g. while the children of a deleted ModelGroup of the same name are garbage collected)."""

    reason = "NameConflict"


@dataclass
class Result:
    events: list[Event] = field(default_factory=list)
    status: ModelGroupStatus | None = None
    blocked: Blocked | None = None


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def group_path(namespace: str, name: str) -> str:
    return f"/apis/{labels.API_GROUP}/{labels.API_VERSION}/namespaces/{namespace}/{labels.PLURAL}/{name}"


def parse_spec(body: dict[str, Any], defaults: Mapping[str, Any] | None = None) -> ModelGroupSpec:
    """The spec, with the installation's defaults for the pod-template fields it does not set."""
    try:
        return ModelGroupSpec.model_validate({**(defaults or {}), **(body.get("spec") or {})})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "spec"
        raise InvalidSpec(f"spec.{where}: {first['msg']}") from None


def previous_status(body: dict[str, Any]) -> ModelGroupStatus | None:
    try:
        return ModelGroupStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return None


def blocked_status(body: dict[str, Any], reason: str, message: str, now: str) -> ModelGroupStatus:
    """Status while reconciliation is blocked: Degraded with the reason, not Ready."""
    meta = body["metadata"]
    before = previous_status(body) or ModelGroupStatus()
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
            "selector": selector_string(meta["name"]),
            "conditions": [
                cond("Ready", "False", reason, message),
                cond("Progressing", "False", reason, "blocked until this is resolved"),
                cond("Degraded", "True", reason, message),
            ],
        }
    )


class Reconciler:
    def __init__(self, kube: Kube, options: BuildOptions, metrics: OperatorMetrics | None = None) -> None:
        self.kube = kube
        self.options = options
        self.metrics = metrics or OperatorMetrics()
        self.recent = RecentWrites()  # our writes, until the watch caches show them
        self._locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[(namespace, name)]

    # ---- entry points --------------------------------------------------------------------

    def reconcile(
        self, body: dict[str, Any], pods: list[dict[str, Any]] | None = None, reads: Observed | None = None
    ) -> Result:
        """Children to the spec, then status to what is observed.

        When blocked (invalid spec, a name taken), the status says why and result.blocked
        holds the reason; API failures raise ApiException."""
        meta = body["metadata"]
        with self._lock(meta["namespace"], meta["name"]), self.metrics.reconcile_seconds.labels("full").time():
            body = self._fresh(body)
            result = Result()
            try:
                conflicts = self._conflicts(body, reads)
                ref = self._ref(body, conflicts)
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
            names = child_names(meta["name"])
            sts = self.read(object_path("apps/v1", "StatefulSet", meta["namespace"], names.statefulset), reads,
                            ("apps/v1", "StatefulSet", meta["namespace"], names.statefulset))
            self._update_status(body, spec, sts, pods, result, conflicts)
            return result

    # ---- reads ---------------------------------------------------------------------------

    def _fresh(self, body: dict[str, Any]) -> dict[str, Any]:
        """The ModelGroup with the status we last wrote, if the caller's copy predates it."""
        meta = body["metadata"]
        return self.recent.fresh(group_path(meta["namespace"], meta["name"]), body) or body

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
        namespace = body["metadata"]["namespace"]
        groups = reads.groups(namespace) if reads is not None else None
        if groups is None:
            base = f"/apis/{labels.API_GROUP}/{labels.API_VERSION}/namespaces/{namespace}/{labels.PLURAL}"
            self.metrics.api_requests.labels("list").inc()
            groups = self.kube.list(base)
        return claimed_earlier(body, groups)

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

    def ensure_children(
        self, ref: ModelGroupRef, events: list[Event], reads: Observed | None = None
    ) -> dict[str, Any] | None:
        """Create what is missing, put back what drifted; returns the StatefulSet as stored."""
        statefulset = None
        for desired in build_children(ref, self.options):
            actual = self.ensure(ref, desired, events, reads)
            if desired["kind"] == "StatefulSet":
                statefulset = actual
        return statefulset

    def ensure(
        self, ref: ModelGroupRef, desired: dict[str, Any], events: list[Event], reads: Observed | None = None
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
            raise NotOwned(f"{kind} {name} already exists and does not belong to this ModelGroup")
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
            self.metrics.api_requests.labels("list").inc(2)
            listed = self.kube.list(
                object_path("v1", "Pod", meta["namespace"]), label_selector=selector_string(meta["name"])
            )
            leases = self.kube.list(
                object_path("coordination.k8s.io/v1", "Lease", meta["namespace"]), label_selector=LEASE_SELECTOR
            )
            pods = with_leases(listed, {lease["metadata"]["name"]: lease for lease in leases})
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
        result.events.extend(condition_events(before, status))
        self._write_status(body, status, result)

    def _write_status(self, body: dict[str, Any], status: ModelGroupStatus, result: Result) -> None:
        result.status = status
        new = status_body(status)
        old = body.get("status") or {}
        if all(old.get(k) == v for k, v in new.items()):
            return
        meta = body["metadata"]
        path = group_path(meta["namespace"], meta["name"])
        self.metrics.api_requests.labels("patch_status").inc()
        try:
            stored = self.kube.merge_patch(path + "/status", {"status": new})
            self.recent.note(path, body, stored)
        except ApiException as exc:
            if exc.status != 404:
                raise
            log.info("ModelGroup gone before its status was written", extra={"group": meta["name"]})


def _api_message(exc: ApiException) -> str:
    import json

    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        return str(exc.reason)
