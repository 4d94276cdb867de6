"""CPU devices report host figures and never raise; the document keeps its old top-level fields."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from gpufleet.pod_server.gpu_stats import DeviceReading, GpuStats, HostSource, NvmlSource, open_stats_source

pytestmark = pytest.mark.unit


def test_host_source_reports_real_memory() -> None:
    r = HostSource().read("cpu:0")
    assert r.available is False
    assert 0 < r.memory_used <= r.memory_total
    assert 0 <= r.memory_percent <= 100


def test_without_cuda_devices_the_host_source_is_used() -> None:
    assert isinstance(open_stats_source(["cpu:0", "cpu:1"]), HostSource)


class _Scripted:
    """Readings in a given order: the peak must be the highest seen, not the latest."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def read(self, device: str) -> DeviceReading:
        return DeviceReading(False, self.values.pop(0), 1.0, 4.0)

    def uuid(self, device: str) -> str | None:
        return None

    def close(self) -> None:
        pass


def test_document_shape_and_peak() -> None:
    stats = GpuStats(_Scripted([70.0, 20.0]), ["cpu:0"])
    stats.document()
    doc = stats.document()
    assert doc["devices"]["cpu:0"]["utilization"] == 20.0
    assert doc["devices"]["cpu:0"]["peak_utilization"] == 70.0
    assert doc["peak_utilization"] == 70.0 and doc["memory_percent"] == 25.0
    assert doc["available"] is False


class FakeNvml:
    """The few pynvml calls NvmlSource makes, for two GPUs; bytes where pynvml may return bytes."""

    UUIDS = ("GPU-11111111-2222-3333-4444-555555555555", "GPU-66666666-7777-8888-9999-000000000000")

    def __init__(self) -> None:
        self.initialised = False

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        return self.UUIDS.index(uuid)

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return self.UUIDS[handle].encode()

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(used=2 * 1024**3, total=80 * 1024**3)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=40 + handle)


def test_nvml_source_publishes_each_gpus_uuid() -> None:
    # torch numbers the visible GPUs; with CUDA_VISIBLE_DEVICES=1,0 cuda:0 is the second card.
    torch_uuids = {0: FakeNvml.UUIDS[1].removeprefix("GPU-"), 1: FakeNvml.UUIDS[0]}  # with and without prefix
    src = NvmlSource(FakeNvml(), cuda_uuid=lambda i: torch_uuids[i])
    assert src.uuid("cuda:0") == FakeNvml.UUIDS[1]
    assert src.uuid("cuda:1") == FakeNvml.UUIDS[0]
    assert src.uuid("cpu:0") is None  # CPU devices have none
    r = src.read("cuda:0")
    assert r.available and r.uuid == FakeNvml.UUIDS[1] and r.utilization == 41.0 and r.memory_total == 80.0


def test_a_failing_uuid_read_is_none_not_an_error() -> None:
    src = NvmlSource(FakeNvml(), cuda_uuid=lambda i: "GPU-not-a-card")
    assert src.uuid("cuda:0") is None
    assert src.read("cuda:0").available is False


def test_host_source_has_no_uuid() -> None:
    assert HostSource().uuid("cpu:0") is None
