"""CPU devices report host figures and never raise; the document keeps its old top-level fields."""

from __future__ import annotations

import pytest

from gpufleet.pod_server.gpu_stats import DeviceReading, GpuStats, HostSource, open_stats_source

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
