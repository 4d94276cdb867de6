"""transformers' continuous-batching manager driven directly, in-process: the reference for
what the library batches before any HTTP, and the GPU sweep's engine until gpufleet's own is
on main.

Works with transformers 5.17 (``ContinuousBatchingConfig.block_size``) and 5.24
(``page_size``, ``block_size`` deprecated). The KV cache is always sized explicitly
(``num_blocks``): left to itself the manager takes most of the free memory (about half the
host RAM on a CPU, 90% of a GPU's free memory).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from bench.sweep import Record

PAGE_SIZE = 256  # tokens per page: the library's default


def blocks_for(concurrency: int, tokens_per_sequence: int, page_size: int = PAGE_SIZE, margin: float = 1.25) -> int:
    """KV blocks for ``concurrency`` sequences of ``tokens_per_sequence`` (prompt + new) each,
    with a margin for the blocks the scheduler holds while one sequence ends and the next starts."""
    per_seq = math.ceil(tokens_per_sequence / page_size)
    return max(4, math.ceil(concurrency * per_seq * margin) + 2)


def kv_bytes_per_block(config: Any, dtype_bytes: int, page_size: int = PAGE_SIZE) -> int:
    """Bytes of one block: ``page_size`` tokens of keys and values for every layer."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv * head_dim * dtype_bytes * page_size


def cb_config(
    *,
    num_blocks: int,
    max_batch_tokens: int,
    max_requests_per_batch: int,
    page_size: int = PAGE_SIZE,
    auto_switch_to_flash: bool | None = None,
) -> Any:
    """A ContinuousBatchingConfig for the installed transformers, whichever name its page size has
    (fields this version lacks are left out)."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    names = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    size_name = "page_size" if "page_size" in names else "block_size"
    kw: dict[str, Any] = {
        size_name: page_size,
        "num_blocks": num_blocks,
        "max_batch_tokens": max_batch_tokens,
        "max_requests_per_batch": max_requests_per_batch,
        "scheduler_type": "fifo",
    }
    if auto_switch_to_flash is not None:
        kw["auto_switch_to_flash"] = auto_switch_to_flash
    return ContinuousBatchingConfig(**{k: v for k, v in kw.items() if k in names})


@dataclasses.dataclass
class Manager:
    """A started manager and the KV cache it was given."""

    manager: Any
    num_blocks: int
    page_size: int
    max_concurrency: int
    attn_implementation: str  # what the manager switched the model to


def start_manager(
    model: Any,
    *,
    max_new_tokens: int,
    max_concurrency: int,
    prompt_tokens: int,
    page_size: int = PAGE_SIZE,
    eos_token_id: int | None = None,
) -> Manager:
    """A started manager sized for ``max_concurrency`` sequences of ``prompt_tokens`` + ``max_new_tokens``."""
    import torch
    from transformers import GenerationConfig

    from gpufleet.pod_server.engine import threads

    # The library steps in a thread of its own: without this its GEMMs use every core, whatever
    # torch.set_num_threads said here (the pod server does the same for its models).
    threads.apply_in_each_thread(model)
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id,
        pad_token_id=model.generation_config.pad_token_id,
    )
    blocks = blocks_for(max_concurrency, prompt_tokens + max_new_tokens, page_size)

    def config(auto_switch_to_flash: bool | None) -> Any:
        return cb_config(
            num_blocks=blocks,
            # room to prefill every prompt in one step, up to the library's own default (its attention
            # mask grows with this times the cache), and never below one decode step of every sequence
            max_batch_tokens=max(max_concurrency, min(max_concurrency * prompt_tokens, 8192)),
            max_requests_per_batch=max_concurrency,
            page_size=page_size,
            auto_switch_to_flash=auto_switch_to_flash,
        )

    try:
        manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=config(None))
    except Exception:
        # A flash kernel the library found but cannot load (offline hub kernels): the default attention.
        manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=config(False))
    with torch.inference_mode():
        manager.start()
    return Manager(manager, blocks, page_size, max_concurrency, str(model.config._attn_implementation))


def stop_manager(m: Manager, timeout_s: float = 30.0) -> None:
    m.manager.stop(block=True, timeout=timeout_s)
    destroy = getattr(m.manager, "destroy", None)
    if destroy is not None:
        destroy()


def closed_loop(
    m: Manager,
    prompt_ids: list[int],
    *,
    concurrency: int,
    max_new_tokens: int,
    stop_at: float,
    max_requests: int,
    eos_token_id: int | None = None,
    drain_timeout_s: float = 60.0,
) -> list[Record]:
    """Keep ``concurrency`` requests in the manager: add one each time one finishes, until
    ``stop_at`` (time.perf_counter) or ``max_requests``; then wait for those in flight.
    Token times come from the manager's own per-token timestamps (``record_timestamps``)."""
    manager = m.manager
    sent: dict[str, float] = {}
    records: list[Record] = []
    counter = [0]
    prefix = f"c{concurrency}-{time.monotonic_ns()}-"

    def add() -> None:
        rid = f"{prefix}{counter[0]}"
        counter[0] += 1
        sent[rid] = time.perf_counter()
        kw: dict[str, Any] = {"eos_token_id": eos_token_id} if eos_token_id is not None else {}
        manager.add_request(
            list(prompt_ids), request_id=rid, max_new_tokens=max_new_tokens, record_timestamps=True, **kw
        )

    for _ in range(min(concurrency, max_requests)):
        add()
    deadline = stop_at + drain_timeout_s
    while sent and time.perf_counter() < deadline:
        out = manager.get_result(timeout=0.05)
        if out is None:
            if not manager.is_running():
                raise RuntimeError("the continuous-batching manager stopped")
            continue
        t_sent = sent.pop(out.request_id, None)
        if t_sent is None or not out.is_finished():
            continue
        now = time.perf_counter()
        stamps = out.timestamps or []
        failed = out.error is not None
        records.append(
            Record(
                t_sent,
                stamps[0] if stamps else None,
                stamps[-1] if stamps else now,
                0 if failed else len(out.generated_tokens),
                ok=not failed,
                error=str(out.error)[:200] if failed else None,
            )
        )
        if now < stop_at and counter[0] < max_requests:
            add()
    for rid in sent:  # past the drain deadline: cancel, so the next point starts clean
        manager.cancel_request(rid)
    return records
