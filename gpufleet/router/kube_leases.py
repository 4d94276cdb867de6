"""Exclusive leases as coordination.k8s.io/v1 Lease objects in the router's namespace.

One object per lease, named by its id and labelled ``app.kubernetes.io/managed-by:
gpufleet-router`` (the pod servers' status Leases carry ``gpufleet.io/component:
pod-server`` instead, and the chart's admission policies keep each identity to its own
kind). ``spec.holderIdentity`` is the lease id, ``leaseDurationSeconds`` its TTL and
``renewTime`` where the TTL counts from; the target and the device keys it holds are
annotations, so every replica holds the same devices whatever its own view of the fleet.

Every replica watches the objects and routes from that cache; writes go to the API server.
Two replicas taking the same device at once are settled without a lock: each creates its
object, then lists afresh and withdraws (409) if another live lease holds one of its
devices. The later of the two lists sees both objects, so at most one survives (both may
withdraw; the client retries). Objects expired for a while are deleted by any replica.
Parsing and building are pure; the API calls run in threads (the synchronous client's ApiClient, JSON in and out).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from gpufleet.api import labels
from gpufleet.api.errors import Conflict, Unavailable
from gpufleet.router.kube_discovery import LEASES, _watch, import_kubernetes
from gpufleet.router.lease_store import WallClock, new_lease_id, not_found
from gpufleet.routing import leases
from gpufleet.routing.leases import Lease

log = logging.getLogger(__name__)
SELECTOR = f"{labels.LABEL_MANAGED_BY}={labels.ROUTER_LEASE_MANAGED_BY}"
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
MERGE_PATCH = "application/merge-patch+json"
API_TIMEOUT_S = 10.0
SWEEP_INTERVAL_S = 30.0
SWEEP_AFTER_S = 60.0  # an expired object stays this long (a late renewal is refused, not confusing)


def router_namespace() -> str:
    """The namespace the router runs in: POD_NAMESPACE (the chart sets it), its token's, or default."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return SA_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def micro_time(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _unix(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def label_value(target: str) -> str:
    """A label value for ``target`` (letters, digits, '-', '_', '.'; at most 63), for kubectl -l."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", ".", target)[:63]
    return cleaned.strip("._-") or "target"


def lease_object(lease: Lease, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": lease.id,
            "namespace": namespace,
            "labels": {
                labels.LABEL_MANAGED_BY: labels.ROUTER_LEASE_MANAGED_BY,
                labels.LABEL_COMPONENT: labels.COMPONENT_ROUTER,
                labels.LABEL_LEASE_TARGET: label_value(lease.target),
            },
            "annotations": {
                labels.LABEL_LEASE_TARGET: lease.target,
                labels.LEASE_DEVICES_ANNOTATION: json.dumps(list(lease.devices)),
                labels.LEASE_UUIDS_ANNOTATION: json.dumps(list(lease.uuids)),
            },
        },
        "spec": {
            "holderIdentity": lease.id,
            "leaseDurationSeconds": lease.ttl_s,
            "acquireTime": micro_time(lease.acquired_at),
            "renewTime": micro_time(lease.renewed_at),
        },
    }


def parse_lease_object(obj: Mapping[str, Any]) -> Lease | None:
    """A router Lease object as a lease; None when it is not one (or is malformed, or unlabelled)."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    if (meta.get("labels") or {}).get(labels.LABEL_MANAGED_BY) != labels.ROUTER_LEASE_MANAGED_BY:
        return None
    notes = meta.get("annotations") or {}
    try:
        devices = json.loads(notes.get(labels.LEASE_DEVICES_ANNOTATION) or "[]")
        uuids = json.loads(notes.get(labels.LEASE_UUIDS_ANNOTATION) or "[]")
    except ValueError:
        return None
    acquired, renewed = _unix(spec.get("acquireTime")), _unix(spec.get("renewTime"))
    ttl = spec.get("leaseDurationSeconds")
    name = meta.get("name")
    if (
        not isinstance(name, str)
        or not isinstance(devices, list)
        or not all(isinstance(d, str) for d in devices)
        or not isinstance(ttl, int)
        or renewed is None
    ):
        return None
    return Lease(
        id=name,
        target=str(notes.get(labels.LABEL_LEASE_TARGET) or ""),
        devices=tuple(devices),
        ttl_s=ttl,
        acquired_at=acquired if acquired is not None else renewed,
        renewed_at=renewed,
        uuids=tuple(str(u) for u in uuids) if isinstance(uuids, list) else (),
    )


def _version(obj: Mapping[str, Any]) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


class KubeLeaseStore:
    kind = "kubernetes"

    def __init__(self, namespace: str, clock: WallClock = time.time) -> None:
        self.namespace = namespace
        self.clock = clock
        self.cache: dict[str, tuple[int, Lease | None]] = {}  # id -> (resourceVersion, lease; None: deleted)
        self._api: Any = None

    # --- reads (routing) -----------------------------------------------------------------

    def now(self) -> float:
        return self.clock()

    def all(self) -> list[Lease]:
        return [lease for _, lease in self.cache.values() if lease is not None]

    def observe(self, obj: Mapping[str, Any], *, deleted: bool = False) -> None:
        """An object as the API server last showed it (a watch event or our own write's answer)."""
        name = (obj.get("metadata") or {}).get("name")
        if not isinstance(name, str):
            return
        version = _version(obj)
        seen = self.cache.get(name)
        if seen is not None and version and version < seen[0]:
            return  # older than what we hold already
        self.cache[name] = (version, None if deleted else parse_lease_object(obj))

    def reset(self, items: Sequence[Mapping[str, Any]]) -> None:
        fresh: dict[str, tuple[int, Lease | None]] = {}
        for obj in items:
            lease = parse_lease_object(obj)
            if lease is not None:
                fresh[lease.id] = (_version(obj), lease)
        self.cache = fresh

    # --- the API server --------------------------------------------------------------------

    def _client(self) -> Any:  # pragma: no cover - needs a cluster (tests/e2e)
        if self._api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api = client.ApiClient()
        return self._api

    def _rest(
        self, method: str, name: str | None = None, body: Any = None, *, query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Any:  # pragma: no cover - needs a cluster (tests/e2e)
        """JSON in, JSON out (the typed models would re-encode our MicroTimes and bodies)."""
        from kubernetes.client.exceptions import ApiException

        api = self._client()
        path = f"/apis/coordination.k8s.io/v1/namespaces/{quote(self.namespace)}/leases"
        if name is not None:
            path += f"/{quote(name)}"
        m, url, headers, data, post = api.param_serialize(
            method=method, resource_path=path, query_params=query or [], body=body, auth_settings=["BearerToken"],
            header_params={"Accept": "application/json", "Content-Type": content_type},
        )
        resp = api.call_api(m, url, header_params=headers, body=data, post_params=post, _request_timeout=API_TIMEOUT_S)
        raw = resp.read()
        if not 200 <= resp.status < 300:
            raise ApiException(http_resp=resp)
        return json.loads(raw) if raw else {}

    async def _api_call(self, method: str, name: str | None = None, body: Any = None, **kw: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return await asyncio.to_thread(self._rest, method, name, body, **kw)
        except ApiException as exc:
            if exc.status in (404, 409):
                raise  # the callers' business: gone, or changed meanwhile
            log.warning("lease API call failed", extra={"method": method, "status": exc.status, "reason": exc.reason})
            raise Unavailable(
                f"the Kubernetes API refused {method} leases ({exc.status} {exc.reason})", retry_after_s=2,
                code="lease_store_unavailable",
            ) from None

    async def _list(self) -> list[dict[str, Any]]:
        body = await self._api_call("GET", query=[("labelSelector", SELECTOR)])
        return list(body.get("items") or [])

    async def _get(self, lease_id: str) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            obj: dict[str, Any] = await self._api_call("GET", lease_id)
        except ApiException as exc:
            if exc.status == 404:
                self.cache.pop(lease_id, None)
                raise not_found(lease_id) from None
            raise
        if parse_lease_object(obj) is None:
            raise not_found(lease_id)  # a Lease of that name that is not a router lease
        return obj

    # --- writes -----------------------------------------------------------------------------

    async def create(self, target: str, devices: tuple[str, ...], uuids: tuple[str, ...], ttl_s: int) -> Lease:
        now = self.clock()
        holders = leases.conflicting(devices, self.all(), now)
        if holders:  # what this replica already knows: no write needed to refuse
            raise leases.conflict_error(target, holders)
        lease = Lease(new_lease_id(), target, devices, ttl_s, acquired_at=now, renewed_at=now, uuids=uuids)
        created = await self._api_call("POST", None, lease_object(lease, self.namespace))
        self.observe(created)
        # Another replica may have taken one of these devices meanwhile: the fresh list settles it.
        others = [x for x in (parse_lease_object(o) for o in await self._list()) if x is not None]
        holders = leases.conflicting(devices, others, self.clock(), other_than=lease.id)
        if holders:
            await self._delete_object(lease.id)
            raise leases.conflict_error(target, holders)
        return lease

    async def renew(self, lease_id: str, ttl_s: int | None) -> Lease:
        from kubernetes.client.exceptions import ApiException

        obj = await self._get(lease_id)
        current = parse_lease_object(obj)
        if current is None or not current.live(self.clock()):
            raise not_found(lease_id)
        lease = current.renewed(self.clock(), ttl_s)
        patch = {
            # The version we read: a concurrent change (or a sweep) makes this write fail, not win.
            "metadata": {"resourceVersion": (obj.get("metadata") or {}).get("resourceVersion")},
            "spec": {"renewTime": micro_time(lease.renewed_at), "leaseDurationSeconds": lease.ttl_s},
        }
        try:
            patched = await self._api_call("PATCH", lease_id, patch, content_type=MERGE_PATCH)
        except ApiException as exc:
            if exc.status == 404:
                raise not_found(lease_id) from None
            if exc.status == 409:
                raise Conflict(f"lease {lease_id!r} changed meanwhile; renew again", code="lease_changed") from None
            raise
        self.observe(patched)
        return lease

    async def delete(self, lease_id: str) -> None:
        obj = await self._get(lease_id)
        current = parse_lease_object(obj)
        if current is None or not current.live(self.clock()):
            raise not_found(lease_id)
        await self._delete_object(lease_id)

    async def _delete_object(self, lease_id: str, version: str | None = None) -> None:
        from kubernetes.client.exceptions import ApiException

        body = {"preconditions": {"resourceVersion": version}} if version else None
        try:
            await self._api_call("DELETE", lease_id, body)
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise
        seen = self.cache.get(lease_id)
        self.cache[lease_id] = (seen[0] if seen else 0, None)

    async def sweep(self) -> None:
        """Delete objects long expired (any replica may; the version precondition keeps a renewal)."""
        now = self.clock()
        for obj in await self._list():
            lease = parse_lease_object(obj)
            if lease is not None and now - lease.expires_at > SWEEP_AFTER_S:
                await self._delete_object(lease.id, (obj.get("metadata") or {}).get("resourceVersion"))

    # --- the watch --------------------------------------------------------------------------

    def apply_event(self, kind: str, payload: Any) -> None:
        if kind == "RESET":
            self.reset(payload)
        elif kind in ("ADDED", "MODIFIED", "DELETED"):
            self.observe(payload, deleted=kind == "DELETED")

    async def run(self) -> None:  # pragma: no cover - needs a cluster (tests/e2e)
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        import_kubernetes()  # here, not first in several threads at once

        def emit(resource: str, kind: str, namespace: str, payload: Any) -> None:
            loop.call_soon_threadsafe(self.apply_event, kind, payload)

        try:
            self.reset(await self._list())  # before the first request, not a watch later
        except Exception as exc:
            log.warning("listing leases failed", extra={"namespace": self.namespace, "error": str(exc)})
        thread = threading.Thread(
            target=_watch, args=(LEASES, self.namespace, SELECTOR, emit, stop), name="watch-router-leases", daemon=True
        )
        thread.start()
        log.info("watching router leases", extra={"namespace": self.namespace, "selector": SELECTOR})
        try:
            while True:
                await asyncio.sleep(SWEEP_INTERVAL_S)
                try:
                    await self.sweep()
                except Exception as exc:
                    log.warning("lease sweep failed", extra={"error": str(exc)})
        finally:
            stop.set()

