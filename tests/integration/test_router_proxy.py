"""The router's proxy against near-instant echo backends (real processes, loopback, no models):
SSE pass-through timing, retry after a dead pod, headers, API key, body cap, exclusive rewrite."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.processes import ServerProcess, free_port, wait_until

pytestmark = pytest.mark.integration

CHAT = {"model": "echo-chat", "messages": [{"role": "user", "content": "hi"}]}


class Echo:
    def __init__(self, log_dir: Path, name: str, *extra: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (log_dir / f"{name}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.echo_backend", "--port", str(self.port), "--name", name,
             *extra],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


def start_router(log_dir: Path, urls: list[str], name: str = "router", **env: str) -> ServerProcess:
    port = free_port()
    base = {
        "POD_URLS": ",".join(urls),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "STATUS_INTERVAL_S": "0.3",
        "QUEUE_INTERVAL_S": "0.3",
        "IDLE_POLL_S": "0.3",  # echo backends report no load in their answers: poll them
        "LOG_LEVEL": "INFO",
    }
    base.update({k.upper(): v for k, v in env.items()})
    return ServerProcess(["router"], base, log_dir / f"{name}.log", f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def echoes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[Echo]]]:
    log_dir = tmp_path_factory.mktemp("router-proxy")
    # 5 events 100 ms apart: a proxy that batched or stalled them could not hide it.
    started = [Echo(log_dir, f"echo-{i}", "--chunks", "5", "--chunk-gap-ms", "100") for i in range(2)]
    try:
        wait_until(lambda: all(e.ready() for e in started), 30, "echo backends")
        yield log_dir, started
    finally:
        for e in started:
            e.stop()


@pytest.fixture(scope="module")
def router(echoes: tuple[Path, list[Echo]]) -> Iterator[ServerProcess]:
    log_dir, backends = echoes
    proc = start_router(log_dir, [e.url for e in backends], API_KEY="sekret", MAX_BODY_BYTES="4096")
    try:
        proc.wait_ready(60)
        yield proc
    finally:
        proc.stop()


AUTH = {"Authorization": "Bearer sekret"}


def test_sse_chunks_pass_through_as_they_are_sent(router: ServerProcess) -> None:
    # Each echo event carries the monotonic time it was sent ("t"); one clock for every process here.
    delays = []
    body = {"model": "echo-chat", "stream": True, "messages": []}
    with httpx.stream("POST", router.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=10) as r:
        assert r.status_code == 200
        pending = b""
        for data in r.iter_raw():
            arrived = time.monotonic()
            pending += data
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                sent = re.search(rb'"t":([0-9.]+)', event)
                if sent is not None:
                    delays.append(arrived - float(sent.group(1)))
    assert len(delays) == 5
    # Each event reaches the client within a few ms of leaving the pod; batching would cost 100s of ms.
    assert max(delays) < 0.04, delays


def test_a_pod_failing_mid_stream_ends_the_stream_with_an_error_event(router: ServerProcess) -> None:
    body = {"model": "echo-abort", "stream": True, "messages": []}
    with httpx.stream("POST", router.url + "/v1/chat/completions", json=body, headers=AUTH) as r:
        assert r.status_code == 200  # committed at the first chunk
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) == 4, events  # two chunks, the error, [DONE]
    assert '"upstream_error"' in events[2] and events[3] == "data: [DONE]"


def test_headers_request_id_and_errors(router: ServerProcess) -> None:
    r = httpx.post(router.url + "/v1/chat/completions", json=CHAT, headers={**AUTH, "x-request-id": "rid-1"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "rid-1"
    assert r.headers["x-served-by-pod"] in ("echo-0", "echo-1")
    assert r.headers["x-served-by-device"] == "cpu:0" and r.headers["x-group-switch"] == "false"
    assert httpx.post(router.url + "/v1/chat/completions", json=CHAT, headers=AUTH).headers["x-request-id"]

    r = httpx.post(router.url + "/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = httpx.post(router.url + "/v1/chat/completions", content=b"{oops", headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(router.url + "/v1/chat/completions", json={**CHAT, "pad": "x" * 5000}, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_full_pod_is_retried_once_then_its_429_passes_through(router: ServerProcess) -> None:
    r = httpx.post(router.url + "/v1/chat/completions", json={**CHAT, "model": "echo-busy"}, headers=AUTH)
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert r.json()["error"]["code"] == "queue_full"
    assert r.headers.get_list("x-served-by-pod") in (["echo-0"], ["echo-1"])
    # Back-pressure is not a failure: neither pod is ejected for it.
    pods = httpx.get(router.url + "/api/fleet", headers=AUTH).json()["pods"]
    assert not any(p["ejected"] for p in pods.values())


def test_api_key_on_everything_but_health(router: ServerProcess) -> None:
    r = httpx.post(router.url + "/v1/chat/completions", json=CHAT)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(router.url + "/api/queue").status_code == 401
    assert httpx.get(router.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(router.url + path).status_code == 200
    assert {m["id"] for m in httpx.get(router.url + "/v1/models", headers=AUTH).json()["data"]} == {
        "echo-chat", "echo-embed", "echo-busy", "echo-abort"
    }


def test_exclusive_target_is_rewritten_to_the_pod_device(router: ServerProcess) -> None:
    for target, sent in (("echo-1/cpu:0", "cpu:0"), ("echo-1", None)):
        r = httpx.post(
            router.url + "/v1/completions", json={"model": "echo-chat", "prompt": "x", "exclusive_gpu": target},
            headers=AUTH,
        )
        assert r.status_code == 200 and r.headers["x-served-by-pod"] == "echo-1"
        assert r.json()["received"].get("exclusive_gpu") == sent
    r = httpx.post(router.url + "/v1/completions", json={"model": "echo-chat", "prompt": "x", "exclusive_gpu": "cpu:0"},
                   headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "exclusive_gpu"  # two pods have a cpu:0
    # Without a target the body goes through untouched, byte for byte.
    raw = b'{"model": "echo-chat",   "prompt": "x"}'
    r = httpx.post(router.url + "/v1/completions", content=raw, headers=AUTH)
    assert r.json()["received"] == {"model": "echo-chat", "prompt": "x"}


def test_a_dead_pod_costs_a_retry_not_an_error(echoes: tuple[Path, list[Echo]]) -> None:
    log_dir, _ = echoes
    # Two extra backends the router polls only rarely, so it still believes in the one we kill.
    pair = [Echo(log_dir, f"victim-{i}") for i in range(2)]
    router = start_router(
        log_dir, [e.url for e in pair], name="router-retry", STATUS_INTERVAL_S="60", QUEUE_INTERVAL_S="60",
        IDLE_POLL_S="60", EJECT_AFTER_FAILURES="2",
    )
    try:
        wait_until(lambda: all(e.ready() for e in pair), 30, "echo backends")
        router.wait_ready(60)
        pair[0].proc.send_signal(signal.SIGKILL)
        pair[0].proc.wait(5)
        served = []
        for _ in range(8):
            r = httpx.post(router.url + "/v1/chat/completions", json=CHAT, timeout=10)
            assert r.status_code == 200, r.text
            served.append(r.headers["x-served-by-pod"])
        assert set(served) == {"victim-1"}
        fleet = httpx.get(router.url + "/api/fleet").json()
        assert fleet["pods"]["victim-0"]["ejected"] is True
        metrics = httpx.get(router.url + "/metrics").text
        assert 'gpufleet_router_retries_total{pod="victim-0"}' in metrics
        assert 'gpufleet_router_ejections_total{pod="victim-0"} 1.0' in metrics
    finally:
        router.stop()
        for e in pair:
            e.stop()
