"""Small helpers shared by the test modules."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from torch import fx, nn

from masq_fx.api import Calibrated, calibrate
from masq_fx.capture import CapturedDecoder
from masq_fx.capture.decoder import capture
from masq_fx.modality import Modality
from masq_fx.models import DecoderInputs, adapter_for
from masq_fx.models.tiny import tiny_model
from masq_fx.nn.quant_linear import QuantLinear
from masq_fx.pipeline import Context, Pipeline
from masq_fx.recipes import Recipe, recipe_steps

#: W8A8's relative logit error bound on the tiny Gemma 4 models: their attention takes q·k of unit-RMS heads with no
#: 1/√d (QK norms, scaling 1), so the random weights' softmax is sharp and amplifies q/k quantization error (12-13%
#: on ``gemma4-text``, 1-3% on the other families)
GEMMA4_ERROR = 0.2


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
    """A tiny model calibrated once on its example batch (second moments of every modality), and the float logits."""

    model: nn.Module
    calibrated: Calibrated
    fp: torch.Tensor

    @property
    def captured(self) -> CapturedDecoder:
        """The pristine float capture (tests transform copies)."""
        return self.calibrated.captured

    @property
    def inputs(self) -> DecoderInputs:
        return self.calibrated.samples[0]

    @property
    def stats(self) -> dict:
        return self.calibrated.stats

    def transformed(self, recipe: Recipe, extra: tuple = ()) -> Context:
        """A copy of the capture, transformed by ``recipe`` (then ``extra`` steps)."""
        return Pipeline([*recipe_steps(recipe, progress=False), *extra]).run(self.calibrated.context(), progress=False)


def calibrated_tiny(family: str) -> CalibratedTiny:
    """:class:`CalibratedTiny` of ``family``."""
    tiny = tiny_model(family, seed=0, batch_size=2)
    calibrated = calibrate(tiny.model, [tiny.batch], progress=False, moment_modalities=tuple(Modality))
    with torch.no_grad():
        fp = calibrated.captured(calibrated.samples[0])
    return CalibratedTiny(tiny.model, calibrated, fp)


def prefix_greedy(graph, adapter, prompt: DecoderInputs, steps: int) -> torch.Tensor:
    """Greedy tokens by re-running the whole prefix through a cache-free graph (the reference loop)."""
    inputs, out = prompt, []
    for _ in range(steps):
        with torch.no_grad():
            token = graph(inputs)[:, -1].argmax(-1)
        out.append(token)
        inputs = DecoderInputs(
            inputs_embeds=torch.cat([inputs.inputs_embeds, adapter.embed(token[:, None])], dim=1),
            position_ids=torch.cat([inputs.position_ids, inputs.position_ids[..., -1:] + 1], dim=-1),
            modality_ids=torch.cat([inputs.modality_ids, torch.zeros_like(token[:, None])], dim=1),
            attention_mask=torch.cat([inputs.attention_mask, torch.ones_like(token[:, None])], dim=1),
        )
    return torch.stack(out, dim=1)


@functools.cache
def float_family(family: str) -> tuple:
    """A tiny family's (TinyModel with a float32 model, its capture, mixed-modality decoder inputs, float logits)."""
    tiny = tiny_model(family, seed=0, batch_size=2)
    tiny.model.float()
    captured = capture(tiny.model)
    inputs = adapter_for(tiny.model).decoder_inputs(tiny.batch)
    with torch.no_grad():
        return tiny, captured, inputs, captured(inputs)
