"""A near-instant OpenAI-compatible backend that looks like a pod server to the router (router tests
and bench/router_overhead both use it; it lives with the tests so that tests never import bench).

Raw asyncio HTTP/1.1 (keep-alive, no framework) so that its own cost hardly shows in the
figures. Non-streaming chat requests get a fixed answer (completions echo the body they
got); ``stream: true`` gets ``--chunks`` SSE events ``--chunk-gap-ms`` apart, each carrying
the monotonic time it was sent (``"t"``), so a client on this machine can tell how late
each chunk arrived.
It also serves ``/api/status``, ``/api/queue``, ``/ready`` and ``/health`` for discovery.

    python -m tests.support.echo_backend --port 9001 [--chunks 8] [--chunk-gap-ms 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Callable

from gpufleet.api.device_report import device_queue, queue_document

# echo-busy always answers 429; echo-abort streams two events, then drops the connection.
MODELS = {"echo-chat": "echo", "echo-embed": "echo", "echo-busy": "echo", "echo-abort": "echo"}


def _status(name: str) -> bytes:
    doc = {
        "schema_version": 1,
        "pod": name,
        "ready": True,
        "devices": [
            {"device": "cpu:0", "current_group": "echo", "workers": 4096, "queue_limit": 100000, "healthy": True}
        ],
        "groups": ["echo"],
        "models": MODELS,
        "timestamp": time.time(),
    }
    return json.dumps(doc).encode()


# Nothing ever queues here (answers are instant): the document the pod server would write for that.
_QUEUE = json.dumps(
    queue_document({"cpu:0": device_queue(running=0, max_sequences=4096, queue_limit=100000, current_group="echo")}, 0)
).encode()
_MODELS = json.dumps(
    {
        "object": "list",
        "data": [{"id": m, "object": "model", "owned_by": "echo", "group": g} for m, g in MODELS.items()],
    }
).encode()
_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-echo",
        "object": "chat.completion",
        "created": 0,
        "model": "echo-chat",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "echo"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()
_EMBEDDING = json.dumps(
    {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.0] * 8}], "model": "echo-embed"}
).encode()
_SERVED = b"x-served-by-device: cpu:0\r\nx-group-switch: false\r\n"


def _response(status: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n"
        + extra
        + b"\r\n"
        + body
    )


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class EchoProtocol(asyncio.Protocol):
    def __init__(self, server: EchoServer) -> None:
        self.server = server
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a stream is being written; later requests wait in the buffer
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._process()

    def _process(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            method, path, _ = head[0].split(" ", 2)
            length = 0
            for line in head[1:]:
                key, _, value = line.partition(":")
                if key.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            self._answer(method, path, body)

    def _answer(self, method: str, path: str, body: bytes) -> None:
        assert self.transport is not None
        write = self.transport.write
        if method == "POST" and b'"echo-busy"' in body:
            err = b'{"error":{"message":"queue full","type":"rate_limit_error","param":null,"code":"queue_full"}}'
            write(_response(b"429 Too Many Requests", err, b"retry-after: 3\r\n"))
        elif method == "POST" and path == "/v1/completions" and b'"stream":true' not in body.replace(b" ", b""):
            # Completions echo the body the pod received, so tests can see what the router forwarded.
            write(_response(b"200 OK", b'{"object":"text_completion","received":' + body + b"}", _SERVED))
        elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            if b'"stream":true' in body.replace(b" ", b""):
                self.busy = True
                self.task = asyncio.ensure_future(self._stream(abort_after=2 if b'"echo-abort"' in body else None))
                return
            write(_response(b"200 OK", _COMPLETION, _SERVED))
        elif method == "POST" and path == "/v1/embeddings":
            write(_response(b"200 OK", _EMBEDDING, _SERVED))
        elif path == "/api/status":
            write(_response(b"200 OK", _status(self.server.name)))
        elif path == "/api/queue":
            write(_response(b"200 OK", _QUEUE))
        elif path == "/v1/models":
            write(_response(b"200 OK", _MODELS))
        elif path in ("/ready", "/health"):
            write(_response(b"200 OK", b'{"ready":true}'))
        else:
            write(_response(b"404 Not Found", b'{"error":{"message":"no such route","type":"invalid_request_error"}}'))

    async def _stream(self, abort_after: int | None = None) -> None:
        assert self.transport is not None
        t = self.transport
        t.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n" + _SERVED + b"\r\n"
        )
        for i in range(self.server.chunks):
            if i and self.server.gap_s:
                await asyncio.sleep(self.server.gap_s)
            if t.is_closing():
                return
            if i == abort_after:
                t.abort()
                return
            event = (
                b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"x"}}],"i":'
                + str(i).encode()
                + b',"t":'
                + repr(time.monotonic()).encode()
                + b"}\n\n"
            )
            t.write(_chunk(event))
        t.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        self.busy = False
        self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class EchoServer:
    def __init__(self, name: str, chunks: int, gap_s: float) -> None:
        self.name = name
        self.chunks = chunks
        self.gap_s = gap_s


async def serve(host: str, port: int, name: str, chunks: int, gap_s: float) -> None:
    server = EchoServer(name, chunks, gap_s)
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: EchoProtocol(server), host, port, backlog=1024)
    async with srv:
        await srv.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="echo-0")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk-gap-ms", type=float, default=2.0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(args.host, args.port, args.name, args.chunks, args.chunk_gap_ms / 1000))


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    main()
