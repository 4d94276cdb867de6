"""Liveness and readiness routes, and the paths that need no API key, for every gpufleet server.

Both the pod server and the router answer ``/health`` and ``/v2/health/live`` (the process
answers) and ``/ready`` and ``/v2/health/ready`` (200 when it can serve, else 503, with a body
saying why); probes and Prometheus reach them without a key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

OPEN_PATHS = ("/health", "/ready", "/v2/health/live", "/v2/health/ready", "/metrics")

# The readiness document of a server; its "ready" key decides 200 or 503.
Readiness = Callable[[Request], Mapping[str, Any]]


def install_health_routes(app: FastAPI, readiness: Readiness) -> None:
    @app.get("/health")
    @app.get("/v2/health/live")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    @app.get("/v2/health/ready")
    async def ready(request: Request) -> JSONResponse:
        body = dict(readiness(request))
        return JSONResponse(body, status_code=200 if body.get("ready") else 503)
