"""What serves a device's current group: a batching engine per generative model, an embedding
batcher per embedding model. Built when the group becomes current, closed before it is parked."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gpufleet.api.errors import InternalError
from gpufleet.pod_server.devices import is_cuda
from gpufleet.pod_server.engine.batching import BatchEngine
from gpufleet.pod_server.engine.embed_batcher import EmbeddingBatcher
from gpufleet.pod_server.engine.kv_sizing import kv_bytes_per_token, size_kv_cache
from gpufleet.pod_server.engine.text import eos_token_ids
from gpufleet.pod_server.inference import LoadedModel
from gpufleet.pod_server.metrics import PodMetrics
from gpufleet.pod_server.settings import PodServerSettings

T = TypeVar("T")


@dataclass
class GroupRuntime:
    device: str
    group: str
    models: dict[str, LoadedModel]
    engines: dict[str, BatchEngine] = field(default_factory=dict)
    batchers: dict[str, EmbeddingBatcher] = field(default_factory=dict)
    run_blocking: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None

    def engine(self, model_id: str) -> BatchEngine:
        try:
            return self.engines[model_id]
        except KeyError:
            raise InternalError(f"model {model_id!r} has no batching engine on {self.device}") from None

    def batcher(self, model_id: str) -> EmbeddingBatcher:
        try:
            return self.batchers[model_id]
        except KeyError:
            raise InternalError(f"model {model_id!r} has no embedding batcher on {self.device}") from None

    def kv_usage(self) -> tuple[int, int]:
        used = total = 0
        for engine in self.engines.values():
            u, t = engine.kv_usage()
            used += u
            total += t
        return used, total

    @property
    def running_sequences(self) -> int:
        return sum(e.running for e in self.engines.values())

    async def close(self) -> None:
        for batcher in self.batchers.values():
            await batcher.close()
        loop = asyncio.get_running_loop()
        for engine in self.engines.values():
            await loop.run_in_executor(None, engine.stop)
        self.engines.clear()
        self.batchers.clear()


CPU_MAX_SEQUENCES = 32
GPU_MAX_SEQUENCES = 64


def max_sequences(device: str, setting: int | None) -> int:
    """Sequences a device batches: the setting, else 64 on a GPU and 32 on a CPU device. On a CPU the
    library's step costs more per sequence past about 32 (bench engine_peer: llama-25m at c=64 gave 0.74x
    its c=32 tokens/s uncapped, 1.04x capped at 32): queueing the rest keeps the throughput."""
    if setting is not None:
        return setting
    return GPU_MAX_SEQUENCES if is_cuda(device) else CPU_MAX_SEQUENCES


def kv_budget_bytes(device: str, kv_cache_gb: float | None) -> int:
    """The device's KV budget: the setting, else 30% of a GPU's memory or 0.25 GB of a CPU's."""
    if kv_cache_gb is not None:
        return int(kv_cache_gb * 1e9)
    if is_cuda(device):
        import torch

        return int(0.3 * torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return int(0.25e9)


def build_group_runtime(
    device: str,
    group: str,
    models: dict[str, LoadedModel],
    settings: PodServerSettings,
    run_blocking: Callable[[Callable[[], Any]], Awaitable[Any]],
    metrics: PodMetrics,
) -> GroupRuntime:
    """Start an engine per generative model (their KV caches share the device's budget equally)
    and an embedding batcher per embedding model. Blocking: runs on a device thread."""
    runtime = GroupRuntime(device, group, models, run_blocking=run_blocking)
    generative = {mid: m for mid, m in models.items() if m.spec.task in ("chat", "completion")}
    share = kv_budget_bytes(device, settings.kv_cache_gb) // max(1, len(generative))
    sequences = max_sequences(device, settings.max_sequences_per_device)
    try:
        for mid, m in generative.items():
            sizing = size_kv_cache(
                model_id=mid,
                bytes_per_token=kv_bytes_per_token(m.model.config, m.model.dtype.itemsize),
                budget_bytes=share,
                max_sequences=sequences,
                context_length=m.context_length,
                on_gpu=is_cuda(device),
            )
            engine = BatchEngine(
                mid,
                m.model,
                device,
                sizing,
                max_sequences=sequences,
                eos_ids=eos_token_ids(m.model.config, getattr(m.model, "generation_config", None), m.tokenizer),
                on_tokens=metrics.generation_tokens.labels(**metrics.labels(device), model=mid).inc,
                packed_linear=settings.cpu_packed_linear,
            )
            engine.start()
            runtime.engines[mid] = engine
        for mid, m in models.items():
            if m.spec.task == "embedding":
                runtime.batchers[mid] = EmbeddingBatcher(
                    m.embed,
                    run_blocking,
                    max_batch=settings.embedding_batch_size,
                    max_wait_s=settings.embedding_batch_wait_ms / 1000,
                )
    except BaseException:
        for engine in runtime.engines.values():
            engine.stop()
        raise
    return runtime
