"""The router's ASGI app: the proxy hot path, the fleet API, and the lifespan owning every
shared resource (connection pool, discovery, pollers).

The three OpenAI POST routes go straight to ``Proxy`` as raw ASGI (no framework routing or
body model on the hot path); everything else is a small FastAPI app. ``GuardMiddleware``
wraps both (body cap, API key, x-request-id).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from gpufleet.api.demand import DEMAND_PATH, DemandReport
from gpufleet.api.errors import MethodNotAllowed, ModelNotFound, Unavailable
from gpufleet.router import fleet_api, lease_api
from gpufleet.router.decide import Decider
from gpufleet.router.decision_log import flush_periodically, install_batching
from gpufleet.router.demand import demand_report
from gpufleet.router.discovery import Discovery, make_discovery, pod_headers
from gpufleet.router.lease_store import LeaseStore, MemoryLeaseStore
from gpufleet.router.metrics import RouterMetrics
from gpufleet.router.model_refresh import ModelRefresh
from gpufleet.router.polling import POLL_ERRORS, every, poll_queues_once, poll_status_once
from gpufleet.router.proxy import PROXY_PATHS, Proxy, ProxyConfig, send_error
from gpufleet.router.scale_wait import ScaleWait
from gpufleet.router.settings import RouterSettings
from gpufleet.router.state import Clock, EjectionPolicy, FleetState
from gpufleet.router.upstream import Upstream, UpstreamPool, get_json
from gpufleet.routing import leases as leases_rules
from gpufleet.web.errors import install_error_handlers
from gpufleet.web.health import OPEN_PATHS, install_health_routes
from gpufleet.web.middleware import GuardMiddleware
from gpufleet.web.openapi import install_openapi

log = logging.getLogger(__name__)
# The demand document is for the operator's scaler, as /metrics is for Prometheus: read without the
# clients' API key (it says which groups are asked for and how much, nothing of the requests).
ROUTER_OPEN_PATHS = (*OPEN_PATHS, DEMAND_PATH)


@dataclass
class Runtime:
    settings: RouterSettings
    state: FleetState
    metrics: RouterMetrics
    pool: Upstream  # one keep-alive pool for proxying, polls and the fleet API
    proxy: Proxy
    pod_headers: list[tuple[bytes, bytes]]
    leases: LeaseStore
    waits: ScaleWait
    name: str  # in the demand document: the host name (a Kubernetes pod's is its name)


def make_lease_store(settings: RouterSettings) -> LeaseStore:
    """Kubernetes discovery keeps leases as Lease objects (shared by replicas, kept over restarts)."""
    if settings.discovery == "kubernetes":
        from gpufleet.router.kube_leases import KubeLeaseStore, router_namespace

        return KubeLeaseStore(settings.lease_namespace or router_namespace())
    return MemoryLeaseStore()


def build_runtime(
    settings: RouterSettings, clock: Clock, leases: LeaseStore | None = None, upstream: Upstream | None = None
) -> Runtime:
    """Every shared part of the router; ``upstream`` replaces the HTTP pool (tests: ``MockUpstream``)."""
    metrics = RouterMetrics(per_pod=settings.pod_labels_on)
    state = FleetState(
        clock=clock,
        stale_after_s=settings.stale_after_s,
        ejection=EjectionPolicy(
            settings.eject_after_failures, settings.eject_cooldown_s, settings.eject_cooldown_max_s
        ),
    )

    def on_eject(pod: str, ejected: bool) -> None:
        if ejected:
            metrics.ejection(pod)
        log.warning("pod ejected" if ejected else "pod re-admitted", extra={"pod": pod})

    state.on_eject = on_eject
    store = leases if leases is not None else make_lease_store(settings)
    state.leases = store
    headers = pod_headers(settings)
    decider = Decider(state, metrics, settings.routing_policy)
    pool = upstream or UpstreamPool(
        connect_timeout_s=settings.connect_timeout_s,
        first_byte_s=settings.first_byte_timeout_s,
        idle_s=settings.idle_timeout_s,
        keepalive_s=settings.upstream_keepalive_s,
    )
    refresh = ModelRefresh(lambda: poll_status_once(state, pool, settings.poll_timeout_s, headers), clock)
    config = ProxyConfig(
        retries=settings.retries,
        pod_headers=((b"content-type", b"application/json"), *headers),
        refresh_models=refresh,
    )
    waits = ScaleWait(
        seconds=settings.scale_wait_seconds,
        capacity=settings.scale_wait_queue,
        comment_after_s=settings.scale_wait_comment_seconds,
        metrics=metrics,
    )
    state.on_change = waits.wake
    proxy = Proxy(state, decider, metrics, pool, config, waits)
    return Runtime(settings, state, metrics, pool, proxy, headers, store, waits, socket.gethostname())


class RouterApp:
    """Sends the OpenAI POST routes to the proxy and everything else to the FastAPI app."""

    def __init__(self, api: FastAPI) -> None:
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in PROXY_PATHS and scope["method"] != "POST":
            await send_error(send, MethodNotAllowed(f"{scope['path']} takes POST only", allow="POST"))
            return
        if scope["type"] == "http" and scope["path"] in PROXY_PATHS:
            runtime: Runtime | None = getattr(self.api.state, "runtime", None)
            if runtime is None:
                await send_error(send, Unavailable("the router is starting", retry_after_s=1))
                return
            await runtime.proxy.handle(scope, receive, send)
            return
        await self.api(scope, receive, send)


def create_app(
    settings: RouterSettings,
    *,
    discovery: Discovery | None = None,
    clock: Clock = time.monotonic,
    leases: LeaseStore | None = None,
    upstream: Upstream | None = None,
) -> ASGIApp:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = build_runtime(settings, clock, leases, upstream)
        found = discovery or make_discovery(settings)
        pool, headers = runtime.pool, runtime.pod_headers

        async def poll_queues() -> None:
            await poll_queues_once(
                runtime.state, pool, settings.poll_timeout_s, headers, idle_poll_s=settings.idle_poll_s
            )

        tasks = [
            asyncio.create_task(found.run(runtime.state, pool), name="discovery"),
            asyncio.create_task(every(settings.queue_interval_s, poll_queues, "queue poll"), name="queues"),
            asyncio.create_task(runtime.leases.run(), name="leases"),
        ]
        batching = install_batching()
        if batching is not None:
            tasks.append(asyncio.create_task(flush_periodically(batching), name="decision-log"))
        app.state.runtime = runtime
        gc.freeze()  # start-up objects never die: keep them out of every later collection
        log.info(
            "router started",
            extra={
                "discovery": found.kind,
                "policy": settings.routing_policy,
                "pods": settings.pod_urls,
                "leases": runtime.leases.kind,
            },
        )
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await pool.close()

    api = FastAPI(title="gpufleet router", lifespan=lifespan)
    install_error_handlers(api)
    install_openapi(api, router=True, open_paths=ROUTER_OPEN_PATHS)  # documents the proxied routes too
    _routes(api)
    return GuardMiddleware(
        RouterApp(api), max_body_bytes=settings.max_body_bytes, api_key=settings.api_key, open_paths=ROUTER_OPEN_PATHS
    )


async def fan_out(runtime: Runtime, path: str) -> list[fleet_api.PodDoc]:
    """GET ``path`` from every known pod at once; a pod that fails is reported, not fatal."""
    state = runtime.state

    async def one(rec: Any) -> fleet_api.PodDoc:
        node = (rec.status.node if rec.status else None) or rec.node
        pod_state = state.pod_state(rec)
        try:
            doc = await get_json(runtime.pool, rec.url, path, runtime.pod_headers, runtime.settings.poll_timeout_s)
            return fleet_api.PodDoc(rec.name, node, rec.url, pod_state, doc, tenant=rec.tenant)
        except POLL_ERRORS as exc:
            error = f"{type(exc).__name__}: {exc}"[:200]
            return fleet_api.PodDoc(rec.name, node, rec.url, pod_state, None, error, tenant=rec.tenant)

    records = sorted((r for r in state.pods.values() if r.url), key=lambda r: r.name)
    return list(await asyncio.gather(*(one(r) for r in records)))


def _routes(app: FastAPI) -> None:
    def rt(request: Request) -> Runtime:
        return request.app.state.runtime  # type: ignore[no-any-return]

    async def model_cards(runtime: Runtime) -> list[dict[str, Any]]:
        known = runtime.state.catalog.offered()  # before the await: the watch may change it
        return fleet_api.model_cards(await fan_out(runtime, "/v1/models"), known)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": await model_cards(rt(request))}

    @app.get("/v1/models/{model_id:path}")  # namespace-qualified ids contain a slash
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        for card in await model_cards(rt(request)):
            if card["id"] == model_id:
                return card
        raise ModelNotFound(f"model {model_id!r} does not exist", param="model")

    def device_leases(runtime: Runtime) -> dict[str, dict[str, Any]]:
        return {
            key: {"id": x.id, "expires_at": leases_rules.rfc3339(x.expires_at)}
            for key, x in runtime.state.held_devices().items()
        }

    @app.get("/api/gpu_stats")
    async def gpu_stats(request: Request) -> dict[str, Any]:
        runtime = rt(request)
        return fleet_api.gpu_stats(await fan_out(runtime, "/api/gpu_stats"), device_leases(runtime))

    @app.get("/api/models")
    async def api_models(request: Request) -> dict[str, Any]:
        runtime = rt(request)
        known = list(runtime.state.catalog.groups.values())
        return fleet_api.models(await fan_out(runtime, "/api/models"), known)

    @app.get(DEMAND_PATH, response_model=DemandReport, summary="Demand per group (the operator's scaler reads it)")
    async def api_demand(request: Request) -> DemandReport:  # async: on the loop that changes the state
        """What each group asks of the fleet, as this router sees it (gpufleet.api.demand)."""
        runtime = rt(request)
        state = runtime.state
        return demand_report(
            runtime.name,
            time.time(),
            groups=state.models.values(),
            in_flight=state.group_inflight,
            held=runtime.waits.demand(),
            service_s={g: t.seconds for g, t in state.tickets.group_service.items() if t.seconds is not None},
            fleet_service_s=state.service_s,
        )

    @app.get("/api/queue")
    async def api_queue(request: Request) -> dict[str, Any]:
        runtime = rt(request)
        return fleet_api.queue(
            await fan_out(runtime, "/api/queue"), dict(runtime.state.inflight), device_leases(runtime)
        )

    @app.get("/api/fleet")
    async def api_fleet(request: Request) -> dict[str, Any]:
        runtime = rt(request)
        return {**runtime.state.describe(), "policy": runtime.settings.routing_policy}

    def readiness(request: Request) -> dict[str, Any]:
        runtime = rt(request)
        state = runtime.state
        # A router that can hold requests for groups the resources declare is ready with no pod at all:
        # taken out of its Service, it would never see the requests that scale those groups up.
        holds = runtime.waits.enabled and bool(state.catalog.groups)
        return {"ready": state.ready or holds, "pods": {r.name: state.pod_state(r) for r in state.pods.values()}}

    install_health_routes(app, readiness)

    def lease_parts(request: Request) -> tuple[FleetState, LeaseStore, int]:
        runtime = rt(request)
        return runtime.state, runtime.leases, runtime.settings.lease_max_ttl_s

    lease_api.install(app, lease_parts)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        runtime = rt(request)
        counts: dict[str, int] = {}
        for rec in runtime.state.pods.values():
            s = runtime.state.pod_state(rec)
            counts[s] = counts.get(s, 0) + 1
        for s in ("ready", "ejected", "not_ready", "stale", "unknown"):
            runtime.metrics.pods.labels(s).set(counts.get(s, 0))
        runtime.metrics.leases_now(runtime.state.snapshot())
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def server_config(settings: RouterSettings, discovery: Discovery | None = None) -> Any:
    """The uvicorn configuration of the router, shared by `gpufleet router` and `gpufleet up`
    (``discovery``: tests' own, as for ``create_app``)."""
    import uvicorn

    return uvicorn.Config(
        create_app(settings, discovery=discovery),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,  # every routing decision is already one log line
        proxy_headers=False,
        timeout_graceful_shutdown=30,
        timeout_keep_alive=settings.keep_alive_s,  # longer than clients' pools keep idle connections
    )
