"""Learned weight clipping: the quantizer's ratio argument, QuantLinear's clip table, MAS learning it,
and GPTQ keeping the learned ranges."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import CalibratedTiny, calibrated_tiny
from hypothesis import given, settings
from hypothesis import strategies as st

from masq_fx.nn.quant_linear import QuantLinear
from masq_fx.pipeline import Pipeline
from masq_fx.quantizers import WeightQuantConfig, fake_quant_weight, quantize_weight
from masq_fx.recipes import MASLearningConfig, preset
from masq_fx.transforms import quant_linears
from masq_fx.transforms.gptq import GPTQConfig, GPTQWeights, gptq_codes

pytestmark = pytest.mark.usefixtures("one_thread")

LWC = MASLearningConfig(epochs=2, learn_clipping=True)


@pytest.fixture(scope="module")
def omni() -> CalibratedTiny:
    return calibrated_tiny("qwen2.5-omni-thinker")


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    group=st.sampled_from([None, 4, 8]),
    low=st.floats(0.05, 1.0),
)
def test_clip_ratio_shrinks_each_range_and_the_codes_stay_on_the_grid(seed, bits, symmetric, group, low):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 16, generator=gen) * torch.rand(5, 1, generator=gen).mul(3).exp()
    config = WeightQuantConfig(bits=bits, symmetric=symmetric, group_size=group)
    groups = 1 if group is None else 16 // group
    ratio = low + (1 - low) * torch.rand(5, groups, generator=gen)
    # ratio 1 is the plain quantizer, bit for bit
    assert torch.equal(fake_quant_weight(w, config, torch.ones(5, groups)), fake_quant_weight(w, config))
    qw = quantize_weight(w, config, ratio)
    assert int(qw.qdata.min()) >= config.qmin and int(qw.qdata.max()) <= config.qmax
    assert torch.equal(qw.dequantize(), fake_quant_weight(w, config, ratio))
    if symmetric:  # the scale is the shrunk range over the grid's half width, and values the grid
        # covers are rounded to the nearest step: off by at most half a step
        wg = w.reshape(5, groups, -1)
        expected = wg.abs().amax(-1) * ratio / ((config.qmax - config.qmin) / 2)
        torch.testing.assert_close(qw.scale, expected.clamp_min(torch.finfo(torch.float32).eps))
        step = qw.scale.unsqueeze(-1).expand_as(wg)
        covered = wg.abs() <= step * config.qmax
        error = (qw.dequantize().reshape(wg.shape) - wg).abs()
        assert bool((error[covered] <= step[covered] * (0.5 + 1e-5)).all())


def test_clip_ratio_is_differentiable_and_checked():
    w = torch.randn(4, 8)
    ratio = torch.full((4, 1), 0.8, requires_grad=True)
    fake_quant_weight(w, WeightQuantConfig(bits=3), ratio).pow(2).sum().backward()
    assert ratio.grad is not None and bool(torch.isfinite(ratio.grad).all()) and bool((ratio.grad != 0).any())
    with pytest.raises(ValueError, match=r"clip ratio must be \[out_features, n_groups\] = \[4, 1\]"):
        quantize_weight(w, WeightQuantConfig(bits=3), torch.ones(4, 2))


def test_quant_linear_clip_table_feeds_its_weights_and_codes():
    gen = torch.Generator().manual_seed(0)
    linear = QuantLinear(torch.randn(6, 16, generator=gen), None, "lin")
    with pytest.raises(ValueError, match="no weight quantizer"):
        linear.learn_clipping()
    linear.set_quantizers(weight=WeightQuantConfig(bits=4, group_size=8))
    linear.set_scales(torch.rand(3, 16, generator=gen) + 0.5, torch.tensor([0, 1, 2]))
    ratios = linear.learn_clipping()
    assert ratios.shape == (3, 6, 2) and bool((ratios == 1).all()) and linear.learn_clipping() is ratios  # reused
    plain = fake_quant_weight(linear.weight * linear.scales[0], linear.weight_quant)
    assert torch.equal(linear.quantized_weight(0), plain)  # ratio 1 is the plain quantizer
    with torch.no_grad():
        ratios[1] = 0.5 + 0.5 * torch.rand(6, 2, generator=gen)
    for row in range(3):
        ratio = ratios[row].detach()
        expected = fake_quant_weight(linear.weight * linear.scales[row], linear.weight_quant, ratio)
        torch.testing.assert_close(linear.quantized_weight(row), expected, rtol=0, atol=0)
        assert torch.equal(linear.weight_codes(row).dequantize(), linear.quantized_weight(row).detach())
    # gradients reach the clip logits through the forward
    linear(torch.randn(2, 5, 16, generator=gen), torch.tensor([[0, 1, 2, 1, 0]] * 2)).sum().backward()
    assert ratios.grad is not None and bool((ratios.grad[1] != 0).any())
    # new scales drop the clipping learned for the old ones; solved weights refuse new clipping
    linear.set_scales(linear.scales.detach() * 2, torch.tensor([0, 1, 2]))
    assert linear.clip_ratios is None and linear.clip_ratio(0) is None
    linear.set_solved({r: quantize_weight(linear.weight * linear.scales[r], linear.weight_quant) for r in range(3)})
    with pytest.raises(ValueError, match="learn clipping before solving"):
        linear.learn_clipping()


def test_mas_learns_clipping_ratios_in_bounds_without_losing_accuracy(omni):
    plain = omni.transformed(replace(preset("mas", 4, 8), learning=replace(LWC, learn_clipping=False)))
    clipped_recipe = replace(preset("mas", 4, 8), learning=LWC)
    clipped = omni.transformed(clipped_recipe)
    modules = list(quant_linears(clipped.graph_module))
    assert modules and all(m.clip_ratios is not None and not m.clip_ratios.requires_grad for m in modules)
    ratios = torch.cat([m.clip_ratios.flatten() for m in modules])
    assert bool((ratios >= LWC.min_clip_ratio).all() and (ratios <= 1).all())
    assert float(ratios.min()) < 0.99, "ratios never moved"
    for m in modules:  # the frozen weights are the clipped ones
        for row in m.stored_rows():
            assert torch.equal(m.cached_weights[row], m.quantized_weight(row))
    # the model's output is no further from the float one than MAS without clipping, on the calibration batch
    with torch.no_grad():
        err_plain = (plain.captured(omni.inputs) - omni.fp).abs().mean()
        err_clipped = (clipped.captured(omni.inputs) - omni.fp).abs().mean()
    assert err_clipped <= err_plain * 1.02, (float(err_clipped), float(err_plain))


def test_gptq_keeps_the_learned_ranges(omni):
    context = omni.transformed(replace(preset("mas", 4, 8), learning=LWC))
    rounded = {m.name: m.weight_codes(0) for m in quant_linears(context.graph_module)}
    Pipeline([GPTQWeights(GPTQConfig(), progress=False)]).run(context, progress=False)
    for module in quant_linears(context.graph_module):
        rtn = rounded[module.name]
        solved = module.weight_codes(0)
        torch.testing.assert_close(solved.scale, rtn.scale)  # per-channel scales of the clipped ranges
        assert not torch.equal(solved.qdata, rtn.qdata)


def test_gptq_codes_with_ratio_one_are_plain_gptq():
    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(6, 16, generator=gen), torch.randn(40, 16, generator=gen)
    config = WeightQuantConfig(bits=4, group_size=8)
    plain = gptq_codes(w, (x.T @ x).double(), config, GPTQConfig())
    ones = gptq_codes(w, (x.T @ x).double(), config, GPTQConfig(), torch.ones(6, 2))
    assert torch.equal(plain.qdata, ones.qdata) and torch.equal(plain.scale, ones.scale)
