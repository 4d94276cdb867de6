"""The real NVML source and the pinned CPU-cache path on a CUDA machine (opt-in: GPUFLEET_GPU_TESTS=1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.api.model_groups import load_model_groups
from gpufleet.pod_server.gpu_stats import GpuStats, NvmlSource
from gpufleet.pod_server.inference import load_model
from gpufleet.pod_server.residency import DeviceResidency

pytestmark = pytest.mark.gpu


def test_nvml_reads_the_device_torch_calls_cuda0() -> None:
    import torch

    src = NvmlSource()
    try:
        r = src.read("cuda:0")
        assert r.available and r.memory_total > 1
        assert r.uuid.replace("GPU-", "") == str(torch.cuda.get_device_properties(0).uuid).replace("GPU-", "")
        doc = GpuStats(src, ["cuda:0"]).document()
        assert doc["available"] is True and doc["devices"]["cuda:0"]["memory_total"] == pytest.approx(r.memory_total)
    finally:
        src.close()


def test_cache_round_trip_pins_host_memory_and_keeps_outputs(demo_models: Path) -> None:
    import torch

    groups = load_model_groups(demo_models)
    r = DeviceResidency("cuda:0", 8, load_model)
    r.make_current("alpha", groups.groups["alpha"])
    chat = r.current["tiny-chat"]
    model = chat.model
    ids = torch.tensor([[1, 2, 3]], device="cuda:0")
    before = model(input_ids=ids).logits.float().cpu()
    on_device = torch.cuda.memory_allocated(0)
    r.make_current("beta", groups.groups["beta"])
    assert all(p.is_pinned() for p in model.parameters())  # parked onto its host copy, no copy back
    assert chat.host_bytes >= chat.bytes and "tiny-chat" in r.ledger.host_copies()
    r.make_current("alpha", groups.groups["alpha"])
    assert r.make_current("beta", groups.groups["beta"]).source == "cache"
    assert torch.cuda.memory_allocated(0) <= on_device + (64 << 20)  # alpha's device copy is gone
    assert r.make_current("alpha", groups.groups["alpha"]).source == "cache"
    assert next(model.parameters()).device.type == "cuda"
    assert torch.allclose(before, model(input_ids=ids).logits.float().cpu())
