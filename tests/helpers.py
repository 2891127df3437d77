"""Small helpers shared by the test modules."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import fx, nn

from masq_fx.calibration.calibrate import observe
from masq_fx.capture.decoder import CapturedDecoder, capture
from masq_fx.modality import Modality
from masq_fx.models import DecoderInputs, adapter_for
from masq_fx.models.tiny import tiny_model
from masq_fx.nn.quant_linear import QuantLinear
from masq_fx.pipeline import Context, Pipeline
from masq_fx.recipes import Recipe, recipe_steps


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


def record_quant_linear_calls(gm: fx.GraphModule, inputs) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Module name → (x, modality_ids, y) of every QuantLinear call in one forward of ``gm`` on ``inputs``."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out: seen.__setitem__(mod.name, (*args, out)))
        for m in gm.modules()
        if isinstance(m, QuantLinear)
    ]
    try:
        with torch.no_grad():
            gm(*inputs.args())
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@dataclass
class CalibratedTiny:
    """A tiny model, its pristine capture, one calibrated batch and the float logits."""

    model: nn.Module
    captured: CapturedDecoder  # pristine: tests transform deep copies
    inputs: DecoderInputs
    stats: dict
    fp: torch.Tensor

    def transformed(self, recipe: Recipe, extra: tuple = ()) -> Context:
        """A deep copy of the capture, transformed by ``recipe`` (then ``extra`` steps)."""
        context = Context(copy.deepcopy(self.captured), [self.inputs], stats=self.stats, provided={"stats"})
        return Pipeline([*recipe_steps(recipe, progress=False), *extra]).run(context, progress=False)


def calibrated_tiny(family: str) -> CalibratedTiny:
    """:class:`CalibratedTiny` of ``family`` with statistics (second moments included) of its example batch."""
    tiny = tiny_model(family, seed=0, batch_size=2)
    inputs = adapter_for(tiny.model).decoder_inputs(tiny.batch)
    captured = capture(tiny.model)
    stats = observe(Context(captured, [inputs]), moment_modalities=tuple(Modality), progress=False).stats
    with torch.no_grad():
        fp = captured(inputs)
    return CalibratedTiny(tiny.model, captured, inputs, stats, fp)
