"""Server-sent events the router writes itself: error events, comments, and a stream it has started.

An error reaches a client as HTTP (status, OpenAI's JSON body) until the answer has started; after
that, only as an event on the stream: the error document as ``data``, then ``data: [DONE]``, as
OpenAI's own streams end. ``CommittedStream`` is that rule in one place, for a stream the router
started before any pod answered (a request held while its group scales from zero): whatever the
proxy sends next, a pod's stream or an error answer, reaches the client as events.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Message, Send

from gpufleet.api.errors import GpufleetError, UpstreamError

SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
DONE = b"data: [DONE]\n\n"


def comment(text: str) -> bytes:
    """A comment line: clients ignore it, proxies on the way see bytes and keep the connection."""
    return b": " + text.encode() + b"\n\n"


def error_event(doc: dict[str, Any]) -> bytes:
    """An OpenAI error document as the last event of a stream."""
    return b"data: " + json.dumps(doc).encode() + b"\n\n" + DONE


def sse_error(exc: GpufleetError) -> bytes:
    return error_event(exc.to_openai())


def _error_document(status: int, body: bytes) -> dict[str, Any]:
    """An error answer's body when it is OpenAI's error document (a pod's 429, the router's 503), else one
    that says what came back."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        return doc
    return UpstreamError(f"the pod answered {status} without an event stream").to_openai()


class CommittedStream:
    """A ``send`` for a stream already started (200, ``text/event-stream``): a pod's event stream passes
    through without its status and headers (the client has them); any other answer becomes an error
    event at its end."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self._error: int | None = None  # the status of an answer being turned into an error event
        self._body: list[bytes] = []

    async def start(self, first: bytes) -> None:
        await self.send({"type": "http.response.start", "status": 200, "headers": list(SSE_HEADERS)})
        await self.send({"type": "http.response.body", "body": first, "more_body": True})

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers") or [])
            stream = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            self._error = None if message["status"] == 200 and stream else message["status"]
            return
        if message["type"] != "http.response.body":
            await self.send(message)
            return
        if self._error is None:
            await self.send(message)
            return
        self._body.append(message.get("body", b""))
        if not message.get("more_body", False):
            event = error_event(_error_document(self._error, b"".join(self._body)))
            await self.send({"type": "http.response.body", "body": event, "more_body": False})
