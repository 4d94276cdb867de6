"""What a routing refusal tells the client, how long to wait, and when another device may be tried.

Written once for the router and the pod server: the same ``Decision`` gives the same HTTP status,
error code and ``Retry-After`` wherever it was made. Only the context differs (which devices
the caller knows, what a failed load said), and it is passed in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gpufleet.api.errors import GpufleetError, InvalidRequest, Overloaded, Unavailable
from gpufleet.routing.policy import Costs, Decision, DeviceState, Outcome, expected_wait_s

RETRY_AFTER_MIN_S = 1.0
GROUP_FAILED_RETRY_S = 30.0
DOWN_RETRY_S = 5.0

# Answers of a pod that another device may serve instead, and those that count as the pod failing.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
FAILURE_STATUSES = frozenset({500, 502, 504})  # 429/503 are the pod being honest, not failing


@dataclass(frozen=True)
class RefusalContext:
    scope: str  # "this server" or "this fleet": where the target was looked for
    known_devices: tuple[str, ...] = ()  # named in an unknown-target error
    failed_detail: str | None = None  # what the failed load said, when known


def retry_after_s(devices: Iterable[DeviceState], costs: Costs) -> float:
    """When a saturated request could next find a batch slot: the shortest expected wait among
    the healthy devices, never under a second (clients should not spin)."""
    waits = [expected_wait_s(d, costs) for d in devices if d.healthy]
    return max(RETRY_AFTER_MIN_S, min(waits, default=RETRY_AFTER_MIN_S))


def refusal_error(
    decision: Decision, group: str, exclusive: str | None, ctx: RefusalContext, retry_s: float
) -> GpufleetError:
    """The client-facing error of a refused ``decision`` (``retry_s``: from ``retry_after_s``)."""
    outcome = decision.outcome
    if outcome is Outcome.UNKNOWN_TARGET:
        known = ", ".join(ctx.known_devices[:20]) or "none"
        return InvalidRequest(
            f"exclusive_gpu {exclusive!r} names no pod, node or device of {ctx.scope} (devices: {known})",
            param="exclusive_gpu",
            code="unknown_device",
        )
    if outcome is Outcome.AMBIGUOUS_TARGET:
        return InvalidRequest(decision.reason, param="exclusive_gpu", code="ambiguous_device")
    if outcome is Outcome.SATURATED:
        return Overloaded(f"every eligible device queue is full for group {group!r}", retry_after_s=retry_s)
    if outcome is Outcome.TARGET_DOWN:
        if exclusive:
            return Unavailable(
                f"exclusive_gpu {exclusive!r} is down or not ready", retry_after_s=DOWN_RETRY_S,
                code="target_unavailable",
            )
        return Unavailable(f"no ready device can serve group {group!r}", retry_after_s=DOWN_RETRY_S,
                           code="no_ready_pod")
    if outcome is Outcome.GROUP_FAILED:
        detail = f": {ctx.failed_detail}" if ctx.failed_detail else ""
        return Unavailable(
            f"model group {group!r} failed to load on every eligible device{detail}",
            retry_after_s=GROUP_FAILED_RETRY_S,
            code="model_load_failed",
        )
    return Unavailable(f"no device of {ctx.scope} can serve group {group!r}: {decision.reason}",
                       retry_after_s=DOWN_RETRY_S, code="no_pods")


def may_retry_elsewhere(status: int, next_choice: DeviceState, group: str) -> bool:
    """After a pod answered ``status``, may the request go to ``next_choice``?

    A full pod (429) is back-pressure, not a failure: pass it on rather than make another device
    switch groups for one request. Any other retryable answer may go anywhere eligible.
    """
    if status not in RETRY_STATUSES:
        return False
    if status == 429:
        return next_choice.resident_group() == group or group in next_choice.cached_groups
    return True
