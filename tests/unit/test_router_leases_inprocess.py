"""The router's lease API in-process (httpx's ASGI transport): take, list, renew, release,
validation and conflicts in OpenAI's error format, expiry on the store's clock, and how a
lease shows in routing refusals, /api/fleet and /metrics. Serving through a lease is the
integration test's (tests/integration/test_leases_up.py)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gpufleet.router.app import create_app
from gpufleet.router.lease_store import MemoryLeaseStore
from gpufleet.router.mock_upstream import MockUpstream
from gpufleet.router.settings import load_router_settings
from tests.support.inprocess_router import FixedFleet, FixedPod, Pods, lifespan

pytestmark = pytest.mark.unit

PODS = (FixedPod("pod-a", ("cuda:0", "cuda:1"), {"tiny-chat": "alpha"}), FixedPod("pod-b", ("cuda:0",),
                                                                                   {"tiny-chat": "alpha"}))


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def router() -> AsyncIterator[tuple[httpx.AsyncClient, Clock]]:
    clock = Clock()
    settings = load_router_settings(
        discovery="static", pod_urls=["http://pod-a"], lease_max_ttl_s=3600, queue_interval_s=60,
        status_interval_s=60,
    )
    app = create_app(settings, discovery=FixedFleet(PODS), leases=MemoryLeaseStore(clock),
                     upstream=MockUpstream(Pods(PODS)))
    transport = httpx.ASGITransport(app=app)
    async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        for _ in range(200):  # the discovery task runs at the first await of the lifespan
            if (await client.get("/api/fleet")).json()["pods"]:
                break
            await asyncio.sleep(0)
        yield client, clock


def error(r: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


async def test_take_list_get_renew_release(router: tuple[httpx.AsyncClient, Clock]) -> None:
    client, clock = router
    r = await client.post("/api/leases", json={"target": "pod-a/cuda:1", "ttl_s": 30})
    assert r.status_code == 201, r.text
    lease = r.json()
    assert lease["id"].startswith("lease-") and r.headers["location"] == f"/api/leases/{lease['id']}"
    assert lease["devices"] == ["pod-a/cuda:1"] and lease["gpu_uuids"] == ["GPU-pod-a-1"]
    assert lease["ttl_s"] == 30 and lease["expires_at"] == "2027-01-15T08:00:30.000Z"
    assert (await client.get("/api/leases")).json()["data"] == [lease]
    assert (await client.get(f"/api/leases/{lease['id']}")).json() == lease

    clock.now += 20
    renewed = (await client.post(f"/api/leases/{lease['id']}/renew", json={"ttl_s": 60})).json()
    assert renewed["expires_at"] == "2027-01-15T08:01:20.000Z" and renewed["ttl_s"] == 60
    again = (await client.post(f"/api/leases/{lease['id']}/renew")).json()  # no body: its own TTL
    assert again["expires_in_s"] == 60

    r = await client.delete(f"/api/leases/{lease['id']}")
    assert r.status_code == 200 and r.json() == {"id": lease["id"], "object": "lease", "deleted": True}
    r = await client.get(f"/api/leases/{lease['id']}")
    assert r.status_code == 404 and error(r)["code"] == "lease_not_found"
    assert (await client.delete(f"/api/leases/{lease['id']}")).status_code == 404


async def test_a_uuid_and_a_node_are_targets(router: tuple[httpx.AsyncClient, Clock]) -> None:
    client, _ = router
    r = await client.post("/api/leases", json={"target": "gpu-pod-b-0", "ttl_s": 5})
    assert r.status_code == 201 and r.json()["devices"] == ["pod-b/cuda:0"]
    r = await client.post("/api/leases", json={"target": "node-1", "ttl_s": 5})  # pod-b/cuda:0 is taken
    assert r.status_code == 409 and error(r)["code"] == "device_leased" and "pod-b/cuda:0" in error(r)["message"]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"target": "node-1/cuda:0", "ttl_s": 5}, "target", "ambiguous_device"),  # pod-a and pod-b have cuda:0
        ({"target": "cuda:0", "ttl_s": 5}, "target", "ambiguous_device"),
        ({"target": "pod-z", "ttl_s": 5}, "target", "unknown_device"),
        ({"target": "pod-a", "ttl_s": 0}, "ttl_s", "invalid_ttl"),
        ({"target": "pod-a", "ttl_s": 3601}, "ttl_s", "invalid_ttl"),
        ({"target": "pod-a", "ttl_s": "5"}, "ttl_s", "invalid_request"),  # strict: a number, not a string
        ({"target": "pod-a", "ttl_s": 2.5}, "ttl_s", "invalid_request"),
        ({"target": "pod-a"}, "ttl_s", "invalid_request"),
        ({"target": "", "ttl_s": 5}, "target", "invalid_request"),
        ({"target": "pod-a", "ttl_s": 5, "holder": "me"}, "holder", "invalid_request"),  # named, not ignored
    ],
)
async def test_bad_lease_requests_are_400s_naming_the_field(
    router: tuple[httpx.AsyncClient, Clock], body: dict[str, Any], param: str, code: str
) -> None:
    client, _ = router
    r = await client.post("/api/leases", json=body)
    assert r.status_code == 400, r.text
    e = error(r)
    assert e["type"] == "invalid_request_error" and e["param"] == param and e["code"] == code


async def test_a_lease_expires_on_the_clock(router: tuple[httpx.AsyncClient, Clock]) -> None:
    client, clock = router
    lease = (await client.post("/api/leases", json={"target": "pod-b", "ttl_s": 2})).json()
    assert (await client.post("/api/leases", json={"target": "pod-b/cuda:0", "ttl_s": 2})).status_code == 409
    clock.now += 2
    assert (await client.get("/api/leases")).json()["data"] == []
    r = await client.post(f"/api/leases/{lease['id']}/renew")
    assert r.status_code == 404  # too late to renew: take a new one
    assert (await client.post("/api/leases", json={"target": "pod-b/cuda:0", "ttl_s": 2})).status_code == 201


CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}


async def test_routing_refusals_under_a_lease(router: tuple[httpx.AsyncClient, Clock]) -> None:
    client, _ = router
    lease = (await client.post("/api/leases", json={"target": "pod-b/cuda:0", "ttl_s": 60})).json()
    r = await client.post("/v1/chat/completions", json={**CHAT, "exclusive_gpu": "pod-b/cuda:0"})
    assert r.status_code == 409, r.text
    assert error(r)["code"] == "device_leased" and error(r)["param"] == "exclusive_gpu"
    r = await client.post("/v1/chat/completions", json={**CHAT, "exclusive_gpu": "GPU-pod-b-0"})
    assert r.status_code == 409
    r = await client.post("/v1/chat/completions", json={**CHAT, "lease": "lease-0000"})
    assert r.status_code == 400 and error(r)["param"] == "lease" and error(r)["code"] == "unknown_lease"
    r = await client.post("/v1/chat/completions", json=CHAT, headers={"x-gpufleet-lease": "lease-0000"})
    assert r.status_code == 400 and error(r)["code"] == "unknown_lease"
    r = await client.post("/v1/chat/completions", json={**CHAT, "exclusive_gpu": "pod-a", "lease": lease["id"]})
    assert r.status_code == 400 and error(r)["code"] == "lease_mismatch"

    fleet = (await client.get("/api/fleet")).json()
    assert fleet["pods"]["pod-b"]["devices"]["cuda:0"]["leased_by"] == lease["id"]
    assert fleet["pods"]["pod-a"]["devices"]["cuda:1"]["leased_by"] is None
    metrics = (await client.get("/metrics")).text
    assert re.search(r"^gpufleet_router_leases_active 1\.0$", metrics, re.M)
    assert re.search(r'^gpufleet_router_device_leased\{gpu="cuda:0",pod="pod-b"\} 1\.0$', metrics, re.M)
    assert re.search(r'^gpufleet_router_device_leased\{gpu="cuda:1",pod="pod-a"\} 0\.0$', metrics, re.M)


async def test_a_leased_fleet_refuses_plain_traffic_with_503_and_retry_after(
    router: tuple[httpx.AsyncClient, Clock],
) -> None:
    client, _ = router
    for target in ("pod-a", "pod-b"):
        assert (await client.post("/api/leases", json={"target": target, "ttl_s": 30})).status_code == 201
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and error(r)["code"] == "all_devices_leased"
    assert r.headers["retry-after"] == "30"
