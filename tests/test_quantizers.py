"""Reference quantizers: grid properties, exact examples, and bit-exactness against torchao."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torchao.quantization.granularity import PerGroup, PerRow
from torchao.quantization.quant_primitives import (
    MappingType,
    choose_qparams_affine,
    dequantize_affine,
    quantize_affine,
)
from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

from masq_fx.quantizers import (
    ActQuantConfig,
    QuantizedWeight,
    WeightQuantConfig,
    act_scale,
    calibrate_static_scale,
    fake_quant_act,
    fake_quant_weight,
    grid_bounds,
    quantize_weight,
)

EPS = torch.finfo(torch.float32).eps
IN_FEATURES = (8, 16, 24, 32, 48, 64)  # all divisible by the group sizes drawn below


# ----------------------------------------------------------------------------- strategies


def _random_tensor(draw, shape: tuple[int, ...]) -> torch.Tensor:
    """Seeded normal data with a drawn magnitude, optional outlier and zeroed rows."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(shape, generator=gen) * 10.0 ** draw(st.floats(-6, 3))
    if draw(st.booleans()):
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] *= 50.0
    if draw(st.booleans()):
        x.reshape(-1, shape[-1])[0] = 0.0
    return x


@st.composite
def weights(draw, continuous: bool = False) -> torch.Tensor:
    """A float32 weight ``[out, in]``: seeded normal data or (small) hypothesis-drawn floats."""
    shape = (draw(st.integers(1, 6)), draw(st.sampled_from(IN_FEATURES)))
    if continuous or draw(st.booleans()):
        return _random_tensor(draw, shape)
    n = shape[0] * shape[1]
    return torch.tensor(draw(st.lists(st.floats(-1e3, 1e3, width=32), min_size=n, max_size=n))).reshape(shape)


@st.composite
def activations(draw) -> torch.Tensor:
    """Activations ``[*batch, tokens, channels]``."""
    shape = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))) + (
        draw(st.integers(1, 5)),
        draw(st.sampled_from(IN_FEATURES)),
    )
    return _random_tensor(draw, shape)


@st.composite
def weight_configs(draw, clip_search: bool | None = False, grid: str | None = None, symmetric: bool | None = None):
    sym = draw(st.booleans()) if symmetric is None else symmetric
    return WeightQuantConfig(
        bits=draw(st.integers(2, 8)),
        symmetric=sym,
        group_size=draw(st.sampled_from([None, 8, 4])),
        grid=(draw(st.sampled_from(["full", "restricted"])) if sym else "full") if grid is None else grid,
        clip_search=draw(st.booleans()) if clip_search is None else clip_search,
        clip_min=draw(st.sampled_from([0.3, 0.5, 0.9])),
        clip_steps=draw(st.sampled_from([1, 5, 20])),
    )


def act_configs(grid: str | None = None):
    return st.builds(
        ActQuantConfig,
        bits=st.integers(4, 8),
        grid=st.sampled_from(["full", "restricted"]) if grid is None else st.just(grid),
    )


def _expand(qw: QuantizedWeight, t: torch.Tensor) -> torch.Tensor:
    """A per-row/group tensor ``[out, n_groups]`` repeated to the weight's shape ``[out, in]``."""
    return t.float().repeat_interleave(qw.qdata.shape[1] // t.shape[1], dim=1)


# ----------------------------------------------------------------------------- grid and error bound


@given(w=weights(), config=weight_configs(clip_search=None))
def test_weight_codes_in_range_and_dequantize_matches_fake_quant(w, config):
    qw = quantize_weight(w, config)
    qmin, qmax = grid_bounds(config.bits, config.grid)
    n_groups = 1 if config.group_size is None else w.shape[1] // config.group_size
    assert qw.qdata.dtype == torch.int8 and qw.qdata.shape == w.shape
    assert qw.scale.dtype == torch.float32 and qw.scale.shape == (w.shape[0], n_groups)
    assert int(qw.qdata.min()) >= qmin and int(qw.qdata.max()) <= qmax
    assert bool((qw.scale >= EPS).all()) and bool(torch.isfinite(qw.scale).all())
    if config.symmetric:
        assert qw.zero_point is None
    else:
        assert qw.zero_point.dtype == torch.int8 and qw.zero_point.shape == qw.scale.shape
        assert int(qw.zero_point.min()) >= qmin and int(qw.zero_point.max()) <= qmax
    assert torch.equal(qw.dequantize(), fake_quant_weight(w, config))


def _outlier_row() -> torch.Tensor:
    w = torch.zeros(4, 32)
    w[3, 31] = 876.2724  # the edge of the range lands on hi up to float rounding
    return w


@given(w=weights(), config=weight_configs(clip_search=None))
@example(w=_outlier_row(), config=WeightQuantConfig(bits=2, symmetric=True))
def test_weight_error_at_most_half_a_step_inside_the_range(w, config):
    qw = quantize_weight(w, config)
    scale = _expand(qw, qw.scale)
    zp = torch.zeros_like(scale) if qw.zero_point is None else _expand(qw, qw.zero_point)
    # the range's edges, widened by float rounding of scale · code (the same 1e-4 steps as the error bound)
    lo, hi = (config.qmin - zp - 0.5 - 1e-4) * scale, (config.qmax - zp + 0.5 + 1e-4) * scale
    inside = (w >= lo) & (w <= hi)
    if not config.clip_search:  # without clipping the whole data range is representable
        assert bool(inside.all())
    err = (fake_quant_weight(w, config) - w).abs()
    assert bool((err[inside] <= (scale * (0.5 + 1e-4))[inside]).all())


@given(x=activations(), config=act_configs())
def test_act_codes_in_range_and_error_at_most_half_a_step(x, config):
    scale = act_scale(x, config)
    assert scale.shape == x.shape[:-1] + (1,) and scale.dtype == torch.float32
    fq = fake_quant_act(x, config)
    codes = torch.round(fq * (1.0 / scale))
    assert torch.equal(codes * scale, fq)  # fq lies exactly on the grid
    assert int(codes.min()) >= config.qmin and int(codes.max()) <= config.qmax
    assert bool(((fq - x).abs() <= scale * (0.5 + 1e-4)).all())


# ----------------------------------------------------------------------------- idempotence


@given(w=weights(), config=weight_configs(clip_search=None))
def test_fixed_scale_requantization_is_exact_all_weight_modes(w, config):
    """Re-quantizing fake-quant weights with the stored scale/zero point returns the same codes."""
    qw = quantize_weight(w, config)
    scale = _expand(qw, qw.scale)
    zp = torch.zeros_like(scale) if qw.zero_point is None else _expand(qw, qw.zero_point)
    codes = torch.clamp(torch.round(fake_quant_weight(w, config) * (1.0 / scale)) + zp, config.qmin, config.qmax)
    assert torch.equal(codes, qw.qdata.float())


@given(w=weights(), config=weight_configs(grid="restricted", symmetric=True))
def test_restricted_weight_fake_quant_is_idempotent(w, config):
    once = fake_quant_weight(w, config)
    assert torch.equal(fake_quant_weight(once, config), once)
    assert torch.equal(quantize_weight(once, config).qdata, quantize_weight(w, config).qdata)


@given(w=weights(continuous=True), config=weight_configs(symmetric=False))
def test_asymmetric_weight_fake_quant_is_idempotent(w, config):
    """Codes are kept exactly; the re-derived scale may move by an ulp. (Continuous data: exact
    rounding ties, where torchao's asymmetric grid shrinks, have probability zero.)"""
    once = fake_quant_weight(w, config)
    assert torch.equal(quantize_weight(once, config).qdata, quantize_weight(w, config).qdata)
    torch.testing.assert_close(fake_quant_weight(once, config), once, rtol=1e-6, atol=0.0)


@given(x=activations(), config=act_configs(grid="restricted"))
def test_restricted_per_token_fake_quant_is_idempotent(x, config):
    once = fake_quant_act(x, config)
    assert torch.equal(fake_quant_act(once, config), once)


@given(x=activations(), bits=st.integers(2, 8), grid=st.sampled_from(["full", "restricted"]))
def test_static_per_tensor_fake_quant_is_idempotent(x, bits, grid):
    config = ActQuantConfig(bits=bits, granularity="per_tensor", grid=grid)
    scale = calibrate_static_scale(x.abs().amax() * 0.7, config)  # some values get clipped
    once = fake_quant_act(x, config, scale)
    assert torch.equal(fake_quant_act(once, config, scale), once)


def test_full_grid_is_not_idempotent_when_the_scale_is_rederived():
    """torchao's dynamic full grid: amax maps to 127.5 -> 127, so the second pass has a smaller scale."""
    config = ActQuantConfig()
    x = torch.tensor([[1.0, 0.5]])
    once = fake_quant_act(x, config)
    torch.testing.assert_close(once, torch.tensor([[127.0, 64.0]]) / 127.5, rtol=0, atol=1e-7)
    torch.testing.assert_close(act_scale(once, config), torch.tensor([[127.0 / 127.5**2]]))
    assert not torch.equal(fake_quant_act(once, config), once)


# ----------------------------------------------------------------------------- exact examples


def test_exact_int8_per_token_rounds_half_to_even_and_clamps():
    x = torch.tensor([[127.5, 2.5, 3.5, -2.5, -0.5]])  # amax 127.5 -> scale exactly 1
    config = ActQuantConfig()
    assert torch.equal(act_scale(x, config), torch.tensor([[1.0]]))
    assert torch.equal(fake_quant_act(x, config), torch.tensor([[127.0, 2.0, 4.0, -2.0, -0.0]]))
    restricted = ActQuantConfig(grid="restricted")  # scale = 127.5 / 127
    assert torch.equal(act_scale(x, restricted), torch.tensor([[127.5 / 127]]))


def test_exact_asymmetric_two_bit_weight():
    qw = quantize_weight(torch.tensor([[-1.0, 0.0, 3.0]]), WeightQuantConfig(bits=2, symmetric=False))
    # qmin=-2, qmax=1; scale = (3 - (-1)) / 3; zero_point = -2 - round(-0.75) = -1
    torch.testing.assert_close(qw.scale, torch.tensor([[4.0 / 3.0]]))
    assert torch.equal(qw.zero_point, torch.tensor([[-1]], dtype=torch.int8))
    assert torch.equal(qw.qdata, torch.tensor([[-2, -1, 1]], dtype=torch.int8))
    torch.testing.assert_close(qw.dequantize(), torch.tensor([[-4.0 / 3.0, 0.0, 8.0 / 3.0]]))


def test_exact_restricted_weight_grid():
    qw = quantize_weight(torch.tensor([[1.0, 0.5, -1.0]]), WeightQuantConfig(grid="restricted"))
    assert torch.equal(qw.scale, torch.tensor([[1.0 / 127]]))
    assert torch.equal(qw.qdata, torch.tensor([[127, 64, -127]], dtype=torch.int8))  # 63.5 -> 64


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_rows_give_zeros_without_nan(symmetric):
    w = torch.zeros(3, 16, requires_grad=True)
    config = WeightQuantConfig(symmetric=symmetric, group_size=8, clip_search=True)
    out = fake_quant_weight(w, config)
    assert torch.equal(out, torch.zeros(3, 16))
    out.sum().backward()
    assert bool(torch.isfinite(w.grad).all())
    assert torch.equal(quantize_weight(w, config).scale, torch.full((3, 2), EPS))
    assert torch.equal(fake_quant_act(torch.zeros(2, 8), ActQuantConfig()), torch.zeros(2, 8))


def test_bf16_is_computed_in_float32_and_returned_in_bf16():
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(8, 32, generator=gen).bfloat16(), torch.randn(4, 32, generator=gen).bfloat16()
    config = WeightQuantConfig(bits=4, group_size=8)
    out = fake_quant_weight(w, config)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, fake_quant_weight(w.float(), config).bfloat16())
    assert torch.equal(quantize_weight(w, config).dequantize(), out)
    assert torch.equal(fake_quant_act(x, ActQuantConfig()), fake_quant_act(x.float(), ActQuantConfig()).bfloat16())


# ----------------------------------------------------------------------------- torchao bit-exactness


@given(w=weights(), config=weight_configs())
def test_weights_match_torchao_primitives_bit_for_bit(w, config):
    """All bit widths, grids (restricted = quant_min -(2^(b-1)-1)), groups, symmetric and asymmetric."""
    qw = quantize_weight(w, config)
    block = (1, w.shape[1] if config.group_size is None else config.group_size)
    mapping = MappingType.SYMMETRIC if config.symmetric else MappingType.ASYMMETRIC
    scale, zp = choose_qparams_affine(
        w, mapping, block, torch.int8, config.qmin, config.qmax,
        eps=EPS, scale_dtype=torch.float32, zero_point_dtype=torch.int8, keepdim=True,
    )  # fmt: skip
    if config.symmetric:  # torchao's symmetric zero point is all zeros
        assert not bool(zp.any())
    qdata = quantize_affine(w, block, scale, zp, torch.int8, config.qmin, config.qmax)
    assert torch.equal(qw.qdata, qdata) and torch.equal(qw.scale, scale)
    if not config.symmetric:
        assert torch.equal(qw.zero_point, zp)
    deq = dequantize_affine(qdata, block, scale, zp, torch.int8, config.qmin, config.qmax, output_dtype=torch.float32)
    assert torch.equal(qw.dequantize(), deq)


@given(w=weights(), group=st.sampled_from([None, 8]), bf16=st.booleans())
def test_int8_weights_match_torchao_int8_tensor(w, group, bf16):
    """``Int8Tensor.from_hp`` (PerRow / PerGroup); bf16 weights are upcast first (see module doc)."""
    w = w.bfloat16() if bf16 else w
    qw = quantize_weight(w, WeightQuantConfig(group_size=group))
    ref = Int8Tensor.from_hp(w.float(), PerRow() if group is None else PerGroup(group))
    assert torch.equal(qw.qdata, ref.qdata) and torch.equal(qw.scale, ref.scale)
    assert torch.equal(qw.dequantize(), ref.dequantize().to(w.dtype))


@given(x=activations())
def test_int8_per_token_activations_match_torchao(x):
    config = ActQuantConfig()
    ref = Int8Tensor.from_hp(x, PerRow())
    assert torch.equal(act_scale(x, config), ref.scale)
    assert torch.equal(torch.round(fake_quant_act(x, config) * (1.0 / ref.scale)).to(torch.int8), ref.qdata)
    assert torch.equal(fake_quant_act(x, config), ref.dequantize())


# ----------------------------------------------------------------------------- gradients


@given(x=activations(), config=act_configs())
def test_act_ste_gradient_is_finite_and_nonzero(x, config):
    x = x.clone().requires_grad_(True)
    fake_quant_act(x, config).sum().backward()
    assert bool(torch.isfinite(x.grad).all()) and bool((x.grad != 0).any())


@given(w=weights(), config=weight_configs(clip_search=None))
def test_weight_fake_quant_gives_finite_gradients(w, config):
    w = w.clone().requires_grad_(True)
    out = fake_quant_weight(w, config)
    out.pow(2).sum().backward()
    assert w.grad is not None and bool(torch.isfinite(w.grad).all())
    if bool((out != 0).any()):
        assert bool((w.grad != 0).any())


def test_weight_gradient_flows_through_the_scale():
    """w = [1.0, 0.3], int8: q = [127 (clamped from 128), 38]; d sum/d scale = 127 + (38 - 38.25)."""
    w = torch.tensor([[1.0, 0.3]], requires_grad=True)
    fake_quant_weight(w, WeightQuantConfig()).sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor([[126.75 / 127.5, 1.0]]))


# ----------------------------------------------------------------------------- clipping search


@given(w=weights(), config=weight_configs(clip_search=True))
def test_clip_search_never_increases_the_mse(w, config):
    no_clip = WeightQuantConfig(config.bits, config.symmetric, config.group_size, config.grid)
    g = w.shape[1] if config.group_size is None else config.group_size

    def mse(out):
        return (out - w).pow(2).reshape(w.shape[0], -1, g).mean(-1)

    clipped, plain = mse(fake_quant_weight(w, config)), mse(fake_quant_weight(w, no_clip))
    assert bool((clipped <= plain).all())


def test_clip_search_helps_on_gaussian_weights_at_three_bits():
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    err_clip = (fake_quant_weight(w, WeightQuantConfig(bits=3, clip_search=True)) - w).pow(2).mean()
    err_plain = (fake_quant_weight(w, WeightQuantConfig(bits=3)) - w).pow(2).mean()
    assert err_clip < 0.7 * err_plain  # measured ratio about 0.59


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: WeightQuantConfig(bits=1), r"bits must be an int in \[2, 8\], got 1"),
        (lambda: WeightQuantConfig(bits=9), r"bits must be an int in \[2, 8\], got 9"),
        (lambda: WeightQuantConfig(bits=True), r"bits"),
        (lambda: WeightQuantConfig(group_size=0), r"group_size must be a positive int or None"),
        (lambda: WeightQuantConfig(symmetric=False, grid="restricted"), r"restricted.*symmetric=True"),
        (lambda: WeightQuantConfig(grid="narrow"), r"grid must be 'full' or 'restricted'"),
        (lambda: WeightQuantConfig(clip_min=0.0), r"clip_min must be in \(0, 1\]"),
        (lambda: WeightQuantConfig(clip_steps=0), r"clip_steps"),
        (lambda: ActQuantConfig(bits=3), r"bits must be an int in \[4, 8\], got 3.*per-token"),
        (lambda: ActQuantConfig(bits=9, granularity="per_tensor"), r"bits must be an int in \[2, 8\]"),
        (lambda: ActQuantConfig(granularity="per_channel"), r"granularity must be 'per_token' or 'per_tensor'"),
        (lambda: ActQuantConfig(grid="narrow"), r"grid must be"),
    ],
)
def test_config_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match=r"group_size=24 does not divide in_features=64.*\[4, 8, 16, 32\]"):
        quantize_weight(torch.randn(2, 64), WeightQuantConfig(group_size=24))
    with pytest.raises(ValueError, match=r"group_size=24 does not divide in_features=64"):
        fake_quant_weight(torch.randn(2, 64), WeightQuantConfig(group_size=24))
    with pytest.raises(ValueError, match=r"2-D"):
        quantize_weight(torch.randn(64), WeightQuantConfig())


def test_per_tensor_needs_a_static_scale():
    config = ActQuantConfig(granularity="per_tensor")
    with pytest.raises(ValueError, match=r"per_tensor.*static_scale.*calibrate_static_scale"):
        fake_quant_act(torch.randn(2, 8), config)
    with pytest.raises(ValueError, match=r"only used with granularity='per_tensor'"):
        fake_quant_act(torch.randn(2, 8), ActQuantConfig(), torch.tensor(0.1))
    with pytest.raises(ValueError, match=r"absmax must be finite and >= 0"):
        calibrate_static_scale(-1.0, config)
    assert torch.equal(calibrate_static_scale(127.5, config), torch.tensor(1.0))
    assert torch.equal(calibrate_static_scale(0.0, config), torch.tensor(EPS))
