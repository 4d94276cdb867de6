"""Routing decisions at the router: model -> group -> policy over the fleet snapshot.

Every decision is logged as one structured line and counted in metrics; refusals become
the client-facing errors of ``gpufleet.api.errors``.
"""

from __future__ import annotations

import logging

from gpufleet.api.errors import GpufleetError, ModelNotFound, Unavailable
from gpufleet.router.decision_log import ROUTE_LOGGER
from gpufleet.router.metrics import RouterMetrics
from gpufleet.router.state import FleetState
from gpufleet.routing import leases
from gpufleet.routing.alternatives import POLICIES, Policy
from gpufleet.routing.policy import Decision, RouteRequest
from gpufleet.routing.refusal import RefusalContext, refusal_error, retry_after_s

log = logging.getLogger(ROUTE_LOGGER)
MAX_LOGGED_CANDIDATES = 8


class Decider:
    def __init__(self, state: FleetState, metrics: RouterMetrics, policy_name: str) -> None:
        self.state = state
        self.metrics = metrics
        self.policy_name = policy_name
        self.policy: Policy = POLICIES[policy_name]

    def group_of(self, model: str) -> str:
        group = self.state.models.get(model)
        if group is None:
            if not self.state.models:
                raise Unavailable("no pod server has reported its models yet", retry_after_s=2, code="no_pods")
            raise ModelNotFound(f"model {model!r} does not exist", param="model")
        return group

    def decide(
        self, request_id: str, model: str, group: str, exclusive: str | None, exclude: frozenset[str], attempt: int,
        lease: str | None = None,
    ) -> Decision:
        request = RouteRequest(group=group, exclusive=exclusive, sequence=self.state.sequence, lease=lease)
        decision = self.state.decide(request, self.policy, exclude)
        choice = decision.choice
        if log.isEnabledFor(logging.INFO):
            self._log(request_id, model, group, exclusive, attempt, decision, lease)
        self.metrics.decision(
            self.policy_name,
            decision.outcome.value,
            decision.reason if decision.routed else "",  # refusal reasons carry free text
            choice.pod if choice else "",
            choice.device if choice else "",
        )
        return decision

    def peek(self, group: str) -> Decision:
        """The decision a plain request of ``group`` would get now, neither logged nor counted: what a
        held request looks at when the fleet changes (gpufleet.router.scale_wait)."""
        return self.state.decide(RouteRequest(group=group, sequence=self.state.sequence), self.policy)

    def _log(
        self, request_id: str, model: str, group: str, exclusive: str | None, attempt: int, decision: Decision,
        lease: str | None = None,
    ) -> None:
        """One structured line per decision."""
        choice = decision.choice
        extra: dict[str, object] = {
            "request_id": request_id,
            "model": model,
            "group": group,
            "outcome": decision.outcome.value,
            "reason": decision.reason,
            "pod": choice.pod if choice else None,
            "device": choice.device if choice else None,
            "candidates": [f"{c.key} {c.note} {c.cost_s}" for c in decision.candidates[:MAX_LOGGED_CANDIDATES]],
        }
        if exclusive is not None:
            extra["exclusive_gpu"] = exclusive
        if lease is not None:
            extra["lease"] = lease
        if attempt:
            extra["attempt"] = attempt
        log.info("route", extra=extra)

    def refusal(
        self, decision: Decision, group: str, exclusive: str | None, lease: str | None = None
    ) -> GpufleetError:
        held = self.state.held_devices().values()
        wait = min((x.expires_at for x in held), default=self.state.leases.now() + 1) - self.state.leases.now()
        lease_error = leases.refusal(decision, exclusive, lease, retry_after_s=wait)
        if lease_error is not None:
            return lease_error
        snap = self.state.snapshot()
        ctx = RefusalContext("this fleet", tuple(sorted({d.key for d in snap.devices})))
        return refusal_error(decision, group, exclusive, ctx, retry_after_s(snap.devices, snap.costs))
