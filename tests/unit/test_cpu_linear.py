"""oneDNN-packed linear layers on a CPU device: installed on a model's own modules, close to the
unpacked result, taken away again on release, and never stacked or applied where they would
compute something else."""

from __future__ import annotations

import pytest
import torch

from gpufleet.pod_server.engine import cpu_linear
from gpufleet.pod_server.engine.cpu_linear import PackedLinears

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(not cpu_linear.available(), reason="this torch build has no oneDNN linear operators"),
]


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(512, 640)
        self.down = torch.nn.Linear(640, 512, bias=False)
        self.half = torch.nn.Linear(512, 512).to(torch.bfloat16)
        self.small = torch.nn.Linear(16, 16)  # too small to pay: left alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x))) + self.small(x[..., :16]).sum()


class Scaled(torch.nn.Linear):  # a subclass computes something else: left alone
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_packed_layers_compute_what_the_layers_compute_and_release_restores_them() -> None:
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(3, 5, 512)
    with torch.inference_mode():
        before = model(x)
        packed = PackedLinears(model, rows_hint=8)
        assert packed.modules == [model.up, model.down]  # float32 and large enough only
        assert packed.bytes == 2 * 512 * 640 * 4
        assert "forward" in model.up.__dict__
        during = model(x)
        torch.testing.assert_close(during, before, rtol=1e-4, atol=1e-4)  # float32 rounding apart
        packed.release()
        assert "forward" not in model.up.__dict__ and packed.modules == [] and packed.bytes == 0
        assert torch.equal(model(x), before)  # the layers' own forward again, bit for bit


def test_a_layer_is_packed_once_and_subclasses_are_left_alone() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), Scaled(512, 512)).eval()
    first = PackedLinears(model, rows_hint=4)
    second = PackedLinears(model, rows_hint=4)  # another engine on the same model object
    assert first.modules == [model[0]] and second.modules == []
    second.release()
    assert "forward" in model[0].__dict__  # the first engine's packing stays until it releases
    first.release()
    assert "forward" not in model[0].__dict__
