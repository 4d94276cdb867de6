"""Continuous batching on the GPU (issue 8): aggregate tokens/s at 1, 16, 64 and 256 concurrent
sequences for a 0.5B-shaped and a 7B-shaped random-weight Llama in bfloat16, in-process.

The engine is the pod server's own ``BatchEngine`` (transformers' ContinuousBatchingManager,
KV cache sized by ``kv_sizing`` from half the free device memory, per-request sampling), driven
in-process: the GPU machine has no web stack, and the engine needs none.
Models are made on the device from a config (no files, no
downloads); prompts are seeded random token ids; EOS is off so every request generates
exactly ``max_new_tokens``. Closed loop as in bench/throughput.py, summarised by the same
code (bench/sweep.py). Each point checks the time left and is skipped when it would not fit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.sweep import Record, add_ratios, summarize_point
from gpufleet.pod_server.engine.batching import BatchEngine
from gpufleet.pod_server.engine.kv_sizing import kv_bytes_per_token, size_kv_cache


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool = False


# Qwen2.5-0.5B's dimensions (tied embeddings, GQA 14/2), and Llama-2-7B's (MHA 32/32).
SHAPES = {
    "llama-0.5b": Shape("llama-0.5b", 896, 4864, 24, 14, 2, 151_936, tie_embeddings=True),
    "llama-7b": Shape("llama-7b", 4096, 11008, 32, 32, 32, 32_000),
}
DRY_SHAPES = {"tiny-a": Shape("tiny-a", 64, 128, 2, 4, 2, 512), "tiny-b": Shape("tiny-b", 128, 256, 2, 4, 4, 512)}
CONCURRENCY = (1, 16, 64, 256)
DRY_CONCURRENCY = (1, 4, 16)


def build(shape: Shape, device: str, dtype: Any) -> Any:
    """A random-weight Llama of ``shape`` made directly on ``device`` in ``dtype``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=shape.tie_embeddings,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # never materialise a float32 copy of 7B parameters
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def run_sweep(
    *,
    device: str,
    dtype_name: str,
    shapes: Sequence[Shape],
    concurrency: Sequence[int],
    seconds: float,
    warmup_s: float,
    prompt_tokens: int,
    max_new_tokens: int,
    left: Callable[[], float],
    say: Callable[[str], None],
) -> dict[str, Any]:
    import torch

    dtype = getattr(torch, dtype_name)
    cuda = device.startswith("cuda")
    if not cuda:  # the dry run: on a shared CPU, two spinning intra-op threads cost far more than they give
        torch.set_num_threads(1)
    out: dict[str, Any] = {
        "engine": "gpufleet BatchEngine (transformers ContinuousBatchingManager, explicit KV sizing, seeded sampler)",
        "device": device,
        "dtype": dtype_name,
        "prompt_tokens": prompt_tokens,
        "max_new_tokens": max_new_tokens,
        "seconds_per_point": seconds,
        "warmup_s_per_point": warmup_s,
        "models": {},
        "skipped": [],
    }
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    point_s = warmup_s + seconds + 10.0  # the drain, and a margin
    for shape in shapes:
        if left() < 60 + point_s:
            out["skipped"].append(f"{shape.name}: only {left():.0f}s left")
            say(f"cb sweep {shape.name}: skipped, {left():.0f}s left")
            continue
        t = time.monotonic()
        model = build(shape, device, dtype)
        params = sum(p.numel() for p in model.parameters())
        gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
        if cuda:
            torch.cuda.synchronize(device)
        say(f"cb sweep {shape.name}: {params / 1e9:.2f}B parameters, {gb:.1f} GB, built in {time.monotonic() - t:.1f}s")
        gen = torch.Generator().manual_seed(1)
        prompt = torch.randint(2, shape.vocab, (prompt_tokens,), generator=gen).tolist()
        entry: dict[str, Any] = {"params_b": round(params / 1e9, 3), "weights_gb": round(gb, 2), "points": []}
        out["models"][shape.name] = entry
        try:
            t = time.monotonic()
            context = prompt_tokens + max_new_tokens
            if cuda:
                free, _total = torch.cuda.mem_get_info(torch.device(device))
                budget = int(0.5 * free)  # the engine's budget, as KV_CACHE_GB would set it
            else:
                budget = 2**28
            sizing = size_kv_cache(
                model_id=shape.name,
                bytes_per_token=kv_bytes_per_token(model.config, dtype.itemsize),
                budget_bytes=budget,
                max_sequences=max(concurrency),
                context_length=context,
                on_gpu=cuda,
            )
            engine = BatchEngine(shape.name, model, device, sizing, max_sequences=max(concurrency), eos_ids=[])
            engine.start()
            entry["num_blocks"] = sizing.num_blocks
            entry["page_size"] = sizing.page_size
            entry["attention"] = str(model.config._attn_implementation)
            entry["kv_gb"] = round(sizing.bytes / 1e9, 2)
            entry["engine_start_s"] = round(time.monotonic() - t, 2)
            say(f"cb sweep {shape.name}: engine with {sizing.num_blocks} KV blocks ({entry['kv_gb']} GB) started")
            try:
                for c in concurrency:
                    if left() < point_s:
                        entry["skipped"] = [*entry.get("skipped", []), f"c={c}: only {left():.0f}s left"]
                        say(f"cb sweep {shape.name} c={c}: skipped, {left():.0f}s left")
                        continue
                    t0 = time.perf_counter()
                    start, end = t0 + warmup_s, t0 + warmup_s + seconds
                    records = asyncio.run(
                        engine_closed_loop(
                            engine,
                            prompt,
                            concurrency=c,
                            max_new_tokens=max_new_tokens,
                            stop_at=end,
                            max_requests=100 * c,
                        )
                    )
                    p = summarize_point(records, start, end, c)
                    p["elapsed_s"] = round(time.perf_counter() - t0, 2)
                    if cuda:
                        p["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
                    entry["points"].append(p)
                    say(
                        f"cb sweep {shape.name} c={c}: {p['tokens_per_s'] or 0:.0f} tokens/s, p50 TTFT "
                        f"{p['p50_ttft_s']} s, {p['requests_completed_in_window']} requests, {p['errors']} errors"
                    )
            finally:
                engine.stop()
        finally:
            add_ratios(entry["points"])
            del model
            if cuda:
                torch.cuda.empty_cache()
    return out


async def engine_closed_loop(
    engine: Any, prompt: list[int], *, concurrency: int, max_new_tokens: int, stop_at: float, max_requests: int
) -> list[Record]:
    """``concurrency`` clients, each sending its next request when the last one ends, until ``stop_at``."""
    from gpufleet.pod_server.engine.batching import SamplingParams

    records: list[Record] = []
    budget = [max_requests]

    async def client() -> None:
        while time.perf_counter() < stop_at and budget[0] > 0:
            budget[0] -= 1
            sent = time.perf_counter()
            first: float | None = None
            tokens = 0
            try:
                async for step in engine.generate(prompt, SamplingParams(max_new_tokens, temperature=1.0)):
                    if first is None:
                        first = time.perf_counter()
                    tokens += len(step.token_ids)
                records.append(Record(sent, first, time.perf_counter(), tokens))
            except Exception as exc:
                records.append(Record(sent, first, time.perf_counter(), 0, ok=False, error=str(exc)[:200]))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return records


def table_lines(sweep: dict[str, Any]) -> list[str]:
    lines = [
        f"  continuous batching ({sweep.get('engine', '?').split(',')[0]}, transformers "
        f"{sweep.get('transformers', '?')}), {sweep['prompt_tokens']} prompt + {sweep['max_new_tokens']} new tokens:"
    ]
    for name, m in sweep.get("models", {}).items():
        cells = " | ".join(
            f"c={p['concurrency']} {p['tokens_per_s'] or 0:,.0f} tok/s"
            + (f" ({p['vs_c1']:.1f}x)" if p.get("vs_c1") else "")
            for p in m["points"]
        )
        lines.append(f"  {name} ({m['params_b']}B, {m.get('kv_gb', '?')} GB KV): {cells or 'no point measured'}")
    for s in sweep.get("skipped", []):
        lines.append(f"  cb sweep skipped: {s}")
    return lines
