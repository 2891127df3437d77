"""MAS learned under CMC's own-channel constraint (``MASLearningConfig.own_channels_in_loop``).

The constraint is a parametrization of each scale table, ``s_m = where(own_m, s_m, s_t)`` for every
non-text row ``m``: the tied gradient must be the chain rule through it, the learned rows must differ
from text's on at most ``k`` channels, and the projection CMC runs afterwards must keep them.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from helpers import CalibratedTiny, calibrated_tiny
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from masq_fx.modality import Modality
from masq_fx.pipeline import Context, Pipeline
from masq_fx.recipes import Recipe, preset, recipe_steps
from masq_fx.transforms import quant_linears
from masq_fx.transforms.cmc import CMCConfig, ProjectScales
from masq_fx.transforms.mas import LearnMAS, MASLearningConfig, _TiedRows

pytestmark = pytest.mark.usefixtures("one_thread")

KEEP = 2
CMC = CMCConfig(rank=KEEP, own_channels="rank")
TIED = replace(
    preset("mas", 4, 8),
    learning=MASLearningConfig(epochs=3, own_channels_in_loop=True),
    cmc=CMC,
)


@pytest.fixture(scope="module")
def omni() -> CalibratedTiny:
    return calibrated_tiny("qwen2.5-omni-thinker")


@settings(max_examples=40)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(2, 3), text_row=st.integers(0, 2), channels=st.integers(1, 9))
def test_tied_gradient_is_the_chain_rule_through_the_parametrization(seed, rows, text_row, channels):
    gen = torch.Generator().manual_seed(seed)
    text_row %= rows
    masks = {r: torch.rand(channels, generator=gen) < 0.4 for r in range(rows) if r != text_row}
    table = nn.Parameter(torch.rand(rows, channels, generator=gen, dtype=torch.float64) + 0.5)
    tied = _TiedRows(table, text_row, masks)
    tied.project()
    weights = torch.randn(rows, channels, generator=gen, dtype=torch.float64)

    def loss(scales: torch.Tensor) -> torch.Tensor:
        return (weights * scales.square()).sum()

    # the parametrized loss: every tied entry reads text's
    free = table.detach().clone().requires_grad_(True)
    rows_of = [torch.where(masks[r], free[r], free[text_row]) if r in masks else free[r] for r in range(rows)]
    (expected,) = torch.autograd.grad(loss(torch.stack(rows_of)), free)
    # the table's own gradient (entries independent), tied by the hook
    (independent,) = torch.autograd.grad(loss(table), table)
    torch.testing.assert_close(tied.tie_gradient(independent), expected, rtol=1e-12, atol=1e-12)
    for r, own in masks.items():
        assert torch.equal(table[r][~own], table[text_row][~own])


def _tied_context(omni: CalibratedTiny, recipe: Recipe) -> tuple[Context, LearnMAS]:
    context = Context(copy.deepcopy(omni.captured), [omni.inputs], stats=omni.stats, provided={"stats"})
    steps = recipe_steps(recipe, progress=False)
    learn = next(s for s in steps if isinstance(s, LearnMAS))
    Pipeline(steps[: steps.index(learn) + 1]).run(context, progress=False)
    return context, learn


def test_learned_rows_differ_from_text_on_at_most_k_channels_and_projection_keeps_them(omni):
    context, learn = _tied_context(omni, TIED)
    assert learn.losses and any(last < first for first, last in learn.losses.values()), learn.losses
    free, _ = _tied_context(omni, replace(TIED, learning=replace(TIED.learning, own_channels_in_loop=False)))
    tables = {}
    for module in quant_linears(context.graph_module):
        if module.scales is None or module.scales.shape[0] < 2:
            continue
        scales = module.scales.detach()
        text = scales[int(module.row_of_modality[Modality.TEXT])]
        for row in range(scales.shape[0]):
            assert int((scales[row] != text).sum()) <= KEEP
        tables[module.name] = scales.clone()
    assert len(tables) == 12
    # without the tie, learning moves (almost) every channel of the non-text rows
    free_scales = {m.name: m.scales.detach() for m in quant_linears(free.graph_module) if m.name in tables}
    assert any(int((s[1] != s[0]).sum()) > KEEP for s in free_scales.values())
    Pipeline([ProjectScales(CMC)]).run(context, progress=False)
    for module in quant_linears(context.graph_module):
        if module.name in tables:
            assert torch.equal(module.scales.detach(), tables[module.name])


def test_the_tie_needs_a_cmc_with_own_channels(omni):
    with pytest.raises(ValueError, match="set cmc.own_channels"):
        replace(TIED, cmc=CMCConfig(rank=KEEP))
    assert "+tied" in TIED.label
    context = Context(copy.deepcopy(omni.captured), [omni.inputs], stats=omni.stats, provided={"stats"})
    steps = recipe_steps(TIED, progress=False)
    learn = next(s for s in steps if isinstance(s, LearnMAS))
    steps[steps.index(learn)] = LearnMAS(TIED.learning, progress=False)
    with pytest.raises(ValueError, match=r"LearnMAS\(cmc=CMCConfig"):
        Pipeline(steps).run(context, progress=False)


def test_an_interrupted_layer_leaves_no_hook_and_no_grad_on_the_scales(omni, monkeypatch):
    def interrupt(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(LearnMAS, "_optimise", interrupt)
    context = Context(copy.deepcopy(omni.captured), [omni.inputs], stats=omni.stats, provided={"stats"})
    with pytest.raises(KeyboardInterrupt):
        Pipeline(recipe_steps(TIED, progress=False)).run(context, progress=False)
    tables = [m.scales for m in quant_linears(context.graph_module) if m.scales is not None]
    assert tables and not any(t.requires_grad or t._backward_hooks for t in tables)
