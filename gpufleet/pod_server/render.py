"""Render: OpenAI response bodies and server-sent events from what the engine produced.

Pure functions of their inputs; errors become SSE frames through ``GpufleetError.to_openai``,
the same document an HTTP error carries.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from gpufleet.api.errors import GpufleetError

SYSTEM_FINGERPRINT = "gpufleet-cb1"  # changes when the engine's sampling changes what a seed produces
SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0


@dataclass(frozen=True)
class Meta:
    kind: str  # "chat" or "completion"
    model: str
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    @staticmethod
    def new(kind: str, model: str) -> Meta:
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return Meta(kind, model, f"{prefix}-{uuid.uuid4().hex[:24]}")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(meta: Meta, choices: list[ChoiceResult], prompt_tokens: int) -> dict[str, Any]:
    if meta.kind == "chat":
        rendered: list[dict[str, Any]] = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason or "length",
                "logprobs": None,
            }
            for c in choices
        ]
        obj = "chat.completion"
    else:
        rendered = [
            {"index": c.index, "text": c.text, "finish_reason": c.finish_reason or "length", "logprobs": None}
            for c in choices
        ]
        obj = "text_completion"
    return {
        "id": meta.id,
        "object": obj,
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": rendered,
        "usage": usage(prompt_tokens, sum(c.tokens for c in choices)),
    }


def embeddings_body(model: str, vectors: list[list[float]], tokens: int, encoding: str = "float") -> dict[str, Any]:
    def encode(v: list[float]) -> list[float] | str:
        if encoding == "base64":
            return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode("ascii")
        return v

    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


class SseWriter:
    """The chunks of one streamed completion, in OpenAI's shapes."""

    def __init__(self, meta: Meta) -> None:
        self.meta = meta
        self.obj = "chat.completion.chunk" if meta.kind == "chat" else "text_completion"

    def _frame(self, choices: list[dict[str, Any]], usage_doc: dict[str, Any] | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": self.meta.id,
            "object": self.obj,
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }
        if usage_doc is not None:
            body["usage"] = usage_doc
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    def role(self, n: int) -> bytes:
        """Chat streams open with the assistant's role, one delta per choice."""
        return self._frame(
            [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
                for i in range(n)
            ]
        )

    def piece(self, index: int, text: str, finish_reason: str | None) -> bytes:
        if self.meta.kind == "chat":
            delta: dict[str, Any] = {"content": text} if text else {}
            return self._frame([{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}])
        return self._frame([{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return self._frame([], usage(prompt_tokens, completion_tokens))

    @staticmethod
    def error(exc: GpufleetError) -> bytes:
        # Headers are gone: the error travels as an event, and the stream still ends properly.
        return b"data: " + json.dumps(exc.to_openai()).encode() + b"\n\n"
