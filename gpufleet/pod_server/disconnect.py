"""Stop working for a client that has gone away.

uvicorn never cancels a handler whose client disconnects: a request waiting in a queue, or
generating a non-streamed answer, would run to its end for nobody. The ASGI ``receive``
channel says ``http.disconnect`` once the body has been read and the client closes, so a
watcher on it cancels the handler's task, and the cancellation becomes :class:`ClientGone`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.types import Receive

from gpufleet.api.errors import GpufleetError


class ClientGone(GpufleetError):
    status_code = 499  # nginx's "client closed request": nobody reads it, logs do
    error_type = "invalid_request_error"
    code = "client_closed_request"


@contextlib.asynccontextmanager
async def cancelled_on_disconnect(receive: Receive) -> AsyncIterator[None]:
    task = asyncio.current_task()
    assert task is not None
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()
        task.cancel()

    watcher = asyncio.create_task(watch(), name="disconnect-watch")
    try:
        yield
    except asyncio.CancelledError:
        if gone.is_set():
            task.uncancel()
            raise ClientGone("the client closed the connection") from None
        raise
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
