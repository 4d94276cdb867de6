"""The fleet's read API: the pod servers' documents merged into one, as pure functions.

Each takes ``PodDoc`` entries (a pod's name, node and the document it returned, or the
error it gave) and returns the fleet-wide document. Devices are named ``pod/device``.
Models and groups the ModelGroup resources declare (``gpufleet.router.catalog``) are listed
too when no pod serves them (a group at zero pods), with the operator's status figures.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gpufleet.router import tenancy
from gpufleet.router.catalog import KnownGroup

OWNED_BY = "gpufleet"  # as the pod servers' cards say


@dataclass(frozen=True)
class PodDoc:
    pod: str
    node: str | None
    url: str | None
    state: str  # FleetState.pod_state: ready, ejected, stale, ...
    doc: dict[str, Any] | None
    error: str | None = None
    tenant: str | None = None  # the pod's namespace: its group and model ids are qualified by it


def _q(p: PodDoc, local: str) -> str:
    return f"{p.tenant}/{local}" if p.tenant else local


def _pods_summary(docs: list[PodDoc]) -> dict[str, Any]:
    return {
        p.pod: {"node": p.node, "url": p.url, "state": p.state, "reachable": p.doc is not None, "error": p.error}
        for p in docs
    }


def gpu_stats(docs: list[PodDoc], leases: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """``leases``: device key -> {id, expires_at} of the live lease holding it."""
    held = leases or {}
    devices: dict[str, Any] = {}
    for p in docs:
        for device, fields in ((p.doc or {}).get("devices") or {}).items():
            key = f"{p.pod}/{device}"
            devices[key] = {**fields, "pod": p.pod, "node": p.node, "device": device, "lease": held.get(key)}
    out: dict[str, Any] = {
        "available": any(bool((p.doc or {}).get("available")) for p in docs),
        "devices": devices,
        "pods": _pods_summary(docs),
    }
    if devices:  # the original single-device fields, for clients of one pod server
        first = next(iter(devices.values()))
        out.update({k: v for k, v in first.items() if k not in ("pod", "node", "device", "lease")})
    return out


def models(docs: list[PodDoc], known: Iterable[KnownGroup] = ()) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {}
    for p in docs:
        for g in (p.doc or {}).get("model_groups") or []:
            gid = _q(p, g["group_id"])
            merged = groups.setdefault(
                gid, {"group_id": gid, "is_default": bool(g.get("is_default")), "device_info": [], "models": {}}
            )
            for info in g.get("device_info") or []:
                merged["device_info"].append(
                    {**info, "device": f"{p.pod}/{info['device']}", "pod": p.pod, "node": p.node,
                     "local_device": info["device"]}
                )
            for m in g.get("models") or []:
                entry = merged["models"].setdefault(
                    _q(p, m["id"]),
                    {**m, "id": _q(p, m["id"]), "loaded_on_devices": [], "cached_on_devices": [], "statuses": []},
                )
                entry["loaded_on_devices"] += [f"{p.pod}/{d}" for d in m.get("loaded_on_devices") or []]
                entry["cached_on_devices"] += [f"{p.pod}/{d}" for d in m.get("cached_on_devices") or []]
                entry["statuses"].append(m.get("status"))
    for k in known:
        merged = groups.setdefault(k.key, {"group_id": k.key, "is_default": False, "device_info": [], "models": {}})
        merged.update(k.figures())
        if k.pool is not None:
            merged["pool"] = k.pool
        for km in k.models:
            qualified = tenancy.qualify(k.namespace, km.id)
            merged["models"].setdefault(
                qualified,
                {"id": qualified, "task": km.task, "loaded_on_devices": [], "cached_on_devices": [], "statuses": []},
            )
    out = []
    for g in groups.values():
        model_list = []
        for m in g["models"].values():
            statuses = m.pop("statuses")
            m["status"] = (
                "loaded" if m["loaded_on_devices"] else ("failed" if statuses and all(s == "failed" for s in statuses)
                                                        else "available")
            )
            model_list.append(m)
        out.append({**g, "models": model_list})
    return {"model_groups": out, "pods": _pods_summary(docs)}


def queue(
    docs: list[PodDoc], inflight: dict[str, int], leases: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    held = leases or {}
    devices: dict[str, Any] = {}
    pods: dict[str, Any] = {}
    for p in docs:
        doc = p.doc or {}
        for device, fields in (doc.get("devices") or {}).items():
            key = f"{p.pod}/{device}"
            devices[key] = {**fields, "pod": p.pod, "node": p.node, "device": device,
                            "router_inflight": inflight.get(key, 0), "lease": held.get(key)}
        pods[p.pod] = {
            **_pods_summary([p])[p.pod],
            "total_queued": int(doc.get("total_queued", 0)),
            "total_running": int(doc.get("total_running", 0)),
        }
    return {
        "devices": devices,
        "pods": pods,
        "total_queued": sum(v["total_queued"] for v in pods.values()),
        "total_running": sum(v["total_running"] for v in pods.values()),
    }


def model_cards(docs: list[PodDoc], known: Iterable[KnownGroup] = ()) -> list[dict[str, Any]]:
    """The union of every pod's /v1/models, first seen wins; then the resources' models no pod lists."""
    cards: dict[str, dict[str, Any]] = {}
    for p in docs:
        for card in (p.doc or {}).get("data") or []:
            cards.setdefault(_q(p, card["id"]), {**card, "id": _q(p, card["id"])})
    for k in known:
        for km in k.models:
            qualified = tenancy.qualify(k.namespace, km.id)
            # As a pod's card, qualified by the router: the id qualified, the group the pod's own name.
            cards.setdefault(
                qualified,
                {"id": qualified, "object": "model", "created": 0, "owned_by": OWNED_BY, "group": k.name,
                 "task": km.task},
            )
    return list(cards.values())
