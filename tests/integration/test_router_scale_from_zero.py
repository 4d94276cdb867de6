"""Scale from zero through a real router process (tests/support/seeded_router.py): its group known only
from a ModelGroup, no pod listening at its URL yet. Held clients (plain, streaming, the openai SDK) are
answered once an echo pod starts there; a deadline and a full queue give 503 with Retry-After (an
error event once a stream has started); a client that leaves frees its place at once. Nothing sleeps
to synchronise: /api/demand says when a request is held."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gpufleet.local.processes import Process
from tests.integration.test_router_proxy import Echo
from tests.support.inprocess_router import model_group_object
from tests.support.processes import free_port, wait_until

pytestmark = pytest.mark.integration

NS = "team-a"
GROUP = f"{NS}/echo"
CHAT = {"model": "echo-chat", "messages": [{"role": "user", "content": "hi"}]}


def seeded_router(log_dir: Path, name: str, pod_port: int, **env: str) -> Process:
    groups = log_dir / f"{name}-groups.json"
    groups.write_text(json.dumps({"namespace": NS, "items": [model_group_object("echo", "echo-chat", namespace=NS)]}))
    port = free_port()
    settings = {
        "SEEDED_MODEL_GROUPS": str(groups),
        "POD_URLS": f"http://127.0.0.1:{pod_port}",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "STATUS_INTERVAL_S": "0.1",  # how soon the router sees the pod once it listens
        "IDLE_POLL_S": "0.1",
        "QUEUE_INTERVAL_S": "0.3",
        "LOG_LEVEL": "INFO",
        **{k.upper(): v for k, v in env.items()},
    }
    proc = Process(name, [sys.executable, "-m", "tests.support.seeded_router"],
                   {**os.environ, "PYTHONUNBUFFERED": "1", **settings}, log_dir / f"{name}.log",
                   f"http://127.0.0.1:{port}")
    proc.start()
    try:
        proc.wait_ready(60)  # ready with no pod: it can hold requests for the group it knows
    except BaseException:
        proc.stop()
        raise
    return proc


def demand(router: Process) -> dict[str, Any]:
    doc = httpx.get(router.url + "/api/demand", timeout=5).json()
    return next(g for g in doc["groups"] if f"{g['namespace']}/{g['group']}" == GROUP)


def outcomes(router: Process) -> dict[str, float]:
    text = httpx.get(router.url + "/metrics", timeout=5).text
    found = re.findall(r'^gpufleet_router_scale_waits_total\{outcome="(\w+)"\} (\S+)$', text, re.M)
    return {k: float(v) for k, v in found}


def held(router: Process, sequences: int) -> None:
    wait_until(lambda: demand(router)["waiting"] == sequences, 20, f"{sequences} sequences held")


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scale-from-zero")


def test_no_pod_by_the_deadline(log_dir: Path) -> None:
    router = seeded_router(log_dir, "short", free_port(), SCALE_WAIT_SECONDS="0.5", SCALE_WAIT_COMMENT_SECONDS="0")
    try:
        started = time.monotonic()
        r = httpx.post(router.url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "10"
        assert r.json()["error"]["code"] == "scale_from_zero_timeout" and time.monotonic() - started >= 0.5
        # A stream starts at its first comment: the deadline is then an error event, and [DONE].
        body = {**CHAT, "stream": True}
        with httpx.stream("POST", router.url + "/v1/chat/completions", json=body, timeout=30) as s:
            assert s.status_code == 200 and s.headers["content-type"] == "text/event-stream"
            lines = [line for line in s.iter_lines() if line]
        assert lines[0] == ": loading" and lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "scale_from_zero_timeout"
        with openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=30) as client:
            with pytest.raises(openai.InternalServerError) as plain:
                client.chat.completions.create(model="echo-chat", messages=[{"role": "user", "content": "x"}])
            assert plain.value.status_code == 503
            stream = client.chat.completions.create(
                model="echo-chat", messages=[{"role": "user", "content": "x"}], stream=True
            )
            with pytest.raises(openai.APIError, match="within"):  # the error event, after the comment
                list(stream)
        assert outcomes(router) == {"timeout": 4.0}
    finally:
        router.stop()


@pytest.fixture(scope="module")
def waiting_router(log_dir: Path) -> Iterator[tuple[Process, int]]:
    pod_port = free_port()
    router = seeded_router(log_dir, "long", pod_port, SCALE_WAIT_SECONDS="60", SCALE_WAIT_QUEUE="4",
                           SCALE_WAIT_COMMENT_SECONDS="0")
    try:
        yield router, pod_port
    finally:
        router.stop()


def test_a_full_queue_refuses_at_once_and_a_client_that_leaves_frees_its_place(
    waiting_router: tuple[Process, int],
) -> None:
    router, _ = waiting_router
    host, port = router.url.removeprefix("http://").split(":")
    raw = json.dumps({**CHAT, "n": 4}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: router\r\ncontent-type: application/json\r\n"
                     b"content-length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
        held(router, 4)  # n=4: four sequences, the whole queue
        started = time.monotonic()
        r = httpx.post(router.url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "scale_from_zero_queue_full"
        assert r.headers["retry-after"] == "10" and time.monotonic() - started < 5
    held(router, 0)  # the socket closed: its place is free at once, not at the deadline
    assert outcomes(router) == {"full": 1.0, "gone": 1.0}


def test_held_clients_are_answered_when_a_pod_comes(waiting_router: tuple[Process, int], log_dir: Path) -> None:
    router, pod_port = waiting_router
    seen: list[str] = []

    def plain() -> httpx.Response:
        return httpx.post(router.url + "/v1/chat/completions", json=CHAT, timeout=60)

    def streamed() -> list[str]:
        with httpx.stream("POST", router.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                          timeout=60) as s:
            assert s.status_code == 200
            for line in s.iter_lines():
                seen.append(line)
        return [line for line in seen if line]

    def sdk() -> list[Any]:
        with openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
            return list(client.chat.completions.create(model="echo-chat", messages=[{"role": "user", "content": "x"}],
                                                       stream=True))

    echo: Echo | None = None
    with ThreadPoolExecutor(3) as pool:
        try:
            plain_f, streamed_f, sdk_f = pool.submit(plain), pool.submit(streamed), pool.submit(sdk)
            held(router, 3)
            wait_until(lambda: ": loading" in seen, 20, "the stream's first comment")
            assert demand(router)["in_flight"] == 0
            echo = Echo(log_dir, "echo-pod", "--chunks", "3", "--chunk-gap-ms", "1", port=pod_port)  # scaled up
            answer, lines, chunks = plain_f.result(60), streamed_f.result(60), sdk_f.result(60)
        finally:
            if echo is None:  # the clients would wait out the whole deadline
                router.stop()
    try:
        assert answer.status_code == 200 and answer.headers["x-served-by-pod"] == "echo-pod"
        assert answer.json()["choices"][0]["message"]["content"] == "echo"
        assert lines[0] == ": loading" and lines[-1] == "data: [DONE]"
        data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")]
        assert [d["i"] for d in data] == [0, 1, 2]  # the pod's events, in order, after the comments
        assert [c.choices[0].delta.content for c in chunks] == ["x", "x", "x"]  # the SDK skips the comments
        after = demand(router)
        assert (after["waiting"], after["in_flight"]) == (0, 0)
        assert outcomes(router)["served"] == 3.0
    finally:
        assert echo is not None
        echo.stop()
