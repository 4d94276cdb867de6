"""The time a request holds its device, learned from answers: one estimator for router, pod and bench.

Only requests that found their device idle teach it (a queued request's latency includes
waiting, which the cost model adds separately). An exponentially weighted mean follows a
workload that changes; samples are clamped so one stuck request cannot poison it.
"""

from __future__ import annotations

import dataclasses

from gpufleet.routing.policy import Costs

EWMA = 0.2
SERVICE_S_MIN, SERVICE_S_MAX = 0.005, 120.0
REBUILD_SHARE = 0.05  # Costs are rebuilt only when the estimate moves this much (decisions stay cheap)


class ServiceTime:
    def __init__(self, initial_s: float | None = None) -> None:
        self.seconds = initial_s
        self._costs: Costs | None = None
        self._costs_for: tuple[int, float] | None = None

    def observe(self, seconds: float) -> None:
        s = min(SERVICE_S_MAX, max(SERVICE_S_MIN, seconds))
        self.seconds = s if self.seconds is None else self.seconds + EWMA * (s - self.seconds)

    def costs(self, base: Costs) -> Costs:
        """``base`` with the learned service time, once there is one."""
        if self.seconds is None:
            return base
        seen = self._costs_for
        if seen is None or seen[0] != id(base) or abs(self.seconds - seen[1]) > REBUILD_SHARE * seen[1]:
            self._costs_for = (id(base), self.seconds)
            self._costs = dataclasses.replace(base, service_s=round(self.seconds, 4))
        assert self._costs is not None
        return self._costs
