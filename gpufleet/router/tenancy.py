"""Namespace-qualified ids: in a cluster, groups and models are ``<namespace>/<id>``.

Two teams may both call a group (or a model) ``chat``; the router keeps them apart by
qualifying every id a pod server in namespace N reports as ``N/<id>``. A pod server itself
knows only its local ids, so the proxy sends it the local model id. For convenience, an
unqualified model id that exactly one namespace serves is an alias of the qualified one.
Pure functions; pod servers found without a namespace (static URLs, ``gpufleet up``) keep
their ids as they are.
"""

from __future__ import annotations

from collections.abc import Iterable

from gpufleet.api.pod_status import PodStatus


def qualify(namespace: str, local_id: str) -> str:
    return f"{namespace}/{local_id}"


def local_id(qualified: str) -> str:
    return qualified.rpartition("/")[2]


def split(group: str) -> tuple[str | None, str]:
    """``(namespace, local id)`` of an id; no namespace for one found without (static URLs)."""
    namespace, _, local = group.rpartition("/")
    return namespace or None, local


def qualify_status(doc: PodStatus, namespace: str) -> PodStatus:
    """The status document with every group and model id qualified by the pod's namespace."""

    def q(group: str | None) -> str | None:
        return None if group is None else qualify(namespace, group)

    devices = [
        d.model_copy(
            update={
                "current_group": q(d.current_group),
                "switching_to": q(d.switching_to),
                "cached_groups": [qualify(namespace, g) for g in d.cached_groups],
                "failed_groups": [qualify(namespace, g) for g in d.failed_groups],
            }
        )
        for d in doc.devices
    ]
    return doc.model_copy(
        update={
            "devices": devices,
            "groups": [qualify(namespace, g) for g in doc.groups],
            "models": {qualify(namespace, m): qualify(namespace, g) for m, g in doc.models.items()},
        }
    )


def aliases(qualified_models: Iterable[str]) -> dict[str, str]:
    """Unqualified model id -> qualified id, for ids exactly one namespace serves."""
    seen: dict[str, set[str]] = {}
    for model in qualified_models:
        if "/" in model:
            seen.setdefault(local_id(model), set()).add(model)
    return {local: next(iter(found)) for local, found in seen.items() if len(found) == 1}
