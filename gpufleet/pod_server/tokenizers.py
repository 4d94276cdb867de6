"""Tokenizers and context lengths, loaded once per model so bad requests are refused
(400, context too long) before they take a queue slot or trigger a group switch."""

from __future__ import annotations

import asyncio
from typing import Any

from transformers import AutoConfig, AutoTokenizer

from gpufleet.api.errors import Unavailable
from gpufleet.api.model_groups import ModelSpec
from gpufleet.pod_server.inference import chat_prompt_ids, context_length_of


class TokenizerCache:
    def __init__(self) -> None:
        self._entries: dict[str, tuple[Any, int]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def _get(self, spec: ModelSpec) -> tuple[Any, int]:
        if spec.id in self._entries:
            return self._entries[spec.id]
        lock = self._locks.setdefault(spec.id, asyncio.Lock())
        async with lock:
            if spec.id not in self._entries:
                try:
                    self._entries[spec.id] = await asyncio.to_thread(_load, spec)
                except Exception as exc:  # a broken model directory degrades only its model
                    raise Unavailable(
                        f"model {spec.id!r} is unavailable: cannot read its tokenizer or config: {exc}",
                        code="model_load_failed",
                        retry_after_s=30,
                    ) from exc
        return self._entries[spec.id]

    async def context_length(self, spec: ModelSpec) -> int:
        return (await self._get(spec))[1]

    async def encode(self, spec: ModelSpec, text: str) -> list[int]:
        tok, _ = await self._get(spec)
        return list(tok(text)["input_ids"])

    async def encode_chat(self, spec: ModelSpec, messages: list[dict[str, str]]) -> list[int]:
        tok, _ = await self._get(spec)
        return chat_prompt_ids(tok, messages)


def _load(spec: ModelSpec) -> tuple[Any, int]:
    tokenizer = AutoTokenizer.from_pretrained(spec.source)
    config = AutoConfig.from_pretrained(spec.source)
    return tokenizer, context_length_of(config, spec)
