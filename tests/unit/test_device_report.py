"""The queue document's one writer and its reader (gpufleet.api.device_report)."""

from __future__ import annotations

import pytest

from gpufleet.api.device_report import DeviceQueue, QueueDocument, device_queue, queue_document
from gpufleet.api.load_report import DeviceLoad, LoadReport

pytestmark = pytest.mark.unit


def test_the_writer_derives_every_count_from_what_is_queued_and_running() -> None:
    d = device_queue(running=3, max_sequences=8, queue_limit=16, queued_groups=["beta", "alpha", "beta"],
                     current_group="alpha", kv_blocks=(10, 40))
    assert (d.queue_size, d.waiting_for_switch, d.waiting_groups) == (3, 2, ["alpha", "beta"])
    assert (d.running_sequences, d.busy_workers, d.idle_workers, d.workers) == (3, 3, 5, 8)
    doc = queue_document({"cuda:0": d, "cuda:1": device_queue(running=1, max_sequences=8, queue_limit=16)}, 7)
    assert (doc["total_queued"], doc["total_running"], doc["status_version"]) == (3, 4, 7)
    assert doc["devices"]["cuda:1"]["waiting_groups"] == [] and doc["devices"]["cuda:1"]["queue_size"] == 0


def test_the_reader_takes_the_writers_document_back_and_its_counts_as_a_load_report() -> None:
    d = device_queue(running=2, max_sequences=4, queue_limit=8, queued_groups=["beta"], kv_blocks=(1, 4))
    doc = QueueDocument.model_validate(queue_document({"cpu:0": d}, 3))
    assert doc.devices["cpu:0"] == d
    assert doc.load() == LoadReport({"cpu:0": DeviceLoad(running=2, waiting=1, kv_cache=0.25)}, 3)


def test_an_older_writers_document_reads_with_defaults() -> None:
    # The echo backend and the emulated pods once wrote only these; a pod before status versions, no version.
    doc = QueueDocument.model_validate({"devices": {"cpu:0": {"queue_size": 2, "busy_workers": 1, "workers": 4}}})
    assert doc.status_version is None and doc.devices["cpu:0"].waiting_groups == []
    assert doc.load().devices["cpu:0"] == DeviceLoad(running=1, waiting=2)
    assert DeviceQueue().load() == DeviceLoad()
