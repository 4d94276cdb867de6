"""What a request needs to know of its model before it takes a queue slot: the tokenizer, the
context length and the end tokens, loaded once per model without the weights, so bad requests
are refused (400, context too long) before they queue or trigger a group switch.

The pod holds one tokenizer per model: the loaders take it from here (``tokenizer``) rather than
reading their own, so validation, detokenising and embeddings share it, and it goes when the
model's group leaves the pod (``retain``). A shared tokenizer is only ever read: its backend's
padding and truncation are switched off once, at load, and nothing switches them on again.

Tokenising runs on a thread, never on the event loop: a megabyte of prompt takes seconds.
Entries are keyed by the spec (less its dtype, which the tokenizer does not depend on), so a model
whose spec a reload changed is read anew.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, GenerationConfig

from gpufleet.api.errors import Unavailable
from gpufleet.api.model_groups import ModelSpec
from gpufleet.pod_server.engine.text import eos_token_ids
from gpufleet.pod_server.inference import chat_prompt_ids, context_length_of, load_tokenizer


@dataclass(frozen=True)
class ModelInfo:
    tokenizer: Any
    context_length: int
    eos_ids: tuple[int, ...]
    vocab_size: int = 0
    hidden_size: int | None = None  # an embedding model's native dimension


def _key(spec: ModelSpec) -> ModelSpec:
    # A device loads a copy in its own dtype (service._host_spec): the same model, the same tokenizer.
    return spec if spec.dtype == "auto" else spec.model_copy(update={"dtype": "auto"})


class TokenizerCache:
    """One ``ModelInfo`` (and so one tokenizer) per served model, for the event loop and the loaders."""

    def __init__(self, threads: int = 2) -> None:
        self._entries: dict[ModelSpec, ModelInfo] = {}
        self._served: frozenset[ModelSpec] | None = None  # the models to keep; None: every one asked for
        self._guard = threading.Lock()  # over _entries, _served and _loading (loader threads use it too)
        self._loading: dict[ModelSpec, threading.Lock] = {}  # one read per model at a time
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tokenize")

    async def info(self, spec: ModelSpec) -> ModelInfo:
        cached = self._entries.get(_key(spec))
        if cached is not None:
            return cached
        try:
            info: ModelInfo = await self._run(self.info_blocking, spec)
        except Exception as exc:  # a broken model directory degrades only its model
            raise Unavailable(
                f"model {spec.id!r} is unavailable: cannot read its tokenizer or config: {exc}",
                code="model_load_failed",
                retry_after_s=30,
            ) from exc
        return info

    def info_blocking(self, spec: ModelSpec) -> ModelInfo:
        """The model's info, read once (blocking: a tokenize, loader or prefetch thread)."""
        key = _key(spec)
        with self._guard:
            cached = self._entries.get(key)
            if cached is not None:
                return cached
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._guard:
                cached = self._entries.get(key)
            if cached is not None:
                return cached
            info = load_model_info(spec)
            with self._guard:
                # A model a reload dropped meanwhile is served to this caller, not kept.
                if self._served is None or key in self._served:
                    self._entries[key] = info
            return info

    def tokenizer(self, spec: ModelSpec) -> Any:
        """The model's one tokenizer, for a loader (blocking)."""
        return self.info_blocking(spec).tokenizer

    def retain(self, specs: Iterable[ModelSpec]) -> None:
        """Keep only these models from now on (the ones the pod serves): the others' tokenizers go."""
        keep = frozenset(_key(s) for s in specs)
        with self._guard:
            self._served = keep
            for key in [k for k in self._entries if k not in keep]:
                del self._entries[key]
            for key in [k for k in self._loading if k not in keep]:
                del self._loading[key]

    def cached(self) -> list[ModelSpec]:
        """The models whose info is held (for the status and tests)."""
        with self._guard:
            return list(self._entries)

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
    tokenizer = load_tokenizer(spec)
    config = AutoConfig.from_pretrained(spec.source)
    try:
        generation = GenerationConfig.from_pretrained(spec.source)
    except (OSError, ValueError):  # most embedding models ship none
        generation = None
    eos = tuple(eos_token_ids(config, generation, tokenizer))
    hidden = getattr(config, "hidden_size", None)
    return ModelInfo(tokenizer, context_length_of(config, spec), eos, len(tokenizer), hidden)
