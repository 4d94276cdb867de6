"""The pod server's OpenAI endpoints: validate -> dispatch -> run on the engine -> render.

A request holds its device slots from admission until its last token (or its client leaving);
every path out of here gives them back (``Job.finish``) and closes its engine streams, which
cancels their sequences in the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive

from gpufleet.api.errors import GpufleetError, InternalError
from gpufleet.api.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from gpufleet.pod_server.disconnect import cancelled_on_disconnect
from gpufleet.pod_server.engine.batching import BatchEngine
from gpufleet.pod_server.engine.text import TextAssembler
from gpufleet.pod_server.metrics import PodMetrics
from gpufleet.pod_server.render import ChoiceResult, Meta, SseWriter, completion_body, embeddings_body
from gpufleet.pod_server.scheduler import Job
from gpufleet.pod_server.service import PodService
from gpufleet.pod_server.validate import GenerationPlan, Validator

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class Event:
    """One choice's progress: new text, and its finish reason on its last event."""

    index: int
    text: str
    finish_reason: str | None
    tokens: int


class OpenAIHandlers:
    def __init__(self, service: PodService, validator: Validator, metrics: PodMetrics) -> None:
        self.service = service
        self.validator = validator
        self.metrics = metrics

    # --- endpoints ----------------------------------------------------------------------------

    async def chat(
        self, req: ChatCompletionRequest, receive: Receive, request_id: str | None = None, routed: str | None = None
    ) -> Any:
        return await self._generate(await self.validator.chat(req), receive, request_id, routed)

    async def completion(
        self, req: CompletionRequest, receive: Receive, request_id: str | None = None, routed: str | None = None
    ) -> Any:
        return await self._generate(await self.validator.completion(req), receive, request_id, routed)

    async def embeddings(
        self, req: EmbeddingRequest, receive: Receive, request_id: str | None = None, routed: str | None = None
    ) -> Any:
        plan = await self.validator.embeddings(req)
        started = time.monotonic()
        device, job = self.service.dispatch(plan.spec.id, plan.group, plan.exclusive, 1, request_id, routed)
        status = "error"
        try:
            async with cancelled_on_disconnect(receive):
                runtime = await job.admitted
                vectors, tokens = await runtime.batcher(plan.spec.id).embed(plan.texts)
            status = "ok"
        finally:
            job.finish()
            self._observe(device, plan.group, job, started)
            self._count(device, plan.spec.id, plan.group, "embeddings", status)
        self.metrics.prompt_tokens.labels(**self.metrics.labels(device), model=plan.spec.id).inc(tokens)
        body = embeddings_body(plan.spec.id, vectors, tokens, plan.encoding)
        return JSONResponse(body, headers=_served_headers(device, job))

    # --- generation ---------------------------------------------------------------------------

    async def _generate(
        self, plan: GenerationPlan, receive: Receive, request_id: str | None, routed: str | None = None
    ) -> Any:
        started = time.monotonic()
        device, job = self.service.dispatch(plan.spec.id, plan.group, plan.exclusive, plan.n, request_id, routed)
        run = _Run(self, plan, device, job, started)
        try:
            async with cancelled_on_disconnect(receive):
                engine = (await job.admitted).engine(plan.spec.id)
                events = run.events(engine)
                if not plan.stream:
                    return await run.collect(events)
                first = await anext(events, None)
        except BaseException:
            await run.close()
            raise
        return StreamingResponse(
            run.sse(first, events), media_type="text/event-stream", headers={**SSE_HEADERS, **run.headers()}
        )

    def _observe(self, device: str, group: str, job: Job, started: float) -> None:
        labels = self.metrics.labels(device)
        self.metrics.e2e.labels(**labels, group=group).observe(time.monotonic() - started)
        if job.started_at is not None:
            self.metrics.queue_time.labels(**labels, group=group).observe(job.started_at - job.enqueued_at)

    def _count(self, device: str, model: str, group: str, endpoint: str, status: str) -> None:
        self.metrics.requests.labels(
            **self.metrics.labels(device), model=model, group=group, endpoint=endpoint, status=status
        ).inc()


class _Run:
    """One generation request from admission to its last byte."""

    def __init__(self, handlers: OpenAIHandlers, plan: GenerationPlan, device: str, job: Job, started: float):
        self.h = handlers
        self.plan = plan
        self.device = device
        self.job = job
        self.started = started
        self.meta = Meta.new(plan.kind, plan.spec.id)
        self.choices = [ChoiceResult(i) for i in range(plan.n)]
        self._events: AsyncIterator[Event] | None = None
        self._first_token_at: float | None = None
        self._closed = False
        self.ok = False

    def headers(self) -> dict[str, str]:
        return _served_headers(self.device, self.job)

    async def events(self, engine: BatchEngine) -> AsyncIterator[Event]:
        """Every choice's events, interleaved as the engine produces them."""
        if self.plan.n == 1:
            async for event in self._choice(engine, 0):
                yield event
            return
        queue: asyncio.Queue[Event | BaseException | None] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for event in self._choice(engine, index):
                    queue.put_nowait(event)
                queue.put_nowait(None)
            except BaseException as exc:  # delivered to the reader, which re-raises it
                queue.put_nowait(exc)

        tasks = [asyncio.create_task(pump(i)) for i in range(self.plan.n)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _choice(self, engine: BatchEngine, index: int) -> AsyncIterator[Event]:
        plan = self.plan
        params = plan.choice_params(index)
        eos_ids = () if params.ignore_eos else plan.info.eos_ids  # then an end token ends nothing (nor shows)
        text = TextAssembler(plan.info.tokenizer, plan.stop, eos_ids, min_tokens=params.min_tokens)
        steps = engine.generate(plan.prompt_ids, params)
        try:
            async for step in steps:
                if self._first_token_at is None:
                    self._first_token_at = time.monotonic()
                    self.h.metrics.ttft.labels(**self.h.metrics.labels(self.device), group=plan.group).observe(
                        self._first_token_at - self.started
                    )
                piece = text.push(step.token_ids)
                reason = piece.finished or step.finished
                if reason == "length":
                    piece = type(piece)(piece.text + text.flush(), piece.finished, piece.tokens)
                if piece.text or reason:
                    yield Event(index, piece.text, reason, piece.tokens)
                elif piece.tokens:
                    yield Event(index, "", None, piece.tokens)
                if reason:
                    return  # a stop string: closing ``steps`` cancels the rest of the sequence
        finally:
            await steps.aclose()  # type: ignore[attr-defined]

    def _apply(self, event: Event) -> None:
        c = self.choices[event.index]
        c.text += event.text
        c.tokens += event.tokens
        if event.finish_reason:
            c.finish_reason = event.finish_reason

    async def collect(self, events: AsyncIterator[Event]) -> JSONResponse:
        self._events = events
        try:
            async for event in events:
                self._apply(event)
            self.ok = True
        finally:
            await self.close()
        body = completion_body(self.meta, self.choices, len(self.plan.prompt_ids))
        return JSONResponse(body, headers=self.headers())

    async def sse(self, first: Event | None, events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
        self._events = events
        writer = SseWriter(self.meta)
        try:
            if self.plan.kind == "chat":
                yield writer.role(self.plan.n)
            pending = [first] if first is not None else []
            while True:
                event = pending.pop() if pending else await anext(events, None)
                if event is None:
                    break
                self._apply(event)
                if event.text or event.finish_reason:
                    yield writer.piece(event.index, event.text, event.finish_reason)
            if self.plan.include_usage:
                yield writer.usage(len(self.plan.prompt_ids), sum(c.tokens for c in self.choices))
            self.ok = True
        except GpufleetError as exc:
            yield writer.error(exc)
        except Exception as exc:  # never a broken stream without an error event and [DONE]
            yield writer.error(InternalError(f"generation failed: {type(exc).__name__}: {exc}"))
        finally:
            await self.close()
        yield b"data: [DONE]\n\n"

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._events is not None:
            with contextlib.suppress(Exception):
                await self._events.aclose()  # type: ignore[attr-defined]
        self.job.finish()
        h, plan = self.h, self.plan
        h._observe(self.device, plan.group, self.job, self.started)
        h._count(self.device, plan.spec.id, plan.group, plan.kind, "ok" if self.ok else "error")
        labels = h.metrics.labels(self.device)
        h.metrics.prompt_tokens.labels(**labels, model=plan.spec.id).inc(len(plan.prompt_ids))
        h.metrics.completion_tokens.labels(**labels, model=plan.spec.id).inc(sum(c.tokens for c in self.choices))


def _served_headers(device: str, job: Job) -> dict[str, str]:
    return {"x-served-by-device": device, "x-group-switch": "true" if job.switched else "false"}
