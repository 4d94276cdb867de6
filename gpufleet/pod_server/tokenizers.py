"""What a request needs to know of its model before it takes a queue slot: the tokenizer, the
context length and the end tokens, loaded once per model without the weights, so bad requests
are refused (400, context too long) before they queue or trigger a group switch.

Tokenising runs on a thread, never on the event loop: a megabyte of prompt takes seconds.
Entries are keyed by the whole spec, so a model whose spec a reload changed is read anew.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from gpufleet.api.errors import Unavailable
from gpufleet.api.model_groups import ModelSpec
from gpufleet.pod_server.engine.text import eos_token_ids
from gpufleet.pod_server.inference import chat_prompt_ids, context_length_of


@dataclass(frozen=True)
class ModelInfo:
    tokenizer: Any
    context_length: int
    eos_ids: tuple[int, ...]
    vocab_size: int = 0
    hidden_size: int | None = None  # an embedding model's native dimension


class TokenizerCache:
    def __init__(self, threads: int = 2) -> None:
        self._entries: dict[ModelSpec, ModelInfo] = {}
        self._locks: dict[ModelSpec, asyncio.Lock] = {}
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tokenize")

    async def info(self, spec: ModelSpec) -> ModelInfo:
        if spec in self._entries:
            return self._entries[spec]
        lock = self._locks.setdefault(spec, asyncio.Lock())
        async with lock:
            if spec not in self._entries:
                try:
                    self._entries[spec] = await self._run(load_model_info, spec)
                except Exception as exc:  # a broken model directory degrades only its model
                    raise Unavailable(
                        f"model {spec.id!r} is unavailable: cannot read its tokenizer or config: {exc}",
                        code="model_load_failed",
                        retry_after_s=30,
                    ) from exc
        return self._entries[spec]

    def retain(self, specs: Iterable[ModelSpec]) -> None:
        """Forget every model but these (the ones served after a reload)."""
        keep = set(specs)
        for spec in [s for s in self._entries if s not in keep]:
            del self._entries[spec]
        for spec in [s for s in self._locks if s not in keep and not self._locks[s].locked()]:
            del self._locks[spec]

    async def encode(self, spec: ModelSpec, text: str) -> list[int]:
        tok = (await self.info(spec)).tokenizer
        ids: list[int] = await self._run(lambda: list(tok(text)["input_ids"]))
        return ids

    async def encode_chat(self, spec: ModelSpec, messages: list[dict[str, str]]) -> list[int]:
        tok = (await self.info(spec)).tokenizer
        ids: list[int] = await self._run(chat_prompt_ids, tok, messages)
        return ids

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def load_model_info(spec: ModelSpec) -> ModelInfo:
    tokenizer = AutoTokenizer.from_pretrained(spec.source)
    config = AutoConfig.from_pretrained(spec.source)
    try:
        generation = GenerationConfig.from_pretrained(spec.source)
    except (OSError, ValueError):  # most embedding models ship none
        generation = None
    eos = tuple(eos_token_ids(config, generation, tokenizer))
    hidden = getattr(config, "hidden_size", None)
    return ModelInfo(tokenizer, context_length_of(config, spec), eos, len(tokenizer), hidden)
