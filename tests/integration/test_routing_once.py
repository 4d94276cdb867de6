"""One decision per request: on a pod with two CPU devices behind the router, requests land on
the device the router decided, as its decision log says (``x-served-by-device`` against the
``route`` lines), for two groups sent concurrently."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.integration.test_router_proxy import start_router
from tests.support.logs import lines_by_request
from tests.support.processes import ServerProcess, start_pod_server, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    """The router and its log folder (router.log, pod-two.log)."""
    log_dir = tmp_path_factory.mktemp("routing-once")
    pod = start_pod_server(log_dir, demo_models, devices="cpu:0,cpu:1", name="pod-two")
    router: ServerProcess | None = None
    try:
        pod.wait_ready(180)
        router = start_router(log_dir, [pod.url])
        router.wait_ready(60)
        # Ready once the router knows both devices.
        wait_until(lambda: _device_count(router) >= 2, 30, "router sees both devices")
        yield router, log_dir
    finally:
        if router is not None:
            router.stop()
        pod.stop()


def _device_count(router: ServerProcess) -> int:
    fleet = httpx.get(router.url + "/api/fleet", timeout=5).json()
    return sum(len(p.get("devices", {})) for p in fleet.get("pods", {}).values())


def test_requests_land_where_the_router_decided(fleet: tuple[ServerProcess, Path]) -> None:
    router, logs = fleet
    bodies = [
        {"model": model, "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 8}
        for i in range(12)
        for model in ("tiny-chat", "tiny-chat-b")  # groups alpha and beta
    ]

    def send(i_body: tuple[int, dict[str, object]]) -> tuple[str, httpx.Response]:
        i, body = i_body
        rid = f"once-{i}"
        with httpx.Client(base_url=router.url, timeout=120) as c:
            return rid, c.post("/v1/chat/completions", json=body, headers={"x-request-id": rid})

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, enumerate(bodies)))
    assert all(r.status_code == 200 for _, r in results), [r.text for _, r in results if r.status_code != 200][:2]
    ids = {rid for rid, _ in results}
    wait_until(lambda: ids <= lines_by_request(logs / "router.log", "route").keys(), 10, "the router's route lines")
    wait_until(lambda: ids <= lines_by_request(logs / "pod-two.log", "dispatch").keys(), 10, "the pod's dispatch lines")
    decided = lines_by_request(logs / "router.log", "route")
    dispatched = lines_by_request(logs / "pod-two.log", "dispatch")
    served: dict[str, set[str]] = {}
    for rid, r in results:
        line = decided[rid]
        assert r.headers["x-served-by-device"] == line["device"], (rid, line)
        # The pod kept the router's choice rather than deciding again with its own inputs.
        assert str(dispatched[rid]["reason"]).endswith(":router_choice"), dispatched[rid]
        served.setdefault(str(line["group"]), set()).add(r.headers["x-served-by-device"])
    assert set(served) == {"alpha", "beta"}
