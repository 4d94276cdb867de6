"""Where the router keeps exclusive leases: one small interface, two stores.

- ``MemoryLeaseStore`` (static discovery): in this process; a restart forgets them.
- ``KubeLeaseStore`` (Kubernetes discovery, gpufleet.router.kube_leases): coordination.k8s.io
  Lease objects in the router's namespace, watched, so every replica agrees and a restart
  keeps them.

Reads (``all``, ``get``) are synchronous, from memory, because routing reads them on every
request; expiry is decided by the reader on the store's wall clock, so an expired lease
frees its devices at once, whether or not anything deleted it yet. Writes are async. The
rules (what conflicts, what is live) are gpufleet.routing.leases'.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Protocol

from gpufleet.api.errors import NotFound
from gpufleet.routing import leases
from gpufleet.routing.leases import Lease

WallClock = Callable[[], float]


def new_lease_id() -> str:
    # Also a valid Kubernetes object name (DNS-1123), so the Lease object is named by it.
    return f"lease-{secrets.token_hex(8)}"


def not_found(lease_id: str) -> NotFound:
    return NotFound(f"lease {lease_id!r} does not exist or has expired", param="id", code="lease_not_found")


class LeaseStore(Protocol):
    kind: str

    def now(self) -> float: ...

    def all(self) -> list[Lease]:
        """Every lease known, live or not (readers apply expiry)."""
        ...

    async def create(self, target: str, devices: tuple[str, ...], uuids: tuple[str, ...], ttl_s: int) -> Lease:
        """Take a lease; raises ``Conflict`` when a live lease holds one of the devices."""
        ...

    async def renew(self, lease_id: str, ttl_s: int | None) -> Lease:
        """Restart its TTL from now (optionally a new TTL); raises ``NotFound`` once it expired."""
        ...

    async def delete(self, lease_id: str) -> None: ...

    async def run(self) -> None:
        """Keep the store up to date until cancelled (a watch); nothing for the memory store."""
        ...


def live(store: LeaseStore, lease_id: str) -> Lease:
    now = store.now()
    for lease in store.all():
        if lease.id == lease_id and lease.live(now):
            return lease
    raise not_found(lease_id)


class MemoryLeaseStore:
    kind = "memory"

    def __init__(self, clock: WallClock = time.time) -> None:
        self.clock = clock
        self.leases: dict[str, Lease] = {}

    def now(self) -> float:
        return self.clock()

    def all(self) -> list[Lease]:
        return list(self.leases.values())

    def _prune(self) -> None:
        now = self.clock()
        for gone in [k for k, v in self.leases.items() if not v.live(now)]:
            del self.leases[gone]

    async def create(self, target: str, devices: tuple[str, ...], uuids: tuple[str, ...], ttl_s: int) -> Lease:
        # No await between the check and the insert: one event loop makes it atomic.
        self._prune()
        now = self.clock()
        holders = leases.conflicting(devices, self.leases.values(), now)
        if holders:
            raise leases.conflict_error(target, holders)
        lease = Lease(new_lease_id(), target, devices, ttl_s, acquired_at=now, renewed_at=now, uuids=uuids)
        self.leases[lease.id] = lease
        return lease

    async def renew(self, lease_id: str, ttl_s: int | None) -> Lease:
        current = live(self, lease_id)
        lease = self.leases[lease_id] = current.renewed(self.clock(), ttl_s)
        return lease

    async def delete(self, lease_id: str) -> None:
        live(self, lease_id)
        del self.leases[lease_id]

    async def run(self) -> None:
        return None
