"""Every answer of the pod server carries its load (``gpufleet.api.load_report``), so routers
learn it from the traffic they send instead of polling each pod twice a second."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpufleet.api.load_report import LOAD_HEADER

_NAME = LOAD_HEADER.encode()


class LoadHeaderMiddleware:
    def __init__(self, app: ASGIApp, report: Callable[[], str]) -> None:
        self.app = app
        self.report = report

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_load(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Taken as the answer starts: a streamed request still counts as running in it.
                headers = [*message.get("headers", []), (_NAME, self.report().encode())]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_load)
