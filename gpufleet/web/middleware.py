"""ASGI middleware shared by the pod server and the router: body size cap, API key, request id."""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpufleet.api.errors import GpufleetError, PayloadTooLarge, Unauthorized

REQUEST_ID_HEADER = "x-request-id"


async def _send_error(send: Send, exc: GpufleetError) -> None:
    import json

    body = json.dumps(exc.to_openai()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers().items()]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Rejects oversized bodies (413) and missing or wrong API keys (401) before any handler runs,
    and gives every request an x-request-id (the client's, if it sent one)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, api_key: str | None, open_paths: Iterable[str]) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.api_key = api_key
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        rid = headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        if self.api_key and scope["path"] not in self.open_paths:
            auth = headers.get("authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                await _send_error(send, Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'"))
                return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await _send_error(send, PayloadTooLarge(f"request body over {self.max_body} bytes"))
            return

        received = 0
        too_large = False

        async def guarded_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER.encode(), rid.encode())]
            await send(message)

        try:
            await self.app(scope, guarded_receive, send_with_id)
        except _BodyTooLarge:
            await _send_error(send, PayloadTooLarge(f"request body over {self.max_body} bytes"))


class _BodyTooLarge(Exception):
    pass
