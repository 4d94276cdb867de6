"""The pod's compute-thread count (``TORCH_THREADS``) in every thread that runs a model.

``torch.set_num_threads`` in ``main()`` sets torch's own count, but the GEMM libraries under it
(MKL, oneDNN) take their thread count from OpenMP, whose setting belongs to each thread: a thread
that never set it uses every core. The batching library runs each model's steps in a thread of its
own, and embedding batches run in worker threads, so their matrix products ran on every core whatever
``TORCH_THREADS`` said (measured: CPU time twice the wall time in the step thread, with
``TORCH_THREADS=1`` on two cores), contending with the event loop and with other devices' threads.

A forward pre-hook on each loaded model applies the count once in each thread that runs it.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

_local = threading.local()


def _apply(module: Any, args: Any) -> None:
    if not getattr(_local, "applied", False):
        torch.set_num_threads(torch.get_num_threads())  # torch's count is process-wide; OpenMP's is not
        _local.applied = True


def apply_in_each_thread(model: Any) -> None:
    """Every thread that runs ``model`` uses the process's compute-thread count (once per model: a
    copied model carries the hook already)."""
    if _apply not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_apply)
