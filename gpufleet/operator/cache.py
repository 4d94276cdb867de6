"""Cached reads for the reconciler (pure, no kopf): what the operator's watches hold.

kopf indexes (gpufleet.operator.handlers) keep every ModelGroup, every GpuPool and every child we own,
as the watches (with server-side label selectors) deliver them; a reconcile reads those
instead of a GET per child, so a resync round costs no API call when nothing changed.

A miss (not seen yet, or not ours: the watches carry only objects with our labels) falls
back to a GET, so a name taken by someone else's object is still found and refused.

A cache lags our own writes by the watch's latency. ``RecentWrites`` bridges that: after
a write it remembers the resourceVersion we replaced and the object we got back, and as
long as the cache still shows the replaced version, the reconciler reads what it wrote
(otherwise a reconcile right after a write would see its old state and write again).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

Obj = dict[str, Any]
# (namespace, name) -> the objects kopf's index holds under that key (a kopf Store, or a list)
Index = Mapping[Any, Iterable[Obj]]


class Observed(Protocol):
    """What the reconciler may read without asking the API server."""

    def child(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None: ...

    def groups(self, namespace: str) -> list[Obj] | None: ...

    def pool(self, namespace: str, name: str) -> Obj | None: ...


def slim(body: Mapping[str, Any]) -> Obj:
    """The object without its managedFields (the bulk of a stored object; never read)."""
    out = dict(body)
    meta = dict(out.get("metadata") or {})
    meta.pop("managedFields", None)
    out["metadata"] = meta
    return out


def _first(index: Index | None, key: Any) -> Obj | None:
    if index is None or key not in index:
        return None
    for obj in index[key]:
        return obj
    return None


class IndexedReads:
    """Observed over kopf indexes: children by (api_version, kind) and (namespace, name);
    ModelGroups and GpuPools under two keys each: their namespace, and (namespace, name)."""

    def __init__(
        self, children: Mapping[tuple[str, str], Index], groups: Index, pools: Index | None = None
    ) -> None:
        self._children = children
        self._groups = groups
        self._pools: Index = pools if pools is not None else {}

    def child(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
        return _first(self._children.get((api_version, kind)), (namespace, name))

    def groups(self, namespace: str) -> list[Obj] | None:
        return list(self._groups[namespace]) if namespace in self._groups else []

    def group(self, namespace: str, name: str) -> Obj | None:
        return _first(self._groups, (namespace, name))

    def pool(self, namespace: str, name: str) -> Obj | None:
        """The GpuPool as the watch holds it; None: there is none (the index is complete)."""
        return _first(self._pools, (namespace, name))

    def group_keys(self) -> list[tuple[str, str, str]]:
        """(namespace, name, uid) of every ModelGroup the watch holds."""
        return _keys(self._groups)

    def pool_keys(self) -> list[tuple[str, str, str]]:
        """(namespace, name, uid) of every GpuPool the watch holds."""
        return _keys(self._pools)


def _keys(index: Index) -> list[tuple[str, str, str]]:
    out = []
    for key in list(index):
        if isinstance(key, tuple):
            body = _first(index, key)
            if body is not None:
                out.append((str(key[0]), str(key[1]), str(body["metadata"].get("uid") or "")))
    return out


def _rv(obj: Obj | None) -> str | None:
    return None if obj is None else (obj.get("metadata") or {}).get("resourceVersion")


class RecentWrites:
    """Read-your-writes over a lagging cache; entries go once the cache catches up (or expire)."""

    def __init__(self, ttl_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: dict[str, tuple[str | None, Obj, float]] = {}
        self._lock = threading.Lock()

    def note(self, path: str, before: Obj | None, after: Obj) -> None:
        """We replaced `before` (None: created) with `after` (the object the server returned)."""
        now = self.clock()
        with self._lock:
            self._entries[path] = (_rv(before), after, now)
            if len(self._entries) > 64:  # drop what the cache never caught up with (deleted objects)
                for key in [k for k, (_, _, at) in self._entries.items() if now - at > self.ttl_s]:
                    del self._entries[key]

    def fresh(self, path: str, seen: Obj | None) -> Obj | None:
        """The freshest object we know at `path`, given what the cache shows (`seen`)."""
        with self._lock:
            entry = self._entries.get(path)
            if entry is None:
                return seen
            before_rv, after, at = entry
            if _rv(seen) == before_rv and self.clock() - at <= self.ttl_s:
                return after  # the cache has not seen our write yet
            del self._entries[path]  # caught up, or moved on past us: the cache is the truth again
            return seen
