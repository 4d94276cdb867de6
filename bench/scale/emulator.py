"""An emulated fleet: ONE process serving many pod servers, each on its own loopback port.

Each emulated pod answers like ``gpufleet serve`` on the routes the router uses:
``/api/status`` (the PodStatus contract), ``/api/queue`` (with the load it is carrying),
``/api/gpu_stats``, ``/api/models``, ``/v1/models``, ``/health``, ``/ready``, and
``POST /v1/chat/completions`` and ``/v1/completions``, streaming or not, taking
``ttft`` plus ``per_token`` seconds per generated token. A request for a group its
devices do not hold switches one device (from the cache or "disk", with their delays) and
says so (``x-group-switch``), as a pod server does. Every answer carries the pod's load in
``endpoint-load-metrics`` (``gpufleet.api.load_report``: running and waiting per device, and
the status version, bumped on every switch), so a router polls it only as it polls a real
pod. Every request is counted per pod and route, so a benchmark can tell what a router
sends to idle pods.

Raw asyncio HTTP/1.1 (keep-alive, no framework): its own cost stays small beside the
router's, and one process holds thousands of pods (two file descriptors each, with the
router's connection).

    python -m bench.scale.emulator --pods 100 [--devices 8] [--groups 32] [--seed 0]

prints one JSON line ``{"control": URL, "urls": [...]}`` once every port listens; the
control URL serves ``GET /counts`` and ``POST /reset``. ``start_emulator`` does this from
Python and returns the URLs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.scale import pod_docs
from bench.scale.layout import EmulatedDevice, EmulatedPod, FleetLayout, make_layout
from gpufleet.api.load_report import LOAD_HEADER, DeviceLoad, format_load

HOST = "127.0.0.1"  # test traffic stays on loopback
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}


@dataclass(frozen=True)
class Timing:
    ttft_s: float = 0.0  # before the first token (prefill)
    per_token_s: float = 0.001
    switch_cache_s: float = 0.05  # a group made current from the CPU cache
    switch_disk_s: float = 0.5  # ... from disk
    default_tokens: int = 16  # when a request names no max_tokens
    max_tokens: int = 4096  # cap, so a request cannot hold a stream for hours


def _response(status: int, body: bytes, extra: bytes = b"", content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n"
        % (status, _REASONS.get(status, b"Error"), content_type, len(body), extra)
        + body
    )


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> bytes:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return _response(status, json.dumps(body).encode())


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class PodServer:
    """One emulated pod: its layout entry, its URL, its counters."""

    def __init__(self, pod: EmulatedPod, fleet: Emulator) -> None:
        self.pod = pod
        self.fleet = fleet
        self.url = ""
        self.counts: Counter[str] = Counter()
        self._status: tuple[float, bytes] = (0.0, b"")
        self.status_version = 0  # bumped on every residency change, as the pod server does

    def status_bytes(self) -> bytes:
        # Rendered at most once a second: the timestamp is the only field that moves on its own.
        at, body = self._status
        now = time.monotonic()
        if not body or now - at > 1.0:
            doc = pod_docs.status_doc(
                self.pod, self.url, self.fleet.layout.groups, self.fleet.layout.models, self.status_version
            )
            body = json.dumps(doc).encode()
            self._status = (now, body)
        return body

    def changed(self) -> None:
        self.status_version += 1
        self._status = (0.0, b"")

    def load_line(self) -> bytes:
        """The ``endpoint-load-metrics`` header line of an answer: this pod's load right now."""
        devices = {d.device: DeviceLoad(d.running, d.queued) for d in self.pod.devices}
        return b"%s: %s\r\n" % (LOAD_HEADER.encode(), format_load(devices, self.status_version).encode())

    def get(self, path: str) -> bytes:
        route = path.split("?", 1)[0]
        if route == "/api/status":
            return _response(200, self.status_bytes())
        if route == "/api/queue":
            return _response(200, json.dumps(pod_docs.queue_doc(self.pod, self.status_version)).encode())
        if route == "/api/gpu_stats":
            return _response(200, json.dumps(pod_docs.gpu_stats_doc(self.pod)).encode())
        if route == "/api/models":
            return _response(200, json.dumps(pod_docs.models_doc(self.pod, self.fleet.layout.groups)).encode())
        if route == "/v1/models":
            return _response(200, self.fleet.model_cards)
        if route in ("/health", "/v2/health/live"):
            return _response(200, b'{"status":"ok"}')
        if route in ("/ready", "/v2/health/ready"):
            current = {d.device: d.current_group for d in self.pod.devices}
            return _response(200, json.dumps({"ready": True, "current_groups": current}).encode())
        return _error(404, f"no route {route}")

    def pick_device(self, group: str, exclusive: str | None) -> tuple[EmulatedDevice, float]:
        """The device that answers, and how long its group switch takes (0: it holds the group)."""
        devices = self.pod.devices
        if exclusive:
            local = exclusive.rsplit("/", 1)[-1]
            devices = [d for d in devices if d.device == local] or devices
        timing = self.fleet.timing
        holding = [d for d in devices if d.current_group == group]
        if holding:
            return min(holding, key=lambda d: d.running), 0.0
        cached = [d for d in devices if group in d.cached_groups]
        device = min(cached or devices, key=lambda d: d.running)
        delay = timing.switch_cache_s if cached else timing.switch_disk_s
        old = device.current_group
        device.cached_groups = [g for g in device.cached_groups if g != group]
        if old:
            device.cached_groups.insert(0, old)
            del device.cached_groups[self.fleet.cached_per_device :]
        device.current_group = group
        self.changed()
        return device, delay


class _Protocol(asyncio.Protocol):
    def __init__(self, pod: PodServer) -> None:
        self.pod = pod
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False  # answering a POST: later pipelined requests wait in the buffer
        self.task: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._process()

    def _process(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buffer[:end].decode("latin-1").split("\r\n")
            try:
                method, path, _ = lines[0].split(" ", 2)
            except ValueError:
                self.transport.write(_error(400, "malformed request line"))
                self.transport.close()
                return
            length = 0
            for line in lines[1:]:
                key, _, value = line.partition(":")
                if key.strip().lower() == "content-length":
                    length = int(value.strip() or 0)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            route = path.split("?", 1)[0]
            self.pod.counts[f"{method} {route}"] += 1
            if method == "POST" and route in ("/v1/chat/completions", "/v1/completions"):
                self.busy = True
                self.task = asyncio.ensure_future(self._generate(route, body))
                return
            if method != "GET":
                self.write(_error(405, f"{method} {route} is not served here"))
                continue
            self.write(self.pod.get(path))

    def write(self, answer: bytes) -> None:
        """Send an answer (its head at least) with the pod's load after the status line, as a
        pod server's middleware adds it to every answer."""
        if self.transport is None:
            return
        end = answer.index(b"\r\n") + 2
        self.transport.write(answer[:end] + self.pod.load_line() + answer[end:])

    async def _generate(self, route: str, raw: bytes) -> None:
        try:
            await self._answer(route, raw)
        finally:
            self.busy = False
            self._process()

    async def _answer(self, route: str, raw: bytes) -> None:
        if self.transport is None:
            return
        write = self.write
        try:
            req = json.loads(raw or b"{}")
            if not isinstance(req, dict):
                raise ValueError("the body is not a JSON object")
        except ValueError as exc:
            write(_error(400, f"invalid JSON body: {exc}"))
            return
        model = req.get("model")
        group = self.pod.fleet.layout.models.get(str(model))
        if group is None:
            write(_error(404, f"model {model!r} does not exist", param="model"))
            return
        timing = self.pod.fleet.timing
        tokens = max(1, min(int(req.get("max_tokens") or timing.default_tokens), timing.max_tokens))
        exclusive = req.get("exclusive_gpu")
        device, switch_s = self.pod.pick_device(group, exclusive if isinstance(exclusive, str) else None)
        chat = route == "/v1/chat/completions"
        served = b"x-served-by-device: %s\r\nx-group-switch: %s\r\n" % (
            device.device.encode(),
            b"true" if switch_s else b"false",
        )
        device.running += 1
        try:
            await asyncio.sleep(switch_s + timing.ttft_s)
            if req.get("stream") is True:
                await self._stream(str(model), chat, tokens, served)
                return
            if timing.per_token_s:
                await asyncio.sleep(timing.per_token_s * tokens)
            self.write(_response(200, _completion(str(model), chat, tokens), served))
        finally:
            device.running -= 1

    async def _stream(self, model: str, chat: bool, tokens: int, served: bytes) -> None:
        t = self.transport
        if t is None:
            return
        self.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n" + served + b"\r\n"
        )
        kind = "chat.completion.chunk" if chat else "text_completion"
        for i in range(tokens):
            if i and self.pod.fleet.timing.per_token_s:
                await asyncio.sleep(self.pod.fleet.timing.per_token_s)
            if t.is_closing():  # the client left: stop generating
                return
            last = i == tokens - 1
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length" if last else None}
            if chat:
                choice["delta"] = {"content": "tok "} if i else {"role": "assistant", "content": "tok "}
            else:
                choice["text"] = "tok "
            event = {"id": f"emu-{id(self):x}", "object": kind, "created": 0, "model": model, "choices": [choice]}
            t.write(_chunk(b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"))
        t.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


def _completion(model: str, chat: bool, tokens: int) -> bytes:
    text = "tok " * tokens
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
        kind, prefix = "chat.completion", "chatcmpl"
    else:
        choice, kind, prefix = {"index": 0, "text": text}, "text_completion", "cmpl"
    choice["finish_reason"] = "length"
    doc = {
        "id": f"{prefix}-emu",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass
class Emulator:
    """Every emulated pod, in this event loop. ``start`` binds one loopback port per pod."""

    layout: FleetLayout
    timing: Timing = field(default_factory=Timing)
    cached_per_device: int = 2
    pods: list[PodServer] = field(default_factory=list)
    started_at: float = 0.0
    _servers: list[asyncio.AbstractServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.model_cards = json.dumps(pod_docs.model_cards(self.layout.models)).encode()

    async def start(self, host: str = HOST) -> list[str]:
        loop = asyncio.get_running_loop()
        for pod in self.layout.pods:
            server = PodServer(pod, self)
            srv = await loop.create_server(lambda s=server: _Protocol(s), host, 0, backlog=256)  # type: ignore[misc]
            port = srv.sockets[0].getsockname()[1]
            server.url = f"http://{host}:{port}"
            self.pods.append(server)
            self._servers.append(srv)
        self.started_at = time.monotonic()
        return self.urls

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.pods]

    def counts(self) -> dict[str, Any]:
        per_route: Counter[str] = Counter()
        for p in self.pods:
            per_route.update(p.counts)
        return {
            "since_s": round(time.monotonic() - self.started_at, 3),
            "pods": len(self.pods),
            "total": sum(per_route.values()),
            "routes": dict(per_route),
            "per_pod": {p.pod.name: sum(p.counts.values()) for p in self.pods},
        }

    def reset(self) -> None:
        for p in self.pods:
            p.counts.clear()
        self.started_at = time.monotonic()

    async def close(self) -> None:
        for srv in self._servers:
            srv.close()
        await asyncio.gather(*(srv.wait_closed() for srv in self._servers), return_exceptions=True)
        self._servers.clear()


class _ControlProtocol(asyncio.Protocol):
    """GET /counts, POST /reset: the benchmark's window onto the emulator."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            method, path, _ = self.buffer[:end].decode("latin-1").split("\r\n")[0].split(" ", 2)
            self.buffer = self.buffer[end + 4 :]  # the control requests carry no body
            if path == "/reset" and method == "POST":
                self.emulator.reset()
                self.transport.write(_response(200, b'{"reset":true}'))
            elif path == "/counts":
                self.transport.write(_response(200, json.dumps(self.emulator.counts()).encode()))
            else:
                self.transport.write(_error(404, f"no route {path}"))


async def serve(emulator: Emulator, on_ready: Callable[[dict[str, Any]], None]) -> None:
    urls = await emulator.start()
    loop = asyncio.get_running_loop()
    control = await loop.create_server(lambda: _ControlProtocol(emulator), HOST, 0)
    port = control.sockets[0].getsockname()[1]
    on_ready({"control": f"http://{HOST}:{port}", "urls": urls})
    try:
        await asyncio.Event().wait()
    finally:
        control.close()
        await emulator.close()


# ---- as a process --------------------------------------------------------------------------------


@dataclass
class EmulatorProcess:
    """A running ``python -m bench.scale.emulator``: its pods' URLs and its counters."""

    popen: subprocess.Popen[bytes]
    control: str
    urls: list[str]

    def counts(self) -> dict[str, Any]:
        import httpx

        doc: dict[str, Any] = httpx.get(f"{self.control}/counts", timeout=10).json()
        return doc

    def reset(self) -> None:
        import httpx

        httpx.post(f"{self.control}/reset", timeout=10).raise_for_status()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def __enter__(self) -> EmulatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_emulator(
    pods: int,
    *,
    devices: int = 8,
    groups: int = 32,
    seed: int = 0,
    timing: Timing | None = None,
    log_path: Path | None = None,
    timeout_s: float = 120.0,
    core: int | None = None,
) -> EmulatorProcess:
    """Start the emulator as its own process (`pods` pods of `devices` devices) and return
    once every pod listens. ``core`` pins it with taskset, where available."""
    timing = timing or Timing()
    argv = [
        sys.executable, "-m", "bench.scale.emulator", "--pods", str(pods), "--devices", str(devices),
        "--groups", str(groups), "--seed", str(seed), "--ttft-ms", str(timing.ttft_s * 1000),
        "--per-token-ms", str(timing.per_token_s * 1000), "--switch-cache-ms", str(timing.switch_cache_s * 1000),
        "--switch-disk-ms", str(timing.switch_disk_s * 1000),
    ]
    if core is not None and os.path.exists("/usr/bin/taskset"):
        argv = ["taskset", "-c", str(core), *argv]
    repo = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": repo + (os.pathsep + path if path else "")}
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115  # the child keeps it
    try:
        popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env, cwd=repo)
    finally:
        if log_path:
            log.close()  # type: ignore[union-attr]
    assert popen.stdout is not None
    deadline = time.monotonic() + timeout_s
    line = b""
    while not line:
        if popen.poll() is not None or time.monotonic() > deadline:
            popen.kill()
            raise RuntimeError(f"emulator did not start (exit {popen.poll()}); see {log_path}")
        line = popen.stdout.readline()  # blocks until the ready line (or EOF when it died)
    ready = json.loads(line)
    popen.stdout.close()
    return EmulatorProcess(popen, ready["control"], ready["urls"])


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pods", type=int, required=True)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--groups", type=int, default=32)
    p.add_argument("--cached", type=int, default=2, help="cached groups per device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--per-token-ms", type=float, default=1.0)
    p.add_argument("--switch-cache-ms", type=float, default=50.0)
    p.add_argument("--switch-disk-ms", type=float, default=500.0)
    args = p.parse_args(argv)
    layout = make_layout(args.pods, args.devices, args.groups, args.cached, args.seed)
    timing = Timing(args.ttft_ms / 1000, args.per_token_ms / 1000, args.switch_cache_ms / 1000,
                    args.switch_disk_ms / 1000)
    emulator = Emulator(layout, timing, args.cached)

    def ready(doc: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve(emulator, ready))
    return 0


if __name__ == "__main__":
    sys.exit(main())
