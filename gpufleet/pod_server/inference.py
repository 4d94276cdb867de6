"""Real inference with torch + transformers: loading, token-by-token generation, embeddings.

Everything here is blocking and runs on a device's worker threads, never on the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# Resolved here, on the importing thread: transformers' lazy attributes are not safe to
# resolve for the first time from several loader threads at once.
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from gpufleet.api.model_groups import ModelSpec
from gpufleet.pod_server.devices import is_cuda, torch_device

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Used when a tokenizer ships no chat template: plain role tags that any causal LM can continue.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class GenerationParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Delta:
    text: str
    finish_reason: str | None = None
    tokens: int = 0  # tokens generated since the previous delta


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    template = tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def context_length_of(config: Any, spec: ModelSpec) -> int:
    return spec.context_length or int(getattr(config, "max_position_embeddings", None) or 2048)


def resolve_dtype(spec: ModelSpec, device: str) -> torch.dtype:
    if spec.dtype != "auto":
        return _DTYPES[spec.dtype]
    # Half precision is slow or unsupported on many CPUs; float32 there, bf16 on GPUs.
    return torch.bfloat16 if is_cuda(device) else torch.float32


class LoadedModel:
    """One model's weights and tokenizer, resident on a device or parked on the CPU."""

    def __init__(self, spec: ModelSpec, model: Any, tokenizer: Any, device: str) -> None:
        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.context_length = context_length_of(model.config, spec)
        self.bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # --- residency -------------------------------------------------------------------------

    def park(self) -> None:
        """Move the weights to host memory; pinned when they came from a GPU so the way back is fast."""
        if not is_cuda(self.device):
            return
        self.model.to("cpu")
        for p in self.model.parameters():
            p.data = p.data.pin_memory()
        for b in self.model.buffers():
            b.data = b.data.pin_memory()
        self.device = "cpu"

    def activate(self, device: str) -> None:
        if not is_cuda(device):
            self.device = device
            return
        target = torch.device(device)
        with torch.cuda.device(target):
            for p in self.model.parameters():
                p.data = p.data.to(target, non_blocking=True)
            for b in self.model.buffers():
                b.data = b.data.to(target, non_blocking=True)
            torch.cuda.current_stream(target).synchronize()
        self.device = device

    # --- tokens ----------------------------------------------------------------------------

    # --- generation ------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], params: GenerationParams, cancel: threading.Event) -> Iterator[Delta]:
        """Yield text deltas one token at a time; the last delta carries the finish reason."""
        dev = torch.device(torch_device(self.device))
        gen = torch.Generator(device=dev)
        gen.manual_seed(params.seed if params.seed is not None else time.monotonic_ns() & 0xFFFFFFFF)
        input_ids = torch.tensor([prompt_ids], device=dev)
        eos = self.tokenizer.eos_token_id
        past: Any = None
        produced: list[int] = []
        emitted = ""
        pending = 0
        for _ in range(params.max_new_tokens):
            if cancel.is_set():
                yield Delta("", "cancelled", pending)
                return
            out = self.model(input_ids=input_ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            next_id = _sample(out.logits[0, -1].float(), params, gen)
            if next_id == eos:
                yield Delta("", "stop", pending)
                return
            produced.append(next_id)
            pending += 1
            text = self.tokenizer.decode(produced, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                # Part of a multi-byte character: wait for the rest before emitting.
                input_ids = torch.tensor([[next_id]], device=dev)
                continue
            hit = _first_stop(text, params.stop)
            if hit is not None:
                yield Delta(text[len(emitted) : hit], "stop", pending)
                return
            delta, emitted = text[len(emitted) :], text
            if delta:
                yield Delta(delta, None, pending)
                pending = 0
            input_ids = torch.tensor([[next_id]], device=dev)
        yield Delta("", "length", pending)

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean-pooled, L2-normalised sentence embeddings and the prompt token count."""
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.context_length, return_tensors="pt"
        ).to(torch_device(self.device))
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
        return pooled.cpu().tolist(), int(enc["attention_mask"].sum().item())


def _sample(logits: torch.Tensor, params: GenerationParams, gen: torch.Generator) -> int:
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


def load_model(spec: ModelSpec, device: str) -> LoadedModel:
    """Load one model from its source straight onto ``device`` with the real transformers code."""
    dtype = resolve_dtype(spec, device)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec.source)
    cls = AutoModel if spec.task == "embedding" else AutoModelForCausalLM
    model = cls.from_pretrained(spec.source, dtype=dtype)
    model.to(torch_device(device))
    model.eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded = LoadedModel(spec, model, tokenizer, device)
    log.info(
        "model loaded",
        extra={
            "model": spec.id,
            "device": device,
            "seconds": round(time.perf_counter() - started, 3),
            "mbytes": round(loaded.bytes / 1e6, 2),
        },
    )
    return loaded
