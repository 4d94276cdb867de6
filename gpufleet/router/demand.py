"""The router's side of the demand document (``gpufleet.api.demand``, ``GET /api/demand``): per group,
the sequences it has at pods and those it holds until a device serves their group. Pure.

Every group the router knows is listed, with zero counts when idle (a pod reports it, or a ModelGroup
declares it while no pod serves it), so its reader can tell a group nobody asks for from one this
router has never heard of.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from gpufleet.api.demand import DemandReport, GroupDemand
from gpufleet.router import tenancy


def demand_report(
    router: str,
    timestamp: float,
    *,
    groups: Iterable[str],
    in_flight: Mapping[str, int],
    held: Mapping[str, tuple[int, float]],
    service_s: Mapping[str, float],
    fleet_service_s: float | None,
) -> DemandReport:
    """``held``: group -> (sequences, seconds the oldest has waited); ``service_s``: what each group's
    answers taught. A group none of whose answers has been timed yet gets the fleet-wide estimate
    (``fleet_service_s``; None before any): a rough figure beats none to a scaler deciding from zero."""
    out = []
    for key in sorted({*groups, *in_flight, *held}):
        namespace, name = tenancy.split(key)
        waiting, oldest = held.get(key, (0, 0.0))
        service = service_s.get(key, fleet_service_s)
        out.append(
            GroupDemand(
                namespace=namespace,
                group=name,
                in_flight=max(0, in_flight.get(key, 0)),
                waiting=waiting,
                oldest_wait_seconds=round(max(0.0, oldest), 3),
                service_seconds=round(service, 4) if service else None,
            )
        )
    return DemandReport(router=router, timestamp=timestamp, groups=out)
