"""The batch-1 baseline: one sequence at a time, token by token, with a KV cache.

This is the loop the pod server ran before continuous batching (``LoadedModel.generate`` in
gpufleet/pod_server/inference.py at commit 3838eec), kept here so the throughput benchmark
can show what batching buys against the same model on the same machine. It runs in-process:
``concurrency`` threads, each a closed-loop client generating back to back, each request
its own forward passes (torch releases the GIL inside its kernels, as on the pod's workers).
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.sweep import Record

# The pod server's template when a tokenizer ships none (same as at 3838eec).
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class Params:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    stop: list[str] = field(default_factory=list)


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    template = tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class Batch1Model:
    """A causal LM and its tokenizer, generating one sequence per call."""

    def __init__(self, model: Any, tokenizer: Any, device: str = "cpu") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device

    @classmethod
    def load(cls, source: Path | str, device: str = "cpu", dtype: str = "float32") -> Batch1Model:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        # Recent transformers rename past_key_values; the old loop used that name (all 5.17 has).
        # Set once here: catch_warnings around each call is not thread-safe.
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype)).to(device).eval()
        return cls(model, tok, device)

    def generate(self, prompt_ids: list[int], params: Params) -> Iterator[tuple[str, int, str | None]]:
        """Yield (text delta, tokens since the last delta, finish reason) one token at a time."""
        import torch

        with torch.inference_mode():
            yield from self._generate(prompt_ids, params)

    def _generate(self, prompt_ids: list[int], params: Params) -> Iterator[tuple[str, int, str | None]]:
        import torch

        dev = torch.device(self.device)
        gen = torch.Generator(device=dev)
        gen.manual_seed(params.seed if params.seed is not None else time.monotonic_ns() & 0xFFFFFFFF)
        input_ids = torch.tensor([prompt_ids], device=dev)
        eos = self.tokenizer.eos_token_id
        past: Any = None
        produced: list[int] = []
        emitted = ""
        pending = 0
        for _ in range(params.max_new_tokens):
            out = self.model(input_ids=input_ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            next_id = _sample(out.logits[0, -1].float(), params, gen)
            if next_id == eos:
                yield "", pending, "stop"
                return
            produced.append(next_id)
            pending += 1
            # The whole text decoded again per token, as the old loop did.
            text = self.tokenizer.decode(produced, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # part of a multi-byte character: wait for the rest
                input_ids = torch.tensor([[next_id]], device=dev)
                continue
            hit = _first_stop(text, params.stop)
            if hit is not None:
                yield text[len(emitted) : hit], pending, "stop"
                return
            delta, emitted = text[len(emitted) :], text
            if delta:
                yield delta, pending, None
                pending = 0
            input_ids = torch.tensor([[next_id]], device=dev)
        yield "", pending, "length"


def _sample(logits: Any, params: Params, gen: Any) -> int:
    import torch

    if params.temperature <= 1e-5:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < params.top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
        return int(idx[choice].item())
    return int(torch.multinomial(probs, 1, generator=gen).item())


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def closed_loop(
    m: Batch1Model, prompt_ids: list[int], params: Params, *, concurrency: int, stop_at: float, max_requests: int
) -> list[Record]:
    """``concurrency`` threads generating back to back until ``stop_at`` (time.perf_counter)
    or ``max_requests`` started in all; each request's times and token count."""
    records: list[Record] = []
    lock = threading.Lock()
    started = [0]

    def client() -> None:
        while time.perf_counter() < stop_at:
            with lock:
                if started[0] >= max_requests:
                    return
                started[0] += 1
            sent = time.perf_counter()
            first: float | None = None
            tokens = 0
            try:
                for _text, n, _reason in m.generate(prompt_ids, params):
                    if n and first is None:
                        first = time.perf_counter()
                    tokens += n
                rec = Record(sent, first, time.perf_counter(), tokens)
            except Exception as exc:  # a failed request is a record, not a dead client
                rec = Record(sent, first, time.perf_counter(), 0, ok=False, error=f"{type(exc).__name__}: {exc}")
            with lock:
                records.append(rec)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records
