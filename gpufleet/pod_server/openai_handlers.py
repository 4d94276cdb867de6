"""OpenAI-compatible request handling on the pod server: validate, queue, answer or stream."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from gpufleet.api.errors import ContextLengthExceeded, GpufleetError, InternalError, InvalidRequest, Unavailable
from gpufleet.api.model_groups import ModelSpec
from gpufleet.api.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from gpufleet.pod_server.inference import Delta, GenerationParams, LoadedModel
from gpufleet.pod_server.metrics import PodMetrics
from gpufleet.pod_server.scheduler import Job
from gpufleet.pod_server.service import PodService
from gpufleet.pod_server.tokenizers import TokenizerCache

_END = object()
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class _Prepared:
    spec: ModelSpec
    group: str
    prompt_ids: list[int]
    params: GenerationParams


class OpenAIHandlers:
    def __init__(self, service: PodService, tokenizers: TokenizerCache, metrics: PodMetrics, max_tokens_default: int):
        self.service = service
        self.tokenizers = tokenizers
        self.metrics = metrics
        self.max_tokens_default = max_tokens_default

    # --- validation before anything is queued ----------------------------------------------

    def _spec(self, model_id: str, tasks: tuple[str, ...], endpoint: str) -> ModelSpec:
        self.service.group_for(model_id)  # raises ModelNotFound
        spec = self.service.groups.model(model_id)
        assert spec is not None
        if spec.task not in tasks:
            raise InvalidRequest(
                f"model {model_id!r} is a {spec.task} model and cannot serve {endpoint}",
                param="model",
                code="model_task_mismatch",
            )
        return spec

    async def _prepare(
        self, spec: ModelSpec, prompt_ids: list[int], req: ChatCompletionRequest | CompletionRequest
    ) -> _Prepared:
        context = await self.tokenizers.context_length(spec)
        budget = req.token_budget()
        if len(prompt_ids) >= context:
            raise ContextLengthExceeded(
                f"prompt is {len(prompt_ids)} tokens; model {spec.id!r} has a context of {context} tokens",
                param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
            )
        room = context - len(prompt_ids)
        if budget is not None and budget > room:
            raise ContextLengthExceeded(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({budget}) exceeds the context of "
                f"{context} tokens of model {spec.id!r}",
                param="max_tokens",
            )
        params = GenerationParams(
            max_new_tokens=budget if budget is not None else min(self.max_tokens_default, room),
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=req.stop_sequences(),
        )
        return _Prepared(spec, self.service.group_for(spec.id), prompt_ids, params)

    # --- endpoints ----------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, request_id: str | None = None) -> Any:
        spec = self._spec(req.model, ("chat", "completion"), "/v1/chat/completions")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await self.tokenizers.encode_chat(spec, messages)
        prepared = await self._prepare(spec, ids, req)
        return await self._generate(prepared, req, "chat", request_id)

    async def completion(self, req: CompletionRequest, request_id: str | None = None) -> Any:
        spec = self._spec(req.model, ("chat", "completion"), "/v1/completions")
        ids = await self.tokenizers.encode(spec, req.prompt_text())
        prepared = await self._prepare(spec, ids, req)
        return await self._generate(prepared, req, "completion", request_id)

    async def embeddings(self, req: EmbeddingRequest, request_id: str | None = None) -> JSONResponse:
        spec = self._spec(req.model, ("embedding",), "/v1/embeddings")
        started = time.monotonic()
        texts = req.inputs()

        def work(models: dict[str, LoadedModel]) -> tuple[list[list[float]], int]:
            return models[spec.id].embed(texts)

        device, job = self.service.dispatch(spec.id, req.exclusive_gpu, work, request_id)
        group = self.service.group_for(spec.id)
        try:
            vectors, tokens = await job.future
        except GpufleetError:
            self._count(device, spec, group, "embeddings", "error")
            raise
        self._observe(device, group, job, started)
        self._count(device, spec, group, "embeddings", "ok")
        self.metrics.prompt_tokens.labels(**self.metrics.labels(device), model=spec.id).inc(tokens)
        body = {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "model": spec.id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return JSONResponse(body, headers=_served_headers(device, job))

    # --- generation ---------------------------------------------------------------------------

    async def _generate(
        self, p: _Prepared, req: ChatCompletionRequest | CompletionRequest, kind: str, request_id: str | None
    ) -> Any:
        loop = asyncio.get_running_loop()
        channel: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        started = time.monotonic()

        def work(models: dict[str, LoadedModel]) -> None:
            for delta in models[p.spec.id].generate(p.prompt_ids, p.params, cancel):
                loop.call_soon_threadsafe(channel.put_nowait, delta)

        device, job = self.service.dispatch(p.spec.id, req.exclusive_gpu, work, request_id)
        job.future.add_done_callback(lambda _: channel.put_nowait(_END))
        first = await channel.get()
        if first is _END:
            self._count(device, p.spec, p.group, kind, "error")
            exc = job.future.exception()
            raise exc if isinstance(exc, GpufleetError) else InternalError(f"generation failed: {exc}")
        self.metrics.ttft.labels(**self.metrics.labels(device), group=p.group).observe(time.monotonic() - started)
        deltas = _deltas(first, channel, job)
        meta = _Meta(f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time()), p.spec.id)
        finish = lambda completion_tokens: self._finish(  # noqa: E731
            device, p, job, started, kind, completion_tokens
        )
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = _sse(deltas, meta, kind, len(p.prompt_ids), include_usage, cancel, finish)
            return StreamingResponse(
                body, media_type="text/event-stream", headers={**SSE_HEADERS, **_served_headers(device, job)}
            )
        text, reason, tokens = "", "length", 0
        try:
            async for d in deltas:
                text += d.text
                tokens += d.tokens
                reason = d.finish_reason or reason
        finally:
            finish(tokens)
        usage = {
            "prompt_tokens": len(p.prompt_ids),
            "completion_tokens": tokens,
            "total_tokens": len(p.prompt_ids) + tokens,
        }
        if kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
                "logprobs": None,
            }
            body = {
                "id": meta.id,
                "object": "chat.completion",
                "created": meta.created,
                "model": meta.model,
                "choices": [choice],
                "usage": usage,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            body = {
                "id": meta.id,
                "object": "text_completion",
                "created": meta.created,
                "model": meta.model,
                "choices": [choice],
                "usage": usage,
            }
        return JSONResponse(body, headers=_served_headers(device, job))

    def _finish(self, device: str, p: _Prepared, job: Job, started: float, kind: str, tokens: int) -> None:
        ok = job.future.done() and not job.future.cancelled() and job.future.exception() is None
        self._observe(device, p.group, job, started)
        self._count(device, p.spec, p.group, kind, "ok" if ok else "error")
        labels = self.metrics.labels(device)
        self.metrics.prompt_tokens.labels(**labels, model=p.spec.id).inc(len(p.prompt_ids))
        self.metrics.generation_tokens.labels(**labels, model=p.spec.id).inc(tokens)

    def _observe(self, device: str, group: str, job: Job, started: float) -> None:
        labels = self.metrics.labels(device)
        self.metrics.e2e.labels(**labels, group=group).observe(time.monotonic() - started)
        if job.started_at is not None:
            self.metrics.queue_time.labels(**labels, group=group).observe(job.started_at - job.enqueued_at)

    def _count(self, device: str, spec: ModelSpec, group: str, endpoint: str, status: str) -> None:
        self.metrics.requests.labels(
            **self.metrics.labels(device), model=spec.id, group=group, endpoint=endpoint, status=status
        ).inc()


@dataclass
class _Meta:
    id: str
    created: int
    model: str


def _served_headers(device: str, job: Job) -> dict[str, str]:
    return {"x-served-by-device": device, "x-group-switch": "true" if job.switched else "false"}


async def _deltas(first: Any, channel: asyncio.Queue[Any], job: Job) -> AsyncIterator[Delta]:
    item = first
    while item is not _END:
        yield item
        item = await channel.get()
    exc = job.future.exception() if not job.future.cancelled() else None
    if exc is not None:
        raise exc if isinstance(exc, GpufleetError) else Unavailable(f"generation failed: {exc}")


async def _sse(
    deltas: AsyncIterator[Delta],
    meta: _Meta,
    kind: str,
    prompt_tokens: int,
    include_usage: bool,
    cancel: threading.Event,
    finish: Callable[[int], None],
) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": meta.id,
            "object": obj,
            "created": meta.created,
            "model": meta.model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    def piece(text: str, reason: str | None, first: bool = False) -> dict[str, Any]:
        if kind == "chat":
            delta: dict[str, Any] = (
                {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            )
            return {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}

    tokens = 0
    try:
        if kind == "chat":
            yield chunk([piece("", None, first=True)])
        async for d in deltas:
            tokens += d.tokens
            if d.text or d.finish_reason:
                yield chunk([piece(d.text, d.finish_reason)])
        if include_usage:
            yield chunk(
                [],
                {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens},
            )
    except GpufleetError as exc:
        # Headers are gone: the error travels as an event, and the stream still ends properly.
        yield b"data: " + json.dumps(exc.to_openai()).encode() + b"\n\n"
    finally:
        cancel.set()  # a client that went away stops generation at the next token
        finish(tokens)
    yield b"data: [DONE]\n\n"
