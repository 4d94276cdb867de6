"""The per-request decision log, written in batches.

Every routing decision is one JSON line (``gpufleet.logs`` format, same stream); at a few
thousand requests a second a write and flush per line would cost more than routing does.
Lines are formatted at once and written together when 256 have gathered or when the
app's flusher runs (every 100 ms, and at shutdown), so none is lost or more than that late.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TextIO

from gpufleet.logs import JsonFormatter

ROUTE_LOGGER = "gpufleet.router.route"
FLUSH_EVERY_S = 0.1


class BatchingHandler(logging.Handler):
    def __init__(self, stream: TextIO, formatter: logging.Formatter | None, capacity: int = 256) -> None:
        super().__init__()
        self.stream = stream
        self.capacity = capacity
        self.lines: list[str] = []
        if formatter is not None:
            self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:
            self.handleError(record)
            return
        if len(self.lines) >= self.capacity:
            self.flush()

    def flush(self) -> None:
        if not self.lines:
            return
        lines, self.lines = self.lines, []
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stream must not take requests down with it


def install_batching() -> BatchingHandler | None:
    """Route the decision logger through a batching handler that shares the root handler's
    stream and formatter, as ``setup_logging`` made them; None (nothing changed) without one."""
    root = logging.getLogger()
    base = next(
        (h for h in root.handlers if isinstance(h, logging.StreamHandler) and isinstance(h.formatter, JsonFormatter)),
        None,
    )
    if base is None:
        return None
    handler = BatchingHandler(base.stream, base.formatter)
    logger = logging.getLogger(ROUTE_LOGGER)
    logger.handlers[:] = [handler]
    logger.propagate = False
    return handler


def uninstall_batching(handler: BatchingHandler) -> None:
    handler.flush()
    logger = logging.getLogger(ROUTE_LOGGER)
    if handler in logger.handlers:
        logger.removeHandler(handler)
        logger.propagate = True


async def flush_periodically(handler: BatchingHandler) -> None:
    """Flush every ``FLUSH_EVERY_S`` until cancelled; then flush the rest and restore the logger."""
    try:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            handler.flush()
    finally:
        uninstall_batching(handler)
