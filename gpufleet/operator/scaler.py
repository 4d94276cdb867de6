"""The scaling loop: every ``autoscale_seconds``, demand decides residency and pod counts.

Each round fetches the demand document (``gpufleet.api.demand``) from every router named in
``demand_urls`` (read-only GETs: the routers need no access to the custom resources), runs
``gpufleet.operator.scaling`` over every GpuPool and every dedicated ModelGroup with
``spec.autoscaling``, keeps the results in the ``ScaleBook`` the reconciler reads, and
reconciles an object when its result changed. Every change is one structured log line with
its inputs, and an event on the object.

Without demand (no router answered), nothing changes: a pool is never scaled down, or its
groups released, on missing figures.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence

from pydantic import ValidationError

from gpufleet.api.demand import DEMAND_PATH, DemandReport, GroupDemand, merge
from gpufleet.autoscale.replicas import ReplicaDecision
from gpufleet.autoscale.residency import GroupDecision
from gpufleet.operator.scaling import PoolRound

log = logging.getLogger("gpufleet.operator.scaler")
FETCH_TIMEOUT_S = 2.0

def router_urls(url: str) -> list[str]:
    """One URL per address its host name resolves to: a headless Service's name gives every
    router replica (each holds only its own waiting requests); an address gives itself."""
    parts = urllib.parse.urlsplit(url.rstrip("/"))
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return [url]  # let the fetch say what is wrong
    addresses = sorted({str(info[4][0]) for info in infos})
    if len(addresses) <= 1 or parts.scheme == "https":  # TLS needs the name, not an address
        return [url]
    return [f"{parts.scheme}://{f'[{a}]' if ':' in a else a}:{port}{parts.path}" for a in addresses]


def fetch_demand(
    urls: Sequence[str], timeout_s: float = FETCH_TIMEOUT_S
) -> tuple[dict[str, GroupDemand] | None, list[str]]:
    """Every router's document, merged; None when none answered. Blocking: run it in a thread."""
    reports: list[DemandReport] = []
    errors: list[str] = []
    for url in [u for given in urls for u in router_urls(given)]:
        try:
            with urllib.request.urlopen(url.rstrip("/") + DEMAND_PATH, timeout=timeout_s) as answer:
                reports.append(DemandReport.model_validate(json.loads(answer.read())))
        except (OSError, ValueError, ValidationError) as exc:
            errors.append(f"{url}: {exc}")
    return (merge(reports) if reports else None), errors


def residency_events(pool: str, result: PoolRound) -> list[tuple[str, str, str]]:
    out = []
    for d in result.residency.decisions:
        if not d.changed:
            continue
        wait = "inf" if d.wait_s == float("inf") else f"{d.wait_s:.2f}s"
        out.append(
            (
                "Normal",
                "ResidencyChanged",
                f"group {d.group}: {d.before} -> {d.after} device(s) current ({d.demand:g} sequences, expected wait"
                f" {wait} vs switch {d.switch_s:.2f}s: {d.reason})",
            )
        )
    return out


def replica_event(decision: ReplicaDecision) -> tuple[str, str, str]:
    reason = "ScaledUp" if decision.after > decision.before else "ScaledDown"
    return (
        "Normal",
        reason,
        f"pods {decision.before} -> {decision.after} ({decision.sequences:g} sequences, {decision.waiting} waiting"
        f" at routers; recommended {decision.recommended}: {decision.reason})",
    )


def _log_decision(message: str, changed: bool, fields: Callable[[], dict[str, object]]) -> None:
    """One structured line with the decision's inputs: at info when it changed something, else at debug
    (a decision that holds repeats every round). ``fields`` is built only when the line is written."""
    level = logging.INFO if changed else logging.DEBUG
    if log.isEnabledFor(level):
        log.log(level, message, extra=fields())


def _residency_fields(namespace: str, pool: str, d: GroupDecision) -> dict[str, object]:
    return {
        "namespace": namespace, "pool": pool, "group": d.group, "before": d.before, "after": d.after,
        "need": d.need, "demand": d.demand, "resident": d.resident,
        "expected_wait_s": None if d.wait_s == float("inf") else round(d.wait_s, 4),
        "switch_s": round(d.switch_s, 4), "reason": d.reason,
    }  # fmt: skip


def log_pool_round(namespace: str, pool: str, result: PoolRound) -> None:
    for d in result.residency.decisions:
        _log_decision("residency decision", d.changed, functools.partial(_residency_fields, namespace, pool, d))
    if result.replicas is not None:
        log_replicas("GpuPool", namespace, pool, result.replicas)


def log_replicas(kind: str, namespace: str, name: str, d: ReplicaDecision) -> None:
    _log_decision("replicas decision", d.changed, lambda: {
        "kind": kind, "namespace": namespace, "object": name, "before": d.before, "after": d.after,
        "recommended": d.recommended, "sequences": d.sequences, "waiting": d.waiting, "reason": d.reason,
    })  # fmt: skip


RoundFn = Callable[[Mapping[str, GroupDemand], float], Awaitable[None]]


async def scale_forever(
    period_s: float,
    urls: Sequence[str],
    one_round: RoundFn,
    acting: Callable[[], Awaitable[bool]],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Fetch demand and run ``one_round`` every ``period_s`` while this replica acts."""
    failing = False
    while True:
        started = clock()
        try:
            if await acting():
                demand, errors = await asyncio.to_thread(fetch_demand, urls)
                if demand is None:
                    if not failing:
                        log.warning("no router answered for demand: nothing scales", extra={"errors": errors[:4]})
                    failing = True
                else:
                    if failing or errors:
                        log.info("demand fetched", extra={"errors": errors[:4]})
                    failing = False
                    await one_round(demand, time.time())
        except Exception as exc:  # one bad round must not end the loop
            log.warning("scaling round failed", extra={"error": repr(exc)})
        await sleep(max(0.0, started + period_s - clock()))
