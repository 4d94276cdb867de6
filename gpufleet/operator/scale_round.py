"""One scaling round over every GpuPool and autoscaled ModelGroup (called by ``scaler``).

Reads from the watch caches (no API call), decides with ``scaling``, records the results in
the reconciler's ``ScaleBook``, and reconciles each object whose result changed (its
placement or its StatefulSet's replicas), posting an event for each change before applying it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from gpufleet.api import gpupool, labels
from gpufleet.api.demand import GroupDemand
from gpufleet.operator.reconcile import InvalidSpec, Reconciler, bound_groups, parse_pool_spec, parse_spec, pool_of
from gpufleet.operator.scale_book import Key, PoolFigures
from gpufleet.operator.scaler import log_pool_round, log_replicas, replica_event, residency_events
from gpufleet.operator.scaling import plan_group, plan_pool
from gpufleet.operator.status import pod_view

Event = tuple[str, str, str]
Post = Callable[[dict[str, Any], list[Event]], Awaitable[None]]
Reconcile = Callable[[str, str], Awaitable[None]]


class ScaleRound:
    def __init__(
        self,
        reconciler: Reconciler,
        reads: Any,  # IndexedReads: pool_keys(), group_keys(), pool(), group(), groups()
        pods_of_pool: Callable[[str, str], list[dict[str, Any]]],
        reconcile_pool: Reconcile,
        reconcile_group: Reconcile,
        post: Post,
    ) -> None:
        self.reconciler = reconciler
        self.reads = reads
        self.pods_of_pool = pods_of_pool
        self.reconcile_pool = reconcile_pool
        self.reconcile_group = reconcile_group
        self.post = post

    async def __call__(self, demand: Mapping[str, GroupDemand], now: float) -> None:
        seen: set[Key] = set()
        for namespace, name, _ in self.reads.pool_keys():
            seen.add((gpupool.KIND, namespace, name))
            await self._pool(namespace, name, demand, now)
        for namespace, name, _ in self.reads.group_keys():
            seen.add((labels.KIND, namespace, name))
            await self._group(namespace, name, demand, now)
        self.reconciler.book.forget(seen)

    async def _pool(self, namespace: str, name: str, demand: Mapping[str, GroupDemand], now: float) -> None:
        body = self.reads.pool(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        book = self.reconciler.book
        key: Key = (gpupool.KIND, namespace, name)
        try:
            spec = self.reconciler.scaled_spec(
                parse_pool_spec(dict(body), self.reconciler.options.defaults), gpupool.KIND, namespace, name, self.reads
            )
        except InvalidSpec:
            return  # the pool's status says why
        served, _, _ = bound_groups(name, [dict(g) for g in self.reads.groups(namespace) or []])
        views = [pod_view(p) for p in self.pods_of_pool(namespace, name)]
        result = plan_pool(namespace, spec, spec.replicas, served, views, demand, book.memory_for(key), now)
        log_pool_round(namespace, name, result)
        figures = PoolFigures(
            {
                g.name: (result.current.get(g.name, 0), result.residency.desired.get(g.name, 0), result.demand[g.name])
                for g in served
            }
        )
        before = book.figures(namespace, name)
        changed = book.set_residency(namespace, name, result.residency.desired, figures)
        events = residency_events(name, result)
        if result.replicas is not None:
            changed |= book.set_replicas(key, result.replicas.after, _rfc3339(now))
            if result.replicas.changed:
                events.append(replica_event(result.replicas))
        self.reconciler.metrics.scaled(gpupool.KIND, namespace, name, spec.replicas, result)
        # The events go out before the change is applied, so whoever sees the change can read why.
        if events:
            await self.post(dict(body), events)
        if changed or before is None or _shown(before) != _shown(figures):
            await self.reconcile_pool(namespace, name)

    async def _group(self, namespace: str, name: str, demand: Mapping[str, GroupDemand], now: float) -> None:
        body = self.reads.group(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp") or pool_of(body) is not None:
            return
        try:
            spec = parse_spec(dict(body), self.reconciler.options.defaults)
        except InvalidSpec:
            return
        if spec.autoscaling is None:
            return
        book = self.reconciler.book
        key: Key = (labels.KIND, namespace, name)
        replicas_now = self.reconciler.scaled_spec(spec, labels.KIND, namespace, name, self.reads).replicas
        decision = plan_group(
            namespace, name, spec.autoscaling, spec.gpus_per_pod, replicas_now, demand, book.memory_for(key), now
        )
        log_replicas(labels.KIND, namespace, name, decision)
        self.reconciler.metrics.scaled_group(namespace, name, decision)
        if decision.changed:
            await self.post(dict(body), [replica_event(decision)])
        if book.set_replicas(key, decision.after, _rfc3339(now)):
            await self.reconcile_group(namespace, name)


def _shown(figures: PoolFigures) -> dict[str, tuple[int, int]]:
    """What a status shows of the figures (current, desired): demand alone changes no status."""
    return {g: (c, d) for g, (c, d, _) in figures.groups.items()}


def _rfc3339(unix: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(unix, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
