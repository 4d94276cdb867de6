"""TORCH_THREADS holds in every thread that runs a model, not only in the one that set it: OpenMP's
thread count (which MKL's and oneDNN's matrix products use) belongs to each thread."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from gpufleet.pod_server.engine import threads

pytestmark = pytest.mark.unit


def _openmp() -> Any:
    """The OpenMP runtime torch loaded (its own copy), or None."""
    with open("/proc/self/maps") as maps:
        paths = [line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line]
    return ctypes.CDLL(paths[0]) if paths else None


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _in_a_new_thread(fn: Any) -> Any:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_a_model_run_in_another_thread_uses_the_processes_thread_count(one_thread: None) -> None:
    omp = _openmp()
    if omp is None:
        pytest.skip("torch here is built without OpenMP")
    model = torch.nn.Linear(8, 8)
    threads.apply_in_each_thread(model)
    threads.apply_in_each_thread(model)  # a copied model already has it: still one hook
    assert len(model._forward_pre_hooks) == 1

    def run() -> tuple[int, int]:
        before = omp.omp_get_max_threads()
        model(torch.zeros(1, 8))
        return before, omp.omp_get_max_threads()

    before, after = _in_a_new_thread(run)
    assert after == 1
    # Without the hook a new thread has OpenMP's default (every core): what the hook exists for.
    bare = _in_a_new_thread(omp.omp_get_max_threads)
    assert before == bare
