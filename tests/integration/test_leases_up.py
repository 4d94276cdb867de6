"""An exclusive lease on ``local-cpu-1/cpu:1`` through ``gpufleet up`` (two CPU devices, the
real router and pod servers, the official openai SDK for the error types).

While the lease holds, requests without it never run there, requests with it always do
(header or body field), and a request naming that device without the lease gets 409;
once its TTL runs out the device serves everyone again. The router runs round robin so
that, without the lease, plain traffic would alternate onto local-cpu-1: the assertion
that it never does could fail.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.processes import ServerProcess, free_port, wait_until

pytestmark = pytest.mark.integration

TARGET = "local-cpu-1/cpu:1"
CHAT: dict[str, Any] = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@dataclass
class Up:
    proc: ServerProcess
    http: httpx.Client
    sdk: openai.OpenAI

    def chat(self, headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
        return self.http.post("/v1/chat/completions", json={**CHAT, **extra}, headers=headers or {})

    def served_by(self, r: httpx.Response) -> str:
        assert r.status_code == 200, r.text
        return f"{r.headers['x-served-by-pod']}/{r.headers['x-served-by-device']}"

    def burst(self, n: int, **kw: Any) -> list[str]:
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda _: self.served_by(self.chat(**kw)), range(n)))


@pytest.fixture(scope="module")
def up(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    tmp = tmp_path_factory.mktemp("leases-up")
    port = free_port()
    env = {
        "DEVICES": "cpu:0,cpu:1",
        "MODEL_GROUPS": str(demo_models),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "UP_LOG_DIR": str(tmp / "pods"),
        "TORCH_THREADS": "1",
        "STATUS_INTERVAL_S": "0.5",
        "ROUTING_POLICY": "round_robin",
    }
    proc = ServerProcess(["up"], env, tmp / "up.log", f"http://127.0.0.1:{port}")
    try:
        proc.wait_ready(240)
        with (
            httpx.Client(base_url=proc.url, timeout=120) as http,
            openai.OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0, timeout=120) as sdk,
        ):
            u = Up(proc, http, sdk)

            def both_ready() -> bool:
                pods = http.get("/api/fleet").json()["pods"]
                return len(pods) == 2 and all(p["state"] == "ready" for p in pods.values())

            wait_until(both_ready, 60, "the router sees both pods ready")
            yield u
    finally:
        proc.stop()


def test_a_lease_keeps_its_device_for_its_holder_until_it_expires(up: Up) -> None:
    # Round robin without a lease: plain traffic reaches both devices.
    assert set(up.burst(6)) == {"local-cpu-0/cpu:0", TARGET}

    r = up.http.post("/api/leases", json={"target": TARGET, "ttl_s": 120})
    assert r.status_code == 201, r.text
    lease = r.json()
    assert lease["devices"] == [TARGET]
    lid = lease["id"]
    again = up.http.post("/api/leases", json={"target": "local-cpu-1", "ttl_s": 5})
    assert again.status_code == 409 and again.json()["error"]["code"] == "device_leased"

    # While it holds: everyone else elsewhere, its holder always there (header or body field).
    assert set(up.burst(8)) == {"local-cpu-0/cpu:0"}
    assert set(up.burst(4, headers={"x-gpufleet-lease": lid})) == {TARGET}
    assert set(up.burst(4, lease=lid)) == {TARGET}
    assert up.served_by(up.chat(lease=lid, exclusive_gpu=TARGET)) == TARGET
    # The SDK: the lease in a header, and the 409 as its ConflictError.
    done = up.sdk.chat.completions.with_raw_response.create(
        **CHAT, extra_headers={"x-gpufleet-lease": lid}
    )
    assert done.headers["x-served-by-pod"] == "local-cpu-1"
    with pytest.raises(openai.ConflictError) as refused:
        up.sdk.chat.completions.create(**CHAT, extra_body={"exclusive_gpu": TARGET})
    assert refused.value.code == "device_leased"
    r = up.chat(exclusive_gpu="cpu:1")  # the bare device names the same GPU
    assert r.status_code == 409

    # Visible in the fleet documents and the metrics.
    stats = up.http.get("/api/gpu_stats").json()["devices"]
    assert stats[TARGET]["lease"]["id"] == lid and stats["local-cpu-0/cpu:0"]["lease"] is None
    assert up.http.get("/api/queue").json()["devices"][TARGET]["lease"]["expires_at"] == lease["expires_at"]
    metrics = up.http.get("/metrics").text
    assert re.search(r'^gpufleet_router_device_leased\{gpu="cpu:1",pod="local-cpu-1"\} 1\.0$', metrics, re.M)

    # Renewed down to 2 s: then it expires by itself and the device serves everyone again.
    r = up.http.post(f"/api/leases/{lid}/renew", json={"ttl_s": 2})
    assert r.status_code == 200 and r.json()["ttl_s"] == 2
    wait_until(lambda: up.http.get("/api/leases").json()["data"] == [], 30, "the lease expires")
    assert up.served_by(up.chat(exclusive_gpu=TARGET)) == TARGET
    assert set(up.burst(6)) == {"local-cpu-0/cpu:0", TARGET}
    r = up.chat(lease=lid)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_lease"
    assert up.http.get("/api/gpu_stats").json()["devices"][TARGET]["lease"] is None


def test_on_a_pod_with_two_devices_plain_traffic_is_pinned_off_the_leased_one(
    demo_models: Path, tmp_path: Path
) -> None:
    """One pod server driving cpu:0 and cpu:1 behind the router: the pod would otherwise
    choose its device again, so the router pins every request on that pod to a device."""
    from tests.integration.test_router_proxy import start_router
    from tests.support.processes import start_pod_server

    pod = start_pod_server(tmp_path, demo_models, devices="cpu:0,cpu:1", name="duo", LAZY_LOAD_MODEL="true")
    router: ServerProcess | None = None
    try:
        pod.wait_ready(180)
        router = start_router(tmp_path, [pod.url])
        router.wait_ready(60)
        with httpx.Client(base_url=router.url, timeout=120) as http:
            wait_until(lambda: "duo" in http.get("/api/fleet").json()["pods"], 30, "the router knows the pod")
            lease = http.post("/api/leases", json={"target": "duo/cpu:1", "ttl_s": 300}).json()

            def served(**extra: Any) -> str:
                r = http.post("/v1/chat/completions", json={**CHAT, **extra})
                assert r.status_code == 200, r.text
                return str(r.headers["x-served-by-device"])

            with ThreadPoolExecutor(4) as pool:  # concurrent: the pod's least-load choice would use cpu:1
                plain = list(pool.map(lambda _: served(), range(8)))
                held = list(pool.map(lambda _: served(lease=lease["id"]), range(4)))
            assert set(plain) == {"cpu:0"} and set(held) == {"cpu:1"}
            assert served(exclusive_gpu="duo", lease=lease["id"]) == "cpu:1"
    finally:
        if router is not None:
            router.stop()
        pod.stop()
