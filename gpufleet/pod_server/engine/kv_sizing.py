"""How big each model's paged KV cache is: a pure function of the model's shape and a byte budget.

transformers' continuous-batching manager sizes its cache to ~90% of the free device memory
(about half the host RAM on a CPU) when left alone, per model. Several models of one group
share a device, so the cache of each is sized here, explicitly, from the device's KV budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gpufleet.api.errors import ConfigError


@dataclass(frozen=True)
class KvSizing:
    page_size: int  # tokens per block
    num_blocks: int
    max_batch_tokens: int  # tokens one step may process (prefill is chunked to this)
    bytes_per_token: int

    @property
    def bytes(self) -> int:
        return self.num_blocks * self.page_size * self.bytes_per_token

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.page_size


def kv_bytes_per_token(config: Any, element_size: int) -> int:
    """Keys and values of every layer for one token."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(text.num_hidden_layers)
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return 2 * layers * kv_heads * head_dim * element_size


def size_kv_cache(
    *,
    model_id: str,
    bytes_per_token: int,
    budget_bytes: int,
    max_sequences: int,
    context_length: int,
    on_gpu: bool,
) -> KvSizing:
    """Blocks for ``budget_bytes``, never more than ``max_sequences`` full contexts need,
    never fewer than one full context (else a long prompt could never run)."""
    page_size = 256 if on_gpu else 64  # small pages waste less of a small CPU budget
    page_size = min(page_size, max(16, 1 << (context_length - 1).bit_length()))
    block_bytes = page_size * bytes_per_token
    per_context = math.ceil(context_length / page_size)
    wanted = per_context * max_sequences
    affordable = budget_bytes // block_bytes
    if affordable < per_context:
        raise ConfigError(
            f"KV_CACHE_GB: model {model_id!r} needs at least {per_context * block_bytes / 1e9:.4f} GB of KV cache "
            f"for one {context_length}-token context; its share of the budget is {budget_bytes / 1e9:.4f} GB. "
            f"Raise KV_CACHE_GB, or lower the context: the model's `context_length` in model_groups.json "
            f"(`contextLength` in a ModelGroup) caps it below the {context_length} tokens used here"
        )
    num_blocks = int(min(wanted, affordable))
    step_cap = 8192 if on_gpu else 512
    max_batch_tokens = max(max_sequences, min(step_cap, num_blocks * page_size))
    return KvSizing(page_size, num_blocks, max_batch_tokens, bytes_per_token)
