"""Linear layers on oneDNN's packed weights while a generative model is current on a CPU device.

On a CPU, ``nn.Linear`` runs the BLAS GEMM torch was built with (MKL), on the weight as stored.
oneDNN, which torch also ships, reorders a weight once into the blocked layout its kernels read
fastest and then multiplies batches of a few to a few dozen rows 1.4-2.6x faster (float32, one
thread, llama-100m's MLP shapes, on this project's AMD EPYC test machine); the layers are 63% of a
decode step (bench engine_peer's profile). Small layers stay as they are (``MIN_PACKED_WEIGHTS``).
torch's own CPU compiler uses the same two operators (``torch.ops.mkldnn._reorder_linear_weight``
and ``_linear_pointwise``) for frozen linear layers.

The library's model is left as it is: each linear module gets a ``forward`` of its own instance
that calls the packed kernel, and ``release`` takes it away again. The packed copies exist only
while the model's batching engine runs (its group is current): one more copy of every linear
weight, which a parked model does not keep. Results differ from the unpacked layer's by float32
rounding (the kernels sum in another order), as between any two GEMM libraries.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

log = logging.getLogger(__name__)

PACKED_DTYPES = (torch.float32,)  # oneDNN's packed path in every CPU build; 16-bit needs CPU support
# Below this many weights a call's fixed cost dominates: a 64x256 layer ran 1.8-5.3x slower packed at
# 1-32 rows, while every layer from 512x1408 up ran faster packed at every row count tried (1-1024).
MIN_PACKED_WEIGHTS = 2**18


def available() -> bool:
    ops = torch.ops.mkldnn
    return bool(torch.backends.mkldnn.is_available()) and all(
        hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise")
    )


class PackedLinears:
    """The packed forwards installed on one model's linear layers (none when oneDNN is missing)."""

    def __init__(self, model: Any, rows_hint: int) -> None:
        """``rows_hint``: the rows a step usually multiplies (the sequences batched at once)."""
        self.modules: list[torch.nn.Linear] = []
        self.bytes = 0
        if not available():
            return
        started = time.perf_counter()
        with torch.inference_mode():
            for module in model.modules():
                if not _packable(module):
                    continue
                packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), max(1, rows_hint))
                module.forward = _packed_forward(packed, module.bias)
                self.modules.append(module)
                self.bytes += module.weight.numel() * module.weight.element_size()
        if self.modules:
            log.info(
                "linear layers packed for oneDNN",
                extra={
                    "layers": len(self.modules),
                    "mbytes": round(self.bytes / 1e6, 2),
                    "seconds": round(time.perf_counter() - started, 3),
                },
            )

    def release(self) -> None:
        """The layers' own forward again; the packed copies are freed."""
        for module in self.modules:
            module.__dict__.pop("forward", None)
        self.modules.clear()
        self.bytes = 0


def _packable(module: Any) -> bool:
    return (
        type(module) is torch.nn.Linear  # a subclass (quantised, LoRA) computes something else
        and "forward" not in module.__dict__  # already packed, or another wrapper's
        and module.weight.device.type == "cpu"
        and module.weight.dtype in PACKED_DTYPES
        and module.weight.dim() == 2
        and module.weight.numel() >= MIN_PACKED_WEIGHTS
    )


def _packed_forward(packed: torch.Tensor, bias: torch.Tensor | None) -> Any:
    linear = torch.ops.mkldnn._linear_pointwise

    def forward(x: torch.Tensor) -> torch.Tensor:
        return linear(x, packed, bias, "none", [], "")  # type: ignore[no-any-return]

    return forward
