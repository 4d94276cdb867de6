"""The groups the ModelGroup resources declare: every model id and its group, even with no pod.

A pool scaled to 0 pods, or a dedicated ModelGroup at 0 replicas, has no pod server to report its
models, so the pods' status documents alone would make its models unknown (404) exactly when a
request should wake it. On Kubernetes the router therefore also watches ModelGroups
(gpufleet.io/v1alpha1) in the namespaces it serves, read-only, and keeps this view of them: ids
qualified by namespace as the pods' are (``gpufleet.router.tenancy``). Elsewhere (static URLs,
``gpufleet up``) it stays empty. Status figures the operator writes (``residency``,
``desiredResidency``, ``desiredReplicas``) are kept when present, for ``/api/models``.

Pure: ``parse_model_group`` over an object's JSON, ``Catalog.apply`` over watch events.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpufleet.api.modelgroup import ModelGroupSpec
from gpufleet.router import tenancy

log = logging.getLogger(__name__)

API_GROUP, API_VERSION, PLURAL = "gpufleet.io", "v1alpha1", "modelgroups"
# The spec fields this version knows, under both spellings: a field of a newer CRD is dropped
# before validation, so a router older than the operator still reads models and pool.
_SPEC_FIELDS = frozenset(
    name for key, info in ModelGroupSpec.model_fields.items() for name in (key, info.alias) if name
)
# Status figures (the operator's, all optional), JSON name -> attribute.
STATUS_FIGURES = {"residency": "residency", "desiredResidency": "desired_residency",
                  "desiredReplicas": "desired_replicas"}
# Degraded reasons that no amount of capacity fixes (the operator's): such a group is not offered,
# as its pods do not offer it (a client is not shown a model it cannot use, nor held waiting for it).
UNSERVABLE = frozenset({"InsufficientMemory", "Refused", "InvalidSpec", "ModelIdConflict", "PoolNotFound"})


@dataclass(frozen=True)
class KnownModel:
    id: str  # as the ModelGroup names it (not qualified)
    task: str


@dataclass(frozen=True)
class KnownGroup:
    namespace: str
    name: str
    models: tuple[KnownModel, ...]
    pool: str | None = None
    created: str = ""  # metadata.creationTimestamp (RFC 3339: orders as text)
    residency: int | None = None  # devices holding the group current now
    desired_residency: int | None = None
    desired_replicas: int | None = None
    unservable: str | None = None  # the Degraded reason, when it is one of UNSERVABLE

    @property
    def key(self) -> str:
        """The group id as routing knows it (the pods' ids are qualified the same way)."""
        return tenancy.qualify(self.namespace, self.name)

    def figures(self) -> dict[str, int]:
        """The status figures present, under the snake_case names of the router's fleet API."""
        values = {attr: getattr(self, attr) for attr in STATUS_FIGURES.values()}
        return {attr: value for attr, value in values.items() if value is not None}


def _count(status: Mapping[str, Any], name: str) -> int | None:
    value = status.get(name)
    # bool is an int to Python, never a count; anything else the operator did not mean is ignored.
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _key(obj: Mapping[str, Any]) -> str | None:
    meta = obj.get("metadata") or {}
    name, namespace = meta.get("name"), meta.get("namespace")
    if isinstance(name, str) and name and isinstance(namespace, str) and namespace:
        return tenancy.qualify(namespace, name)
    return None


def parse_model_group(obj: Mapping[str, Any]) -> KnownGroup:
    """A ModelGroup's JSON as routing needs it; ValueError (pydantic's ValidationError is one) for an
    object the operator would refuse too."""
    meta = obj.get("metadata") or {}
    if _key(obj) is None:
        raise ValueError("metadata.name and metadata.namespace are required")
    raw = obj.get("spec")
    if not isinstance(raw, Mapping):
        raise ValueError("spec: an object is required")
    spec = ModelGroupSpec.model_validate({k: v for k, v in raw.items() if k in _SPEC_FIELDS})
    status = obj.get("status")
    status = status if isinstance(status, Mapping) else {}
    return KnownGroup(
        namespace=meta["namespace"],
        name=meta["name"],
        models=tuple(KnownModel(m.id, m.task) for m in spec.models),
        pool=spec.pool,
        created=str(meta.get("creationTimestamp") or ""),
        unservable=_unservable(status),
        **{attr: _count(status, json_name) for json_name, attr in STATUS_FIGURES.items()},
    )


def _unservable(status: Mapping[str, Any]) -> str | None:
    for cond in status.get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == "Degraded" and cond.get("status") == "True":
            reason = cond.get("reason")
            return reason if isinstance(reason, str) and reason in UNSERVABLE else None
    return None


class Catalog:
    """The ModelGroups seen so far, by qualified group id."""

    def __init__(self) -> None:
        self.groups: dict[str, KnownGroup] = {}
        self._models: dict[str, str] = {}

    def models(self) -> dict[str, str]:
        """Qualified model id -> qualified group id."""
        return self._models

    def offered(self) -> list[KnownGroup]:
        """The groups clients are shown (``/v1/models``): all but those no capacity can serve."""
        return [g for g in self.groups.values() if g.unservable is None]

    def apply(self, kind: str, namespace: str, payload: Any) -> bool:
        """One watch event (ADDED, MODIFIED, DELETED) or a namespace's fresh list (RESET); True when
        the models routing reads changed (a status update alone changes none)."""
        if kind == "RESET":
            prefix = f"{namespace}/"
            for key in [k for k in self.groups if k.startswith(prefix)]:
                del self.groups[key]
            for obj in payload:
                self._put(obj)
        elif kind == "DELETED":
            gone = _key(payload)
            if gone is not None:
                self.groups.pop(gone, None)
        elif kind in ("ADDED", "MODIFIED"):
            self._put(payload)
        return self._rebuild()

    def _put(self, obj: Mapping[str, Any]) -> None:
        key = _key(obj)
        if (obj.get("metadata") or {}).get("deletionTimestamp"):
            if key is not None:  # going: it claims nothing any more (as the operator sees it)
                self.groups.pop(key, None)
            return
        try:
            group = parse_model_group(obj)
        except ValueError as exc:
            # Not served as declared (the operator refuses it too): the pods say what they serve.
            log.warning("ModelGroup ignored: not a valid spec", extra={"modelgroup": key, "error": str(exc)[:300]})
            if key is not None:
                self.groups.pop(key, None)
            return
        self.groups[group.key] = group

    def _rebuild(self) -> bool:
        models: dict[str, str] = {}
        # Two groups of one namespace claiming one model id: the earlier keeps it (creation time, then
        # name), as the operator decides (gpufleet.operator.conflicts); the later one does not serve it.
        for g in sorted(self.groups.values(), key=lambda g: (g.created, g.name)):
            if g.unservable is not None:
                continue
            for m in g.models:
                models.setdefault(tenancy.qualify(g.namespace, m.id), g.key)
        changed = models != self._models
        self._models = models
        return changed
