"""Real models with torch + transformers: loading, residency moves, embeddings.

Generation runs in the continuous-batching engine (``engine/batching.py``). Everything here is
blocking and runs on a device's worker threads, never on the event loop.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

# Resolved here, on the importing thread: transformers' lazy attributes are not safe to
# resolve for the first time from several loader threads at once.
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, BatchEncoding

from gpufleet.api.model_groups import ModelSpec
from gpufleet.pod_server.devices import is_cuda, torch_device
from gpufleet.pod_server.engine import threads

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Used when a tokenizer ships no chat template: plain role tags that any causal LM can continue.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


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
        threads.apply_in_each_thread(model)
        self.context_length = context_length_of(model.config, spec)
        self.bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # --- residency -------------------------------------------------------------------------
    #
    # A model keeps one host copy of its weights (pinned when a GPU is in play) from the moment it
    # is cached: parking points the tensors back at it (no copy), activating copies it to the
    # device. On CPU devices the weights themselves are the host copy and both are no-ops.

    _host: dict[str, torch.Tensor] | None = None
    host_bytes: int = 0  # what the host copy really takes (pinned blocks rounded as torch rounds them)

    def _tensors(self) -> list[tuple[str, torch.nn.Parameter | torch.Tensor]]:
        return [*self.model.named_parameters(), *self.model.named_buffers()]

    @property
    def has_host_copy(self) -> bool:
        return self._host is not None or not is_cuda(self.device)

    def ensure_host_copy(self, *, pin: bool | None = None) -> int:
        """Make the host copy once (one pinned block for all tensors); returns its bytes."""
        if self._host is not None:
            return self.host_bytes
        pin = is_cuda(self.device) if pin is None else pin
        if not pin:
            self.host_bytes = self.bytes
            if not is_cuda(self.device):
                return self.host_bytes  # the weights in host memory are the copy
        tensors = self._tensors()
        sizes = [_aligned(t.numel() * t.element_size()) for _, t in tensors]
        flat = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=pin)
        host: dict[str, torch.Tensor] = {}
        offset = 0
        for (name, t), size in zip(tensors, sizes, strict=True):
            n = t.numel() * t.element_size()
            view = flat[offset : offset + n].view(t.dtype).view(t.shape)
            view.copy_(t.data)
            host[name] = view
            offset += size
        self._host = host
        # torch's pinned allocator hands out power-of-two blocks: that is what the budget must count.
        self.host_bytes = _pow2(flat.numel()) if pin else flat.numel()
        if not is_cuda(self.device):  # loaded on the host: serve from the copy, drop the pageable tensors
            for name, t in tensors:
                t.data = host[name]
        return self.host_bytes

    def park(self) -> None:
        """Free the device's copy: the tensors point at the host copy again (made now if missing)."""
        if not is_cuda(self.device):
            return
        self.ensure_host_copy()
        assert self._host is not None
        for name, t in self._tensors():
            t.data = self._host[name]
        self.device = "cpu"

    def activate(self, device: str) -> None:
        """Copy the host copy to ``device`` (a CUDA device); the model is on it once this returns."""
        if not is_cuda(device):
            self.device = device
            return
        target = torch.device(device)
        host = self._host or {name: t.data for name, t in self._tensors()}
        with torch.cuda.device(target):
            for name, t in self._tensors():
                t.data = host[name].to(target, non_blocking=True)
            torch.cuda.current_stream(target).synchronize()
        self.device = device

    def clone_sharing_weights(self) -> LoadedModel:
        """Another module tree over the same host tensors, for a second device: no second host copy."""
        memo: dict[int, Any] = {}
        for _, t in self._tensors():
            fresh = t.detach()
            memo[id(t)] = torch.nn.Parameter(fresh, requires_grad=False) if isinstance(t, torch.nn.Parameter) else fresh
        model = copy.deepcopy(self.model, memo)
        clone = LoadedModel(self.spec, model, self.tokenizer, self.device)  # one tokenizer per model
        if self._host is not None:
            clone._host = self._host
        clone.host_bytes = 0  # the copy is counted once, on the original
        return clone

    @torch.inference_mode()
    def embed(self, inputs: Sequence[str | list[int]]) -> tuple[list[list[float]], list[int]]:
        """Mean-pooled, L2-normalised sentence embeddings and each input's token count.

        An input may be token ids (as a client's tokenizer made them, without special tokens):
        they go to the model as they are, framed by the special tokens the tokenizer adds to text,
        so the ids of a text embed exactly as the text does. Texts take the same path (tokenised
        without special tokens, framed, truncated and padded here): the tokenizer, shared by the whole
        pod, is only read, never switched to padding or truncation.
        """
        enc = self._id_batch(inputs).to(torch_device(self.device))
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
        return pooled.cpu().tolist(), [int(n) for n in enc["attention_mask"].sum(1).tolist()]

    def _id_batch(self, inputs: Sequence[str | list[int]]) -> Any:
        tok = self.tokenizer
        head, tail = special_frame(tok)
        room = max(1, self.context_length - len(head) - len(tail))
        texts = [i for i in inputs if isinstance(i, str)]
        encoded = iter(tok(texts, add_special_tokens=False)["input_ids"] if texts else ())
        rows = [list(next(encoded)) if isinstance(i, str) else list(i) for i in inputs]
        rows = [[*head, *r[:room], *tail] for r in rows]
        width = max(len(r) for r in rows)
        pad = self._pad_id if self._pad_id is not None else 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)
        return BatchEncoding({"input_ids": ids, "attention_mask": mask})


def special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text's own tokens ([CLS] ... [SEP])."""
    plain = list(tokenizer("hello", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("hello")["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def _aligned(n: int, to: int = 64) -> int:
    return (n + to - 1) // to * to


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def load_tokenizer(spec: ModelSpec) -> Any:
    """The model's tokenizer, ready to be shared by threads: a pad token (the end token where it has
    none), and its backend's padding and truncation off, so that no call of ours ever switches them
    (the backend is mutated by such a switch, which races with other threads' calls)."""
    tokenizer = AutoTokenizer.from_pretrained(spec.source)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()
    return tokenizer


def read_into_memory(model: Any) -> None:
    """Copy every tensor of a model on a CPU device into the process's own memory.

    On a CPU, ``from_pretrained`` (and ``safe_open``) leave the weights memory-mapped from the
    safetensors files: a load or a switch then reads nothing, the first request pages the weights in
    (from disk when cold), and the kernel may drop them again under memory pressure. A load here
    reads them, as a copy to a GPU does, so the load time and the switch costs measured from it
    (bench/switch_cost, the simulator) include that reading, and requests never wait on it.
    A tensor shared by several modules (tied weights) is one Parameter: copied once."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.device.type == "cpu":
                t.data = t.data.clone()


def load_model(spec: ModelSpec, device: str, *, tokenizer: Any = None) -> LoadedModel:
    """Load one model from its source straight onto ``device`` with the real transformers code;
    ``tokenizer`` is the pod's one tokenizer of the model (read here when not given)."""
    dtype = resolve_dtype(spec, device)
    started = time.perf_counter()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    cls = AutoModel if spec.task == "embedding" else AutoModelForCausalLM
    model: Any = cls.from_pretrained(spec.source, dtype=dtype)
    model.to(torch_device(device))
    if not is_cuda(device):
        read_into_memory(model)
    model.eval()
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
