"""The pod server's FastAPI app: routes, and the lifespan that owns every shared resource."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gpufleet.api.errors import ModelNotFound
from gpufleet.api.headers import EXCLUSIVE_DEVICE_HEADER, MODEL_HEADER, ROUTED_DEVICE_HEADER
from gpufleet.api.model_groups import ModelGroupsFile
from gpufleet.api.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from gpufleet.pod_server.gpu_stats import GpuStats, open_stats_source
from gpufleet.pod_server.group_reload import ConfigWatcher
from gpufleet.pod_server.handlers import OpenAIHandlers
from gpufleet.pod_server.heap import startup_heap_frozen
from gpufleet.pod_server.load_header import LoadHeaderMiddleware
from gpufleet.pod_server.metrics import PodMetrics
from gpufleet.pod_server.service import PodService
from gpufleet.pod_server.settings import PodServerSettings
from gpufleet.pod_server.status_publisher import run_status_publisher
from gpufleet.pod_server.validate import Validator
from gpufleet.web.errors import install_error_handlers
from gpufleet.web.health import OPEN_PATHS, install_health_routes
from gpufleet.web.middleware import GuardMiddleware
from gpufleet.web.openapi import install_openapi

log = logging.getLogger(__name__)


def create_app(
    settings: PodServerSettings,
    groups: ModelGroupsFile,
    *,
    groups_path: Path | None = None,
    groups_hash: str | None = None,
    refused: Mapping[str, str] | None = None,
) -> FastAPI:
    """The app serving ``groups``: read from ``groups_path`` (default: MODEL_GROUPS), whose bytes
    hash to ``groups_hash``, less the ``refused`` groups; reloaded from there when
    MODEL_GROUPS_RELOAD_S is set."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = PodMetrics(settings.pod_name or "local", settings.pod_namespace or "")
        service = PodService(settings, groups, metrics, refused=refused, groups_hash=groups_hash)
        stats = GpuStats(open_stats_source(settings.devices), settings.devices, service.ledger)
        service.device_uuids = {d: stats.source.uuid(d) for d in settings.devices}
        app.state.service = service
        app.state.metrics = metrics
        app.state.stats = stats
        tokenizers = service.tokenizers  # the pod's one tokenizer per model, shared with the loaders
        validator = Validator(groups, tokenizers, settings.max_tokens_default)
        app.state.handlers = OpenAIHandlers(service, validator, metrics)

        def serve(new: ModelGroupsFile) -> None:  # a reloaded model_groups.json: what requests may name
            validator.groups = new  # (the service forgets the tokenizers of the models that left)

        service.groups_listeners.append(serve)
        watcher = ConfigWatcher(
            service,
            groups_path=groups_path or settings.model_groups,
            placement_path=settings.placement,
            interval_s=settings.model_groups_reload_s,
            groups_hash=groups_hash,
            default_group=settings.default_group,
        )
        with startup_heap_frozen():  # after the imports, before any model is loaded: see heap.py
            await service.start()
            await watcher.poll()  # the placement, before the preload that leaves placed devices to it
            background: list[asyncio.Task[Any]] = []
            if settings.model_groups_reload_s > 0:
                background.append(asyncio.create_task(watcher.run(), name="config-reload"))
            if not settings.lazy_load_model:
                service.preload_task = asyncio.create_task(service.preload_default(), name="preload")
                background.append(service.preload_task)
            if settings.status_annotation:
                background.append(asyncio.create_task(run_status_publisher(service, settings), name="status"))
            log.info(
                "pod server started",
                extra={"devices": settings.devices, "groups": sorted(service.groups.groups), "refused": refused or {}},
            )
            try:
                yield
            finally:
                for t in background:
                    t.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                await service.stop()
                tokenizers.close()
                stats.source.close()

    app = FastAPI(title="gpufleet pod server", lifespan=lifespan)
    install_error_handlers(app)
    install_openapi(app, router=False)

    def load() -> str:
        service: PodService | None = getattr(app.state, "service", None)
        return service.load_header() if service is not None else "TEXT "

    app.add_middleware(LoadHeaderMiddleware, report=load)
    app.add_middleware(
        GuardMiddleware, max_body_bytes=settings.max_body_bytes, api_key=settings.api_key, open_paths=OPEN_PATHS
    )
    _routes(app)
    return app


def _routes(app: FastAPI) -> None:
    def svc(request: Request) -> PodService:
        return request.app.state.service  # type: ignore[no-any-return]

    def handlers(request: Request) -> OpenAIHandlers:
        return request.app.state.handlers  # type: ignore[no-any-return]

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        h, rid, device = handlers(request), _request_id(request), _routed_device(request)
        return await h.chat(_as_routed(body, request), request.receive, rid, device)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        h, rid, device = handlers(request), _request_id(request), _routed_device(request)
        return await h.completion(_as_routed(body, request), request.receive, rid, device)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
        h, rid, device = handlers(request), _request_id(request), _routed_device(request)
        return await h.embeddings(_as_routed(body, request), request.receive, rid, device)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": _model_cards(svc(request))}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        for card in _model_cards(svc(request)):
            if card["id"] == model_id:
                return card
        raise ModelNotFound(f"model {model_id!r} does not exist", param="model")

    @app.get("/api/gpu_stats")
    async def gpu_stats(request: Request) -> dict[str, Any]:
        stats: GpuStats = request.app.state.stats
        return await asyncio.to_thread(stats.document)

    @app.get("/api/models")
    async def api_models(request: Request) -> dict[str, Any]:
        return svc(request).models_document()

    @app.get("/api/queue")
    async def api_queue(request: Request) -> dict[str, Any]:
        return svc(request).queue_document()

    @app.get("/api/status")
    async def api_status(request: Request) -> dict[str, Any]:
        return svc(request).status().model_dump(mode="json")

    def readiness(request: Request) -> dict[str, Any]:
        s = svc(request)
        current = {d: sch.residency.current_group for d, sch in s.schedulers.items()}
        return {"ready": s.ready, "default_group": s.groups.default_group, "current_groups": current}

    install_health_routes(app, readiness)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        m: PodMetrics = request.app.state.metrics
        stats: GpuStats = request.app.state.stats
        svc(request).refresh_kv_metrics()
        svc(request).refresh_memory_metrics()
        for device, r in (await asyncio.to_thread(stats.sample)).items():
            labels = m.labels(device)
            m.gpu_util.labels(**labels).set(r.utilization)
            m.gpu_mem_used.labels(**labels).set(r.memory_used * 1024**3)
            m.gpu_mem_total.labels(**labels).set(r.memory_total * 1024**3)
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)


def _request_id(request: Request) -> str | None:
    # Set by GuardMiddleware: the client's x-request-id, or a fresh one.
    rid = request.scope.get("state", {}).get("request_id")
    return str(rid) if rid is not None else None


def _routed_device(request: Request) -> str | None:
    # The device the router chose for this request: honoured while it is still eligible.
    return request.headers.get(ROUTED_DEVICE_HEADER)


Routable = TypeVar("Routable", ChatCompletionRequest, CompletionRequest, EmbeddingRequest)


def _as_routed(body: Routable, request: Request) -> Routable:
    """A request the router decided on carries the client's own bytes, and the router's decisions
    in headers (gpufleet.api.headers): the pod-local exclusive device (the client's target or lease,
    resolved) and the pod's own model id. Its body's ``exclusive_gpu`` and ``lease`` were for the
    router: they are replaced by what the router resolved, not read again here."""
    headers = request.headers
    if ROUTED_DEVICE_HEADER not in headers:
        return body
    return body.model_copy(
        update={
            "exclusive_gpu": headers.get(EXCLUSIVE_DEVICE_HEADER),
            "lease": None,
            "model": headers.get(MODEL_HEADER) or body.model,
        }
    )


def _model_cards(service: PodService) -> list[dict[str, Any]]:
    """The models a request may name here: those of groups that some device of this pod could load
    (a group too big for every device is listed in the status document, not here)."""
    unservable = service.unservable_groups()
    return [
        {"id": m.id, "object": "model", "created": 0, "owned_by": "gpufleet", "group": g, "task": m.task}
        for g, spec in service.groups.groups.items()
        if g not in unservable
        for m in spec.models
    ]
