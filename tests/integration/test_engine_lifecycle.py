"""The batching engine behind the real pod-server process: a client that leaves frees its slot,
stop strings never leak, end tokens come from generation_config, two groups switch in batches."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.processes import ServerProcess, start_pod_server, wait_until
from tests.support.tiny_models import TINY_LLAMA_REPLY, save_tiny_llama_with_end_token

pytestmark = pytest.mark.integration

MAX_SEQUENCES = 4


@pytest.fixture(scope="module")
def groups(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo groups plus a group whose model ends on a token named only in generation_config."""
    root = tmp_path_factory.mktemp("lifecycle")
    doc = json.loads(demo_models.read_text())
    tokenizer_dir = demo_models.parent / next(
        m["source"] for m in doc["groups"]["alpha"]["models"] if m["id"] == "tiny-chat"
    )
    model_dir, _ = save_tiny_llama_with_end_token(root / "ends", tokenizer_dir)
    doc["groups"]["ends"] = {"models": [{"id": "tiny-ends", "source": str(model_dir), "task": "completion"}]}
    for group in doc["groups"].values():
        for m in group["models"]:
            if (demo_models.parent / m["source"]).exists():  # a folder beside the demo file, not a package
                m["source"] = str(demo_models.parent / m["source"])
    path = root / "model_groups.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def server(groups: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_pod_server(
        tmp_path_factory.mktemp("logs"),
        groups,
        devices="cpu:0",
        name="lifecycle",
        max_sequences_per_device=str(MAX_SEQUENCES),
        switch_max_wait_s="30",
    )
    try:
        proc.wait_ready(timeout_s=180)
        yield proc
    finally:
        proc.stop()


def _queue(server: ServerProcess) -> dict[str, int]:
    d = httpx.get(server.url + "/api/queue", timeout=5).json()["devices"]["cpu:0"]
    return {"running": d["running_sequences"], "queued": d["queue_size"]}


def _metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M))


def _chat(server: ServerProcess, **body: object) -> httpx.Response:
    payload = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hello"}], **body}
    return httpx.post(server.url + "/v1/chat/completions", json=payload, timeout=120)


def _open_request(server: ServerProcess, body: dict[str, object]) -> socket.socket:
    """A raw HTTP request whose client can vanish at any moment (close the socket)."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def test_clients_that_leave_free_their_slots_at_once(server: ServerProcess) -> None:
    generated_before = _metric(server, "gpufleet_generation_tokens_total")
    long = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 230}
    # Two streams of n=2 fill the batch: a request holds its slots until its last choice ends, so a
    # random end token in one choice cannot free the batch before the clients leave.
    sockets = [_open_request(server, {**long, "stream": True, "n": 2}) for _ in range(2)]
    try:
        wait_until(lambda: _queue(server)["running"] == MAX_SEQUENCES, 30, "the streams to run")
        sockets += [_open_request(server, long) for _ in range(6)]  # non-streaming, behind the full batch
        wait_until(lambda: _queue(server) == {"running": MAX_SEQUENCES, "queued": 6}, 30, "the others to queue")
        for sock in sockets[:2]:
            assert sock.recv(64).startswith(b"HTTP/1.1 200")  # they really stream
    finally:
        for sock in sockets:
            sock.close()
    wait_until(lambda: _queue(server) == {"running": 0, "queued": 0}, 1.0, "every slot to be freed")
    # Cancelled sequences stopped early: 10 sequences x 230 tokens were never all generated.
    spent = _metric(server, "gpufleet_generation_tokens_total") - generated_before
    assert spent < 10 * 230, spent


def test_a_stop_string_never_leaks_a_prefix(server: ServerProcess) -> None:
    full = _chat(server, max_tokens=40, temperature=0).json()["choices"][0]["message"]["content"]
    # A stop string from the middle of what the model says greedily, at least 3 characters long.
    start = next(i for i in range(5, len(full) - 3) if full[i : i + 3].strip() and "\ufffd" not in full[: i + 3])
    stop = full[start : start + 3]
    expected = full[: full.index(stop)]
    body = _chat(server, max_tokens=40, temperature=0, stop=[stop]).json()["choices"][0]
    assert body["message"]["content"] == expected and body["finish_reason"] == "stop"
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json={
            "model": "tiny-chat",
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 40,
            "temperature": 0,
            "stop": [stop],
            "stream": True,
        },
        timeout=60,
    ) as r:
        deltas = [
            json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            for line in r.iter_lines()
            if line.startswith("data: {") and '"choices":[{' in line
        ]
    # Had any piece of the stop string been sent before it matched, the stream would not be `expected`.
    assert "".join(deltas) == expected


def test_the_end_token_of_generation_config_stops_generation(server: ServerProcess) -> None:
    r = httpx.post(
        server.url + "/v1/completions",
        json={"model": "tiny-ends", "prompt": "The", "max_tokens": 32, "temperature": 0.7},
        timeout=120,
    )
    choice = r.json()["choices"][0]
    assert choice["text"] == TINY_LLAMA_REPLY and choice["finish_reason"] == "stop", r.text
    assert r.json()["usage"]["completion_tokens"] < 8  # the reply and its end token, not max_tokens


def test_n_choices_and_refused_logprobs(server: ServerProcess) -> None:
    body = _chat(server, max_tokens=8, n=3, seed=5).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    again = _chat(server, max_tokens=8, n=3, seed=5).json()
    assert [c["message"] for c in body["choices"]] == [c["message"] for c in again["choices"]]  # seeds hold
    r = _chat(server, max_tokens=8, logprobs=True)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def test_alternating_groups_switch_in_batches(server: ServerProcess) -> None:
    before = _metric(server, "gpufleet_group_switches_total")
    models = ["tiny-chat" if i % 2 == 0 else "tiny-chat-b" for i in range(24)]

    def one(model: str) -> int:
        r = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
            timeout=120,
        )
        return r.status_code

    started = time.monotonic()
    with ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(one, models))
    assert codes == [200] * 24
    switches = _metric(server, "gpufleet_group_switches_total") - before
    assert switches <= 4, (switches, time.monotonic() - started)
