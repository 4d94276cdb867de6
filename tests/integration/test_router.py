"""The router in front of three real pod-server processes (tiny models, one CPU device each).

Tests run in file order and share the fleet; the destructive ones (SIGSTOP, SIGKILL) come
last. Every load loop is bounded in count and time; nothing sleeps to synchronise.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.integration.test_router_proxy import start_router
from tests.support.logs import lines_by_request
from tests.support.processes import ServerProcess, start_pod_server, wait_until

pytestmark = pytest.mark.integration

PODS = ("pod-a", "pod-b", "pod-c")
ROUTER_ENV = {
    "STATUS_INTERVAL_S": "0.5",
    "QUEUE_INTERVAL_S": "0.5",
    "IDLE_POLL_S": "0.5",  # these tests watch pods fail between requests: poll them as often as before
    "POLL_TIMEOUT_S": "1.5",
    "STALE_AFTER_S": "5",
    "FIRST_BYTE_TIMEOUT_S": "20",
    "EJECT_AFTER_FAILURES": "2",
    "EJECT_COOLDOWN_S": "2",
    "EJECT_COOLDOWN_MAX_S": "4",
}


@dataclass
class Fleet:
    pods: dict[str, ServerProcess]
    router: ServerProcess
    http: httpx.Client

    def chat(self, model: str = "tiny-chat", max_tokens: int = 4, **extra: object) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens, **extra}
        return self.http.post("/v1/chat/completions", json=body)

    def fleet(self) -> dict[str, object]:
        return self.http.get("/api/fleet").json()  # type: ignore[no-any-return]

    def current(self) -> dict[str, str | None]:
        pods = self.fleet()["pods"]
        return {name: p["devices"]["cpu:0"]["current_group"] for name, p in pods.items()}  # type: ignore[index]

    def switches(self) -> int:
        """Group switches so far, summed over the pods' /metrics (the start-up preload included)."""
        total = 0.0
        for pod in self.pods.values():
            if pod.proc.poll() is not None:
                continue
            text = httpx.get(pod.url + "/metrics", timeout=5).text
            total += sum(float(v) for v in re.findall(r"^gpufleet_group_switches_total\{[^}]*\} (\S+)$", text, re.M))
        return int(total)


@pytest.fixture(scope="module")
def fleet(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    log_dir = tmp_path_factory.mktemp("router-fleet")
    pods = {
        name: start_pod_server(
            log_dir, demo_models, devices="cpu:0", name=name, MAX_SEQUENCES_PER_DEVICE="1", MAX_QUEUE_PER_DEVICE="2"
        )
        for name in PODS
    }
    router: ServerProcess | None = None
    try:
        for p in pods.values():
            p.wait_ready(180)
        router = start_router(log_dir, [p.url for p in pods.values()], **ROUTER_ENV)
        router.wait_ready(60)
        with httpx.Client(base_url=router.url, timeout=60) as http:
            f = Fleet(pods, router, http)
            wait_until(lambda: f.http.get("/api/fleet").json()["ready"], 30, "router sees the pods")
            wait_until(lambda: len([s for s in f.current().values() if s]) == 3, 30, "every pod's status")
            yield f
    finally:
        if router is not None:
            router.stop()
        for p in pods.values():
            p.stop()


def test_fleet_api_shapes(fleet: Fleet) -> None:
    http = fleet.http
    assert http.get("/ready").json()["ready"] is True
    stats = http.get("/api/gpu_stats").json()
    assert set(stats["devices"]) == {f"{p}/cpu:0" for p in PODS}
    assert stats["devices"]["pod-a/cpu:0"]["pod"] == "pod-a" and "utilization" in stats
    assert "available" in stats

    groups = {g["group_id"]: g for g in http.get("/api/models").json()["model_groups"]}
    assert set(groups) == {"alpha", "beta"}
    assert {i["device"] for i in groups["alpha"]["device_info"]} == {f"{p}/cpu:0" for p in PODS}
    chat = next(m for m in groups["alpha"]["models"] if m["id"] == "tiny-chat")
    assert set(chat["loaded_on_devices"]) <= {f"{p}/cpu:0" for p in PODS} and chat["loaded_on_devices"]

    queue = http.get("/api/queue").json()
    assert set(queue["devices"]) == {f"{p}/cpu:0" for p in PODS}
    assert {"queue_size", "busy_workers", "router_inflight"} <= set(queue["devices"]["pod-b/cpu:0"])
    assert set(queue["pods"]) == set(PODS)

    ids = {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert {"tiny-chat", "tiny-chat-b", "tiny-complete-b"} <= ids
    assert http.get("/v1/models/tiny-chat").json()["group"] == "alpha"
    assert http.get("/v1/models/nope").status_code == 404
    metrics = http.get("/metrics").text
    assert 'gpufleet_router_pods{state="ready"} 3.0' in metrics


def test_two_groups_stay_put_under_mixed_traffic(fleet: Fleet) -> None:
    """A device leaves its group only when the router priced that switch below every device holding
    the request's group: that is what the policy guarantees. How many switches it makes is not: a
    switch is weighed against the service time the router learns from answers and the switch times
    the pods measure, and both move with the machine's speed (a busy machine serves slower, so waiting
    for the device holding a group can cost more than switching another)."""
    # Warm-up: beta arrives; no device holds it, so one switches to it.
    r = fleet.chat("tiny-chat-b")
    assert r.status_code == 200 and r.headers["x-group-switch"] == "true"
    before = fleet.switches()
    models = ["tiny-chat", "tiny-chat-b", "tiny-complete-b"]

    def one(i: int) -> tuple[str, str, httpx.Response]:
        model, rid = models[i % 3], f"mixed-{i}"
        headers = {"x-request-id": rid}
        if model == "tiny-complete-b":
            body = {"model": model, "prompt": "hi", "max_tokens": 4}
            resp = fleet.http.post("/v1/completions", json=body, headers=headers)
        else:
            body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
            resp = fleet.http.post("/v1/chat/completions", json=body, headers=headers)
        assert resp.status_code == 200, resp.text
        return rid, model, resp

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, range(24)))
    after = fleet.switches()
    ids = {rid for rid, _, _ in results}
    log = fleet.router.log_path
    wait_until(lambda: ids <= lines_by_request(log, "route").keys(), 10, "the router's route lines")
    decided = lines_by_request(log, "route")
    for rid, _model, resp in results:
        line = decided[rid]
        chosen = f"{line['pod']}/{line['device']}"
        assert (resp.headers["x-served-by-pod"], resp.headers["x-served-by-device"]) == (line["pod"], line["device"])
        priced = {key: (note, float(cost)) for key, note, cost in (c.split(" ") for c in line["candidates"])}
        note, cost = priced[chosen]
        if note in ("cached", "switch"):  # this request made its device switch groups
            holding = [c for n, c in priced.values() if n == "current"]
            assert all(cost <= c for c in holding), (rid, line["candidates"])
    # A device serves only its current group: one that served both groups in the window switched in it.
    beta_served = {resp.headers["x-served-by-pod"] for _, model, resp in results if model != "tiny-chat"}
    alpha_served = {resp.headers["x-served-by-pod"] for _, model, resp in results if model == "tiny-chat"}
    assert len(alpha_served & beta_served) <= after - before, (before, after, decided)


def test_exclusive_routing(fleet: Fleet) -> None:
    current = fleet.current()
    alpha_pod = next(p for p, g in current.items() if g == "alpha")
    for target in (f"{alpha_pod}/cpu:0", alpha_pod):
        r = fleet.chat(exclusive_gpu=target)
        assert r.status_code == 200 and r.headers["x-served-by-pod"] == alpha_pod
        assert r.headers["x-served-by-device"] == "cpu:0"
    r = fleet.chat(exclusive_gpu="pod-z/cpu:0")
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "exclusive_gpu" and err["type"] == "invalid_request_error"
    r = fleet.chat(exclusive_gpu="cpu:0")  # every pod has one: ambiguous
    assert r.status_code == 400 and r.json()["error"]["code"] == "ambiguous_device"


def test_overload_gives_429_with_retry_after(fleet: Fleet) -> None:
    # Capacity is 3 per pod (1 running sequence + 2 queued): 13 long requests at once cannot all fit.
    barrier = threading.Barrier(13)

    def one(_: int) -> httpx.Response:
        barrier.wait(30)
        return fleet.chat("tiny-chat", max_tokens=128)

    with ThreadPoolExecutor(13) as pool:
        responses = list(pool.map(one, range(13)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 429}, [r.text for r in responses if r.status_code not in (200, 429)]
    assert 429 in codes and 200 in codes, codes
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"


def test_sigstop_pod_is_ejected_and_the_others_serve(fleet: Fleet) -> None:
    victim = next(p for p, g in fleet.current().items() if g == "alpha")
    fleet.pods[victim].signal(signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        wait_until(lambda: fleet.fleet()["pods"][victim]["ejected"], 15, f"{victim} ejected")  # type: ignore[index]
        assert time.monotonic() - stopped_at < 15
        served = set()
        for _ in range(6):
            r = fleet.chat()
            assert r.status_code == 200, r.text
            served.add(r.headers["x-served-by-pod"])
        assert victim not in served
        r = fleet.chat(exclusive_gpu=victim)
        assert r.status_code == 503 and r.json()["error"]["code"] == "target_unavailable"
    finally:
        fleet.pods[victim].signal(signal.SIGCONT)
    wait_until(lambda: fleet.fleet()["pods"][victim]["state"] == "ready", 30, f"{victim} re-admitted")  # type: ignore[index]


def test_sigkill_under_load_loses_no_request_that_had_not_started_streaming(fleet: Fleet) -> None:
    current = fleet.current()
    victim = next(p for p, g in current.items() if g == "alpha")
    done = threading.Semaphore(0)
    failures: list[str] = []
    stream_broke_after_start = 0
    lock = threading.Lock()

    def client(worker: int) -> int:
        nonlocal stream_broke_after_start
        count = 0
        deadline = time.monotonic() + 60
        for i in range(10):
            if time.monotonic() > deadline:
                break
            if (worker + i) % 2:
                r = fleet.chat("tiny-chat", max_tokens=16)
                if r.status_code != 200:
                    with lock:
                        failures.append(f"{r.status_code} {r.text}")
            else:
                body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16,
                        "stream": True}
                with fleet.http.stream("POST", "/v1/chat/completions", json=body) as r:
                    text = "".join(r.iter_text())
                if r.status_code != 200:
                    with lock:
                        failures.append(f"stream {r.status_code} {text}")
                elif "[DONE]" not in text or '"error"' in text:
                    with lock:
                        stream_broke_after_start += 1  # it had started: allowed to break
            count += 1
            done.release()
        return count

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client, w) for w in range(3)]
        for _ in range(4):  # steady load first
            assert done.acquire(timeout=60)
        fleet.pods[victim].signal(signal.SIGKILL)
        total = sum(f.result(timeout=120) for f in futures)
    assert not failures, failures
    assert total == 30
    assert stream_broke_after_start <= 3  # at most the streams in flight on the victim
    wait_until(lambda: fleet.fleet()["pods"][victim]["state"] == "ejected", 15, f"{victim} ejected")  # type: ignore[index]
    r = fleet.chat()
    assert r.status_code == 200 and r.headers["x-served-by-pod"] != victim
