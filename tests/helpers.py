"""Small helpers shared by the test modules."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from masq_fx.quant_linear import QuantLinear


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and far faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Wrap(nn.Module):
    def __init__(self, linear: QuantLinear) -> None:
        super().__init__()
        self.lin = linear

    def forward(self, x, modality_ids):
        return self.lin(x, modality_ids)


class _QuantLinearLeaf(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantLinear) or super().is_leaf_module(m, qualname)


def graph_of(linear: QuantLinear) -> fx.GraphModule:
    """A GraphModule whose only node calls ``linear`` (what graph transforms iterate over)."""
    wrap = _Wrap(linear)
    return fx.GraphModule(wrap, _QuantLinearLeaf().trace(wrap))
