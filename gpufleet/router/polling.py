"""Polls of the pod servers' JSON endpoints: status documents (static discovery) and queues."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from gpufleet.api.device_report import QueueDocument
from gpufleet.api.pod_status import PodStatus
from gpufleet.router.state import FleetState
from gpufleet.router.upstream import Upstream, UpstreamError, get_json

log = logging.getLogger(__name__)
Headers = list[tuple[bytes, bytes]]
POLL_ERRORS = (UpstreamError, TimeoutError, ValueError, ValidationError)
Doc = TypeVar("Doc", bound=BaseModel)


async def poll_status_once(
    state: FleetState,
    pool: Upstream,
    timeout_s: float,
    headers: Headers,
    *,
    only_missing: bool = False,
    idle_poll_s: float | None = None,
) -> None:
    """Fetch status documents: of every pod, or (``idle_poll_s``) only of those due (``FleetState.due_status``)."""
    async def one(pod_id: str, url: str) -> None:
        status = await _fetch(state, pool, pod_id, url, "/api/status", PodStatus, timeout_s, headers)
        if status is not None:
            state.observe_status(pod_id, status)

    records = state.due_status(idle_poll_s) if idle_poll_s is not None else list(state.pods.values())
    targets = [(rec.id, rec.url) for rec in records if rec.url and not (only_missing and rec.annotated)]
    await asyncio.gather(*(one(pod_id, url) for pod_id, url in targets))


async def poll_queues_once(
    state: FleetState, pool: Upstream, timeout_s: float, headers: Headers, *, idle_poll_s: float | None = None
) -> None:
    """Fetch queue documents: of every pod with a status, or (``idle_poll_s``) only of idle ones."""
    async def one(pod_id: str, url: str) -> None:
        doc = await _fetch(state, pool, pod_id, url, "/api/queue", QueueDocument, timeout_s, headers)
        if doc is not None:
            state.observe_queue(pod_id, doc)

    # Only pods that have published a status: the rest are not routable yet anyway.
    records = state.due_queue(idle_poll_s) if idle_poll_s is not None else list(state.pods.values())
    targets = [(rec.id, rec.url) for rec in records if rec.url and rec.status is not None]
    await asyncio.gather(*(one(pod_id, url) for pod_id, url in targets))


async def _fetch(
    state: FleetState, pool: Upstream, pod_id: str, url: str, path: str, model: type[Doc], timeout_s: float,
    headers: Headers,
) -> Doc | None:
    """One poll's document, or None with the failure noted against the pod (its outlier count)."""
    try:
        return model.model_validate(await get_json(pool, url, path, headers, timeout_s))
    except POLL_ERRORS as exc:
        state.observe_failure(pod_id, f"{path} poll: {type(exc).__name__}: {exc}"[:300])
        return None


async def every(interval_s: float, action: Callable[[], Awaitable[None]], what: str) -> None:
    """Run ``action()`` now and then every ``interval_s`` until cancelled; errors are logged, never fatal."""
    while True:
        try:
            await action()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("periodic task failed", extra={"task": what})
        await asyncio.sleep(interval_s)
