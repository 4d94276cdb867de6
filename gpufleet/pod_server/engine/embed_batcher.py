"""Concurrent embedding requests for one model share forward passes.

Requests queue here; one background task gathers them until ``max_batch`` inputs are waiting or
``max_wait_s`` has passed since the oldest arrived, runs one forward pass for all of them off the
event loop, and hands each request its own vectors and token count.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from gpufleet.api.errors import Unavailable

# A text, or token ids passed straight to the model.
EmbedInput = str | list[int]

# (one vector per input, tokens per input): what the model's blocking embed function returns.
EmbedResult = tuple[list[list[float]], list[int]]
EmbedFn = Callable[[Sequence[EmbedInput]], EmbedResult]
RunBlocking = Callable[[Callable[[], EmbedResult]], Awaitable[EmbedResult]]


@dataclass(eq=False)
class _Request:
    texts: list[EmbedInput]
    future: asyncio.Future[tuple[list[list[float]], int]]
    arrived: float


class EmbeddingBatcher:
    """Batches one model's embedding requests; see the module docstring.

    A request larger than ``max_batch`` runs alone, in as many passes as it needs. If a pass
    raises, every request in it gets the exception. A request whose caller is cancelled before its
    pass starts is dropped from it (no compute for it); one cancelled during its pass just loses
    the result.
    """

    def __init__(
        self,
        embed: EmbedFn,
        run_blocking: RunBlocking,
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.002,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, got {max_wait_s}")
        self._embed = embed
        self._run_blocking = run_blocking
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._queue: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Inputs waiting for a forward pass (not counting the pass running now)."""
        return sum(len(r.texts) for r in self._queue if not r.future.done())

    async def embed(self, texts: Sequence[EmbedInput]) -> tuple[list[list[float]], int]:
        """Vectors for ``texts`` in order, and the request's token count."""
        if self._closed:
            raise _shutting_down()
        if not texts:
            return [], 0
        loop = asyncio.get_running_loop()
        self._ensure_worker(loop)
        request = _Request(list(texts), loop.create_future(), loop.time())
        self._queue.append(request)
        self._wakeup.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            # Cancelled just as its result or error was set: mark it retrieved so it is not logged.
            if request.future.done() and not request.future.cancelled():
                request.future.exception()
            request.future.cancel()
            raise

    async def close(self) -> None:
        """Stop the background task; every request not answered yet gets :class:`Unavailable`."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        _fail([*self._running, *self._queue], _shutting_down())
        self._running.clear()
        self._queue.clear()

    def _ensure_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is not None and not self._task.done():
            if self._loop is not loop:
                raise RuntimeError("an EmbeddingBatcher serves one event loop")
            return
        self._loop = loop
        self._task = loop.create_task(self._work(), name="embedding-batcher")

    async def _work(self) -> None:
        while True:
            await self._wait_for_batch()
            batch = self._take_batch()
            # Left set if this task is cancelled mid-pass, so close() can answer these requests.
            self._running = batch
            try:
                await self._run(batch)
            except Exception as exc:  # a bug here must neither strand the batch nor stop the batcher
                _fail(batch, exc)
            self._running = []

    async def _wait_for_batch(self) -> None:
        """Return when max_batch inputs wait, or max_wait_s after the oldest waiting request arrived."""
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            remaining = self._queue[0].arrived + self._max_wait_s - loop.time()
            if self.pending >= self._max_batch or remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _drop_cancelled(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

    def _take_batch(self) -> list[_Request]:
        """The oldest requests, in order, while they fit in max_batch; an oversized one goes alone."""
        batch: list[_Request] = []
        size = 0
        while self._queue:
            request = self._queue[0]
            if request.future.done():
                self._queue.popleft()
                continue
            if batch and size + len(request.texts) > self._max_batch:
                break
            batch.append(self._queue.popleft())
            size += len(request.texts)
            if size >= self._max_batch:
                break
        return batch

    async def _run(self, batch: list[_Request]) -> None:
        if len(batch) == 1:
            await self._run_alone(batch[0])
            return
        result = await self._pass(batch, [t for r in batch for t in r.texts])
        if result is None:
            return
        vectors, counts = result
        offset = 0
        for request in batch:
            n = len(request.texts)
            if not request.future.done():
                request.future.set_result((vectors[offset : offset + n], sum(counts[offset : offset + n])))
            offset += n

    async def _run_alone(self, request: _Request) -> None:
        """One request, in max_batch slices when it is larger than that."""
        vectors: list[list[float]] = []
        tokens = 0
        for start in range(0, len(request.texts), self._max_batch):
            if request.future.done():  # its caller left: no compute for the remaining slices
                return
            result = await self._pass([request], request.texts[start : start + self._max_batch])
            if result is None:
                return
            vectors.extend(result[0])
            tokens += sum(result[1])
        if not request.future.done():
            request.future.set_result((vectors, tokens))

    async def _pass(self, requests: list[_Request], texts: list[EmbedInput]) -> EmbedResult | None:
        """One forward pass; on failure every request in it gets the exception and this returns None."""
        try:
            vectors, counts = await self._run_blocking(functools.partial(self._embed, texts))
            if len(vectors) != len(texts) or len(counts) != len(texts):
                raise RuntimeError(
                    f"the embedding function returned {len(vectors)} vectors and {len(counts)} token counts "
                    f"for {len(texts)} inputs"
                )
        except Exception as exc:  # the model's failure is its requests' answer; the batcher lives on
            _fail(requests, exc)
            return None
        return vectors, counts


def _fail(requests: list[_Request], exc: BaseException) -> None:
    for request in requests:
        if not request.future.done():
            request.future.set_exception(exc)


def _shutting_down() -> Unavailable:
    return Unavailable("embedding model is shutting down", retry_after_s=1)
