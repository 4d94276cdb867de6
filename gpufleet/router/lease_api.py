"""The router's lease API: take, list, read, renew and release exclusive leases.

    POST   /api/leases             {"target": "node-a/cuda:1", "ttl_s": 600}  -> 201, the lease
    GET    /api/leases                                                       -> live leases
    GET    /api/leases/{id}                                                  -> the lease
    POST   /api/leases/{id}/renew  {"ttl_s": 600} (optional; default: its own TTL) -> the lease
    DELETE /api/leases/{id}                                                  -> {"id", "deleted": true}

validate -> store -> render: the target is resolved against the router's current view of
the fleet by the rules of gpufleet.routing.leases; the store (memory or Kubernetes) makes
the write and refuses a device another live lease holds (409 ``device_leased``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from gpufleet.router.lease_store import LeaseStore, live
from gpufleet.router.state import FleetState
from gpufleet.routing import leases

log = logging.getLogger(__name__)
# The schema states the default LEASE_MAX_TTL_S; a deployment that raises it accepts more than it says.
# (The bounds are checked against the setting in the handler, so the error names the limit.)
TtlField = Annotated[
    int,
    Field(
        strict=True,
        json_schema_extra={"minimum": 1, "maximum": 86400},
        description="Seconds the lease holds unless renewed (1 to LEASE_MAX_TTL_S).",
    ),
]


class LeaseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str = Field(
        min_length=1,
        max_length=253,
        description="'pod/cuda:1', 'node/cuda:1', a pod, a node, a bare device of a single pod, or a GPU UUID.",
    )
    ttl_s: TtlField


class RenewBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl_s: TtlField | None = None


def install(app: FastAPI, parts: Callable[[Request], tuple[FleetState, LeaseStore, int]]) -> None:
    """``parts(request)``: the fleet state, the lease store and the longest TTL allowed."""

    @app.post("/api/leases", status_code=201)
    async def take(body: LeaseBody, request: Request) -> JSONResponse:
        state, store, max_ttl = parts(request)
        leases.check_ttl(body.ttl_s, max_ttl)
        devices = leases.resolve(body.target, state.snapshot().devices)
        uuids = tuple(d.uuid for d in devices if d.uuid)
        lease = await store.create(body.target, tuple(d.key for d in devices), uuids, body.ttl_s)
        log.info(
            "lease taken",
            extra={"lease": lease.id, "target": body.target, "devices": list(lease.devices), "ttl_s": lease.ttl_s},
        )
        return JSONResponse(leases.document(lease, store.now()), status_code=201,
                            headers={"location": f"/api/leases/{lease.id}"})

    @app.get("/api/leases")
    async def list_leases(request: Request) -> dict[str, Any]:
        _, store, _ = parts(request)
        now = store.now()
        found = sorted(leases.live_leases(store.all(), now), key=lambda x: (x.acquired_at, x.id))
        return {"object": "list", "data": [leases.document(x, now) for x in found]}

    @app.get("/api/leases/{lease_id}")
    async def get_lease(lease_id: str, request: Request) -> dict[str, Any]:
        _, store, _ = parts(request)
        return leases.document(live(store, lease_id), store.now())

    @app.post("/api/leases/{lease_id}/renew")
    async def renew(lease_id: str, request: Request, body: RenewBody | None = None) -> dict[str, Any]:
        _, store, max_ttl = parts(request)
        ttl = body.ttl_s if body is not None else None
        if ttl is not None:
            leases.check_ttl(ttl, max_ttl)
        lease = await store.renew(lease_id, ttl)
        log.info("lease renewed", extra={"lease": lease_id, "ttl_s": lease.ttl_s})
        return leases.document(lease, store.now())

    @app.delete("/api/leases/{lease_id}")
    async def release(lease_id: str, request: Request) -> dict[str, Any]:
        _, store, _ = parts(request)
        await store.delete(lease_id)
        log.info("lease released", extra={"lease": lease_id})
        return {"id": lease_id, "object": "lease", "deleted": True}
