"""The library manager's settings per device kind, as built for the installed transformers: on a GPU
the library's documented fast path, on a CPU what this machine's measurements chose."""

from __future__ import annotations

import pytest

from gpufleet.pod_server.engine.batching import _cb_config, manager_fields
from gpufleet.pod_server.engine.kv_sizing import KvSizing, size_kv_cache

pytestmark = pytest.mark.unit


def _sizing(on_gpu: bool) -> KvSizing:
    return size_kv_cache(
        model_id="m", bytes_per_token=4096, budget_bytes=2**26, max_sequences=16, context_length=256, on_gpu=on_gpu
    )


def test_on_a_gpu_the_library_picks_cuda_graphs_async_batching_and_flash() -> None:
    sizing = _sizing(True)
    config = _cb_config(**manager_fields("cuda:0", sizing, 64))
    assert config.use_cuda_graph is None  # the library decides per path
    assert getattr(config, "use_async_batching", None) is None
    assert getattr(config, "auto_switch_to_flash", True) is True
    assert getattr(config, "default_compile_level", 0) == 0
    assert config.max_requests_per_batch == 64 and config.num_blocks == sizing.num_blocks
    assert config.per_request_processors is True and config.allow_block_sharing is False


def test_on_a_cpu_no_cuda_graphs_no_async_batching_and_the_models_own_attention() -> None:
    config = _cb_config(**manager_fields("cpu:0", _sizing(False), 32))
    assert config.use_cuda_graph is False
    assert getattr(config, "use_async_batching", False) is False
    assert getattr(config, "auto_switch_to_flash", False) is False
    assert config.max_requests_per_batch == 32 and config.allow_block_sharing is False
