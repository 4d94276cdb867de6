"""Model ids claimed by two ModelGroups of one namespace (pure).

The router keys models by namespace and id, so within a namespace an id must name one
model. The earlier ModelGroup (creation time, then name) keeps it; the later one serves
its other models and says why in its Degraded condition. Once the earlier group lets the
id go, the next reconcile of the later one takes it up.
"""

from __future__ import annotations

from typing import Any


def _order(body: dict[str, Any]) -> tuple[str, str]:
    meta = body.get("metadata") or {}
    return (str(meta.get("creationTimestamp") or ""), str(meta.get("name") or ""))


def _ids(body: dict[str, Any]) -> set[str]:
    models = (body.get("spec") or {}).get("models") or []
    return {str(m.get("id")) for m in models if isinstance(m, dict) and m.get("id")}


def claimed_earlier(me: dict[str, Any], groups: list[dict[str, Any]]) -> dict[str, str]:
    """Model id -> the name of the earlier ModelGroup in `groups` (same namespace) that claims it."""
    mine = _ids(me)
    uid = (me.get("metadata") or {}).get("uid")
    out: dict[str, str] = {}
    for other in sorted(groups, key=_order):
        meta = other.get("metadata") or {}
        if meta.get("uid") == uid or meta.get("deletionTimestamp") or _order(other) >= _order(me):
            continue
        for model in sorted(mine & _ids(other)):
            out.setdefault(model, str(meta.get("name")))
    return out


def conflict_message(conflicts: dict[str, str]) -> str:
    return "; ".join(f"model id {m!r} is already served by ModelGroup {g!r}" for m, g in sorted(conflicts.items()))
