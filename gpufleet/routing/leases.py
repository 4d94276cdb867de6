"""Exclusive leases as pure rules: what a lease holds, when it is live, what conflicts.

A lease keeps a set of devices for the requests that carry its id (header
``x-gpufleet-lease`` or body field ``lease``); everything else is routed elsewhere. It has
no holder: its id is a coordination handle, not a credential (anyone who may call the
router may list leases). Its target is resolved once, when it is taken, with the same
reading as exclusive targets (``policy.select_target``, ambiguity refused), and the
resulting device keys are what it holds, so every router replica agrees on them whatever
its own view of the fleet. Times are Unix seconds (wall clock): leases outlive a router
process and are shared between replicas through Kubernetes.

Routing sees leases through the snapshot: ``Snapshot.leases`` (the live ids) and
``DeviceState.leased_by``; ``policy.eligible`` applies them for every policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from gpufleet.api.errors import Conflict, GpufleetError, InvalidRequest, Unavailable
from gpufleet.routing.policy import Decision, DeviceState, Outcome, Snapshot, select_target

HEADER = "x-gpufleet-lease"
MIN_TTL_S = 1


@dataclass(frozen=True)
class Lease:
    id: str
    target: str  # as the client named it
    devices: tuple[str, ...]  # "pod/device" keys it holds, resolved when it was taken
    ttl_s: int
    acquired_at: float  # Unix seconds
    renewed_at: float  # the TTL counts from here
    uuids: tuple[str, ...] = ()  # the held GPUs' UUIDs, where known (for people reading it)

    @property
    def expires_at(self) -> float:
        return self.renewed_at + self.ttl_s

    def live(self, now: float) -> bool:
        return now < self.expires_at

    def renewed(self, now: float, ttl_s: int | None = None) -> Lease:
        return dataclasses.replace(self, renewed_at=now, ttl_s=ttl_s if ttl_s is not None else self.ttl_s)


class LeaseView(Protocol):
    """What routing needs of a lease store: its leases and its wall clock."""

    def now(self) -> float: ...

    def all(self) -> Iterable[Lease]: ...


class NoLeases:
    def now(self) -> float:
        return 0.0

    def all(self) -> Iterable[Lease]:
        return ()


def rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def document(lease: Lease, now: float) -> dict[str, object]:
    """The lease as the router's API shows it."""
    return {
        "id": lease.id,
        "object": "lease",
        "target": lease.target,
        "devices": list(lease.devices),
        "gpu_uuids": list(lease.uuids),
        "ttl_s": lease.ttl_s,
        "acquired_at": rfc3339(lease.acquired_at),
        "renewed_at": rfc3339(lease.renewed_at),
        "expires_at": rfc3339(lease.expires_at),
        "expires_in_s": round(max(0.0, lease.expires_at - now), 3),
    }


def live_leases(leases: Iterable[Lease], now: float) -> list[Lease]:
    return [lease for lease in leases if lease.live(now)]


def held_devices(leases: Iterable[Lease], now: float) -> dict[str, Lease]:
    """Device key -> the live lease holding it. Should two live leases claim one device
    (two routers racing, see ``KubeLeaseStore``), the earlier one holds it."""
    held: dict[str, Lease] = {}
    for lease in sorted(live_leases(leases, now), key=lambda x: (x.acquired_at, x.id)):
        for key in lease.devices:
            held.setdefault(key, lease)
    return held


def with_leases(snap: Snapshot, leases: Iterable[Lease], now: float) -> Snapshot:
    """``snap`` with its devices marked by the live leases holding them."""
    live = live_leases(leases, now)
    if not live:
        return snap
    held = held_devices(live, now)
    devices = tuple(
        dataclasses.replace(d, leased_by=held[d.key].id) if d.key in held else d for d in snap.devices
    )
    return dataclasses.replace(snap, devices=devices, leases=frozenset(x.id for x in live))


def check_ttl(ttl_s: int, max_ttl_s: int) -> None:
    if not MIN_TTL_S <= ttl_s <= max_ttl_s:
        raise InvalidRequest(
            f"ttl_s: must be between {MIN_TTL_S} and {max_ttl_s} seconds, not {ttl_s}", param="ttl_s",
            code="invalid_ttl",
        )


def resolve(target: str, devices: Sequence[DeviceState]) -> list[DeviceState]:
    """The devices a lease on ``target`` would hold; raises the client's error when it names none or is ambiguous."""
    found = select_target(devices, target)
    if isinstance(found, Decision):
        code = "unknown_device" if found.outcome is Outcome.UNKNOWN_TARGET else "ambiguous_device"
        known = sorted(d.key for d in devices)
        detail = found.reason.replace("exclusive target", "lease target")
        if found.outcome is Outcome.UNKNOWN_TARGET:
            detail += f" (devices: {', '.join(known[:20]) or 'none'})"
        raise InvalidRequest(detail, param="target", code=code)
    return sorted(found, key=lambda d: d.key)


def conflicting(
    devices: Iterable[str], leases: Iterable[Lease], now: float, *, other_than: str | None = None
) -> list[Lease]:
    """Live leases (other than ``other_than``) that already hold one of ``devices``."""
    wanted = set(devices)
    return [x for x in live_leases(leases, now) if x.id != other_than and wanted & set(x.devices)]


def conflict_error(target: str, holders: Sequence[Lease]) -> Conflict:
    taken = sorted({k for x in holders for k in x.devices})
    until = rfc3339(min(x.expires_at for x in holders))
    return Conflict(
        f"lease target {target!r}: device(s) {', '.join(taken)} already held by another lease (until {until} "
        "at the earliest)",
        param="target",
        code="device_leased",
    )


def refusal(decision: Decision, exclusive: str | None, lease: str | None, retry_after_s: float) -> GpufleetError | None:
    """The client's error for a lease refusal (None: not a lease refusal). ``retry_after_s``:
    until the earliest live lease expires."""
    outcome = decision.outcome
    if outcome is Outcome.LEASED:
        if exclusive:
            return Conflict(
                f"exclusive_gpu {exclusive!r} is held by a lease: send its id in the {HEADER} header or the "
                "body field 'lease', or wait until it expires (GET /api/leases)",
                param="exclusive_gpu",
                code="device_leased",
            )
        return Unavailable(
            "every device that could serve this request is held by a lease", retry_after_s=retry_after_s,
            code="all_devices_leased",
        )
    if outcome is Outcome.UNKNOWN_LEASE:
        return InvalidRequest(
            f"lease {lease!r} is unknown or has expired: take one with POST /api/leases", param="lease",
            code="unknown_lease",
        )
    if outcome is Outcome.LEASE_MISMATCH:
        return InvalidRequest(decision.reason, param="exclusive_gpu", code="lease_mismatch")
    if outcome is Outcome.GROUP_NOT_SERVED and lease is not None and not exclusive:
        return InvalidRequest(f"lease {lease!r}: {decision.reason}", param="lease", code="target_lacks_model")
    if outcome is Outcome.TARGET_DOWN and lease is not None:
        return Unavailable(
            f"the device(s) of lease {lease!r} are down or not ready", retry_after_s=5, code="target_unavailable"
        )
    return None
