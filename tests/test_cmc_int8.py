"""CMC branches with integer factors (``CMCConfig.factor_bits``): reference numerics, int8 kernels, checkpoints.

Graph-level checks run on deep copies of one captured tiny Qwen2.5-Omni thinker (text + image +
audio) quantized with MAS-init W4A8 + CMC rank 4; module-level properties on random QuantLinears
(hypothesis).

Tolerances, reference (QuantLinear) vs lowered (Int8QuantLinear), measured values in the comments:

* the factors' codes and scales are the reference's, bit for bit; the hidden quantizer
  ``fake_quant_hidden`` equals torchao's ``SYMMETRIC_NO_CLIPPING_ERR`` quantization bit for bit;
* the hidden ``h = Q_8(x̃)·Q_b(L)`` is a float32 GEMM in the reference and an int8 GEMM rescaled in
  the kernels: rounded differently, so once in a while (measured: 1 code in 2·10⁵ on random
  576 → 256 rank-16 linears) one of its codes differs by one step. Tokens without such a flip agree
  within ``1e-5 · max|y|`` (measured ≤ 3.5e-7), as the main GEMM does (``tests/test_backend_int8.py``);
* end to end, logits within ``2e-2 · max|logit|`` (measured 3.1e-3 eager, 5.9e-3 compiled), the
  deviation's norm below the quantization error's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import CalibratedTiny, calibrated_tiny, record_quant_linear_calls
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters
from torchao.quantization.quantize_.common import _choose_quant_func_and_quantize_tensor

from masq_fx.backends import Int8QuantLinear, compile_graph, lower_to_torchao, unsupported_reason
from masq_fx.backends.torchao_int8 import _INT8_HIDDEN
from masq_fx.checkpoint import linear_bytes, load, read_manifest, save
from masq_fx.modality import NUM_MODALITIES, Modality
from masq_fx.nn.quant_linear import BRANCH_ACT, QuantLinear, fake_quant_hidden
from masq_fx.pipeline import Context
from masq_fx.quantizers import ActQuantConfig, QuantizedWeight, WeightQuantConfig, fake_quant_act, quantize_weight
from masq_fx.recipes import Recipe, preset
from masq_fx.transforms import quant_linears
from masq_fx.transforms.cmc import CMCConfig

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE_RTOL = 1e-5
LOGIT_RTOL = 2e-2
INT8_CMC = replace(preset("mas-init", 4, 8), cmc=CMCConfig(rank=4, factor_bits=8))
FLOAT_CMC = replace(preset("mas-init", 4, 8), cmc=CMCConfig(rank=4))
_QLINEAR = "qlinear_weight_prepack_matcher_count"


# ----------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def omni() -> CalibratedTiny:
    return calibrated_tiny("qwen2.5-omni-thinker")


@pytest.fixture(scope="module")
def int8_cmc(omni) -> Context:
    """The tiny model with 8-bit CMC factors (do not modify: copy)."""
    return omni.transformed(INT8_CMC)


def _compensated(gm: torch.fx.GraphModule) -> list[QuantLinear]:
    return [m for m in quant_linears(gm) if m.branches]


def _without_branches(module: QuantLinear) -> QuantLinear:
    stripped = copy.deepcopy(module)
    stripped.branches, stripped.branch_codes = {}, {}
    return stripped


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("bits", [0, 1, 9, 16, True, 8.0, "8"])
def test_factor_bits_outside_two_to_eight_are_refused(bits):
    with pytest.raises(ValueError, match=r"factor_bits must be None \(float32 factors\) or an int in \[2, 8\]"):
        CMCConfig(factor_bits=bits)


def test_integer_factors_refuse_a_quantized_branch_input():
    with pytest.raises(ValueError, match="quantized twice: use branch_input='smoothed'"):
        CMCConfig(factor_bits=8, branch_input="quantized")


def test_float_factors_are_the_default_and_the_option_round_trips_through_recipes():
    assert CMCConfig().factor_bits is None
    assert {CMCConfig(factor_bits=b).factor_bits for b in range(2, 9)} == set(range(2, 9))
    data = json.loads(json.dumps(INT8_CMC.to_dict()))
    assert Recipe.from_dict(data) == INT8_CMC
    del data["cmc"]["factor_bits"]  # a recipe written before the option existed
    assert Recipe.from_dict(data).cmc.factor_bits is None


# ----------------------------------------------------------------------------- quantizers


@settings(max_examples=40)
@given(
    seed=st.integers(0, 2**31 - 1),
    tokens=st.integers(1, 9),
    rank=st.integers(2, 64),  # torchao fails on one column (the backend pads a single rank column)
    log_spread=st.floats(-8.0, 8.0),
    sign=st.sampled_from(["mixed", "positive", "negative"]),
)
def test_hidden_quantizer_is_torchaos_no_clipping_error_quantization(seed, tokens, rank, log_spread, sign):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(2, tokens, rank, generator=gen) * 2.0**log_spread
    h = {"mixed": h, "positive": h.abs(), "negative": -h.abs()}[sign]
    h[0, 0] = 0.0  # a token of another modality: masked to zeros
    expected = _choose_quant_func_and_quantize_tensor(h, _INT8_HIDDEN).dequantize()
    assert torch.equal(fake_quant_hidden(h), expected)


@settings(max_examples=40)
@given(seed=st.integers(0, 2**31 - 1), rank=st.integers(1, 64), ulps=st.integers(-4, 4))
def test_the_value_setting_each_tokens_hidden_scale_lands_exactly_on_a_code(seed, rank, ulps):
    """Why the hidden is not quantized as the activations are: there ``max|h|`` maps to ±127.5, a tie
    that float rounding breaks either way; here the minimum maps to -128 or the maximum to 127
    (whichever needs the larger scale), whatever the last bits."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(5, rank, generator=gen) * (1.0 + ulps * 2.0**-23)
    q = fake_quant_hidden(h)
    low, high = h.amin(-1).clamp(max=0) / -128, h.amax(-1).clamp(min=0) / 127
    by_min = low > high
    setter = torch.where(by_min, h.argmin(-1), h.argmax(-1))[:, None]
    codes = q.gather(-1, setter)[:, 0] / torch.where(by_min, low, high)
    assert torch.equal(codes.round(), torch.where(by_min, -128.0, 127.0))


# ----------------------------------------------------------------------------- QuantLinear state


def _module(seed: int, rows: int = 3, d_in: int = 48, d_out: int = 40) -> tuple[QuantLinear, torch.Generator]:
    gen = torch.Generator().manual_seed(seed)
    module = QuantLinear(torch.randn(d_out, d_in, generator=gen), None, "lin")
    module.set_scales(torch.exp(torch.randn(rows, d_in, generator=gen)), torch.tensor([r % rows for r in range(3)]))
    module.set_quantizers(weight=WeightQuantConfig(bits=4), activation=ActQuantConfig())
    module.use_text_weight()
    return module, gen


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_set_branch_stores_the_factors_as_codes_per_rank_column_and_output_channel(bits):
    module, gen = _module(0)
    left, right = torch.randn(48, 5, generator=gen), torch.randn(5, 40, generator=gen)
    module.set_branch(1, left.double(), right.double(), bits=bits)
    left_t, right_t = module.branch_codes[1]
    config = WeightQuantConfig(bits=bits)
    expected_left, expected_right = quantize_weight(left.T, config), quantize_weight(right.T, config)
    assert torch.equal(left_t.qdata, expected_left.qdata) and torch.equal(left_t.scale, expected_left.scale)
    assert torch.equal(right_t.qdata, expected_right.qdata) and torch.equal(right_t.scale, expected_right.scale)
    assert left_t.scale.shape == (5, 1) and right_t.scale.shape == (40, 1)
    assert torch.equal(module.branches[1][0], expected_left.dequantize().T)
    assert torch.equal(module.branches[1][1], expected_right.dequantize().T)
    assert module.branch_bits == bits and f"branch_bits={bits}" in repr(module)
    module.set_scales(module.scales.detach().clone(), module.row_of_modality)  # new scales drop the branches
    assert not module.branches and not module.branch_codes and module.branch_bits is None


def test_branch_formats_cannot_be_mixed_within_a_linear():
    module, gen = _module(1)
    factors = torch.randn(48, 3, generator=gen), torch.randn(3, 40, generator=gen)
    module.set_branch(1, *factors, bits=8)
    with pytest.raises(ValueError, match=r"share one format; rows \[1\] have 8-bit factors, row 2 would have float"):
        module.set_branch(2, *factors)
    with pytest.raises(ValueError, match=r"rows \[1\] have 8-bit factors, row 2 would have 4-bit"):
        module.set_branch(2, *factors, bits=4)
    module.set_branch(1, *factors)  # replacing the only branch may change its format
    assert module.branch_bits is None and not module.branch_codes
    with pytest.raises(ValueError, match=r"rows \[1\] have float factors, row 2 would have 8-bit"):
        module.set_branch(2, *factors, bits=8)


def test_set_branch_codes_checks_shapes_and_quantizer():
    module, gen = _module(2)
    config = WeightQuantConfig(bits=8)
    left_t = quantize_weight(torch.randn(3, 48, generator=gen), config)
    right_t = quantize_weight(torch.randn(40, 3, generator=gen), config)
    with pytest.raises(ValueError, match=r"must be Lᵀ \[r, 48\] and Rᵀ \[40, r\], got \(3, 48\) and \(3, 40\)"):
        module.set_branch_codes(1, left_t, QuantizedWeight(right_t.qdata.T, right_t.scale[:3], None, config))
    grouped = quantize_weight(torch.randn(3, 48, generator=gen), WeightQuantConfig(bits=8, group_size=16))
    with pytest.raises(ValueError, match="quantized branch factors must both be WeightQuantConfig"):
        module.set_branch_codes(1, grouped, right_t)
    module.set_branch_codes(1, left_t, right_t)
    assert module.branch_bits == 8


# ----------------------------------------------------------------------------- reference numerics


@settings(max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([4, 8]), divide_input=st.booleans())
def test_reference_branch_is_the_int8_kernel_algebra(seed, bits, divide_input):
    """``y = Q_a(x̃)·Q_w(W_text)ᵀ + Σ_r H_8(mask_r · Q_8(x̃)·Q_b(L_r)) · Q_b(R_r)``."""
    module, gen = _module(seed)
    if not divide_input:
        module.divide_upstream()
    for row in (1, 2):
        module.set_branch(row, torch.randn(48, 4, generator=gen) * 0.1, torch.randn(4, 40, generator=gen), bits=bits)
    module.freeze()
    x = torch.randn(2, 7, 48, generator=gen) * torch.exp(torch.randn(48, generator=gen))
    ids = torch.randint(0, NUM_MODALITIES, (2, 7), generator=gen)
    xs = module.smooth_input(x, ids)
    expected = F.linear(fake_quant_act(xs, module.act_quant), module.quantized_weight(0))
    source = fake_quant_act(xs, BRANCH_ACT)
    token_rows = module.row_of_modality[ids].unsqueeze(-1)
    for row, (left_t, right_t) in module.branch_codes.items():
        hidden = torch.where(token_rows == row, source @ left_t.dequantize().T.contiguous(), 0.0)
        expected = expected + fake_quant_hidden(hidden) @ right_t.dequantize().T.contiguous()
    with torch.no_grad():
        assert torch.equal(module(x, ids), expected)


@torch.no_grad()
def test_integer_branches_stay_close_to_the_float_branches(omni, int8_cmc):
    """Per linear, the 8-bit branch output vs the float branch (same SVD factors) on the tokens it
    serves: relative error measured ≤ 8.3e-3 (mean 7.6e-3). Logits: 3.3e-3 apart (relative), 0.04 of
    the quantization error (8.8e-2)."""
    float_cmc = omni.transformed(FLOAT_CMC)
    recorded = record_quant_linear_calls(int8_cmc.graph_module, omni.inputs)
    floats = {m.name: m for m in _compensated(float_cmc.graph_module)}
    for module in _compensated(int8_cmc.graph_module):
        x, ids, y = recorded[module.name]
        other = floats[module.name]
        branch_int8 = y - _without_branches(module)(x, ids)
        branch_float = other(x, ids) - _without_branches(other)(x, ids)
        served = (module.row_of_modality[ids] != int(module.row_of_modality[Modality.TEXT])) & omni.inputs.attention_mask.bool()
        error = (branch_int8 - branch_float)[served].norm() / branch_float[served].norm()
        assert error < 2e-2, (module.name, float(error))
    int8_logits, float_logits = int8_cmc.captured(omni.inputs), float_cmc.captured(omni.inputs)
    assert (int8_logits - float_logits).norm() < 0.1 * (float_logits - omni.fp).norm()


@torch.no_grad()
def test_text_tokens_are_untouched_by_integer_branches(omni, int8_cmc):
    all_text = replace(omni.inputs, modality_ids=torch.zeros_like(omni.inputs.modality_ids))
    stripped = copy.deepcopy(int8_cmc.captured)
    for module in quant_linears(stripped.graph_module):
        module.branches, module.branch_codes = {}, {}
    assert torch.equal(int8_cmc.captured(all_text), stripped(all_text))
    mixed, mixed_stripped = int8_cmc.captured(omni.inputs), stripped(omni.inputs)  # causal: up to the first media token
    for b, ids in enumerate(omni.inputs.modality_ids):
        first = int(torch.nonzero(ids != int(Modality.TEXT))[0])
        assert torch.equal(mixed[b, :first], mixed_stripped[b, :first])
        assert not torch.equal(mixed[b, first:], mixed_stripped[b, first:])
    lowered, lowered_stripped = copy.deepcopy(int8_cmc.captured), copy.deepcopy(stripped)
    lower_to_torchao(lowered)
    lower_to_torchao(lowered_stripped)
    assert torch.equal(lowered(all_text), lowered_stripped(all_text))  # the hidden columns of the GEMM leave y alone


# ----------------------------------------------------------------------------- lowered numerics


def _assert_lowered_matches(module: QuantLinear, lowered: Int8QuantLinear, x: torch.Tensor, ids: torch.Tensor) -> None:
    """Same codes; outputs within float rounding except on tokens where a hidden code flipped (see the docstring)."""
    out = module.out_features
    codes = torch.cat([c[0].qdata for _, c in sorted(module.branch_codes.items())])
    rank = codes.shape[0]  # a single rank column is padded with a zero column no token owns
    assert torch.equal(lowered.weights[0].qdata[out : out + rank], codes) and not lowered.weights[0].qdata[out + rank :].any()
    right = torch.cat([c[1].qdata for _, c in sorted(module.branch_codes.items())], 1)
    assert torch.equal(lowered.int8_right.qdata[:, :rank], right) and not lowered.int8_right.qdata[:, rank:].any()
    with torch.no_grad():
        y, expected = lowered(x, ids), module(x, ids)
        xs = module.smooth_input(x, ids)
        token_rows = module.row_of_modality[ids].unsqueeze(-1)
        mask = token_rows == lowered.branch_rows
        kernel_hidden = fake_quant_hidden(F.linear(xs, lowered.weights[0])[..., out:] * mask)
        left = torch.cat([module.branches[r][0] for r in sorted(module.branches)], 1)
        reference_hidden = fake_quant_hidden((fake_quant_act(xs, BRANCH_ACT) @ left) * mask)
    step = reference_hidden.abs().amax(-1, keepdim=True) / 127
    flipped = ((kernel_hidden - reference_hidden).abs() > 0.5 * step).any(-1)
    assert int(flipped.sum()) <= max(1, flipped.numel() // 1000)
    error = (y - expected).abs().amax(-1)
    assert (error[~flipped] <= MODULE_RTOL * expected.abs().max()).all()


@settings(max_examples=30)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(2, 3),
    rank=st.sampled_from([1, 4]),
    bits=st.sampled_from([2, 4, 8]),
    divide_input=st.booleans(),
    use_bias=st.booleans(),
)
def test_lowered_integer_branches_match_the_reference(seed, rows, rank, bits, divide_input, use_bias):
    module, gen = _module(seed, rows)
    if not divide_input:
        module.divide_upstream()
    module.bias = torch.randn(40, generator=gen) if use_bias else None
    for row in range(1, rows):
        module.set_branch(row, torch.randn(48, rank, generator=gen) * 0.1, torch.randn(rank, 40, generator=gen), bits=bits)
    module.freeze()
    x = torch.randn(2, 11, 48, generator=gen) * torch.exp(torch.randn(48, generator=gen))
    ids = torch.randint(0, NUM_MODALITIES, (2, 11), generator=gen)
    lowered = Int8QuantLinear.from_quant_linear(module)
    assert lowered.branch_ranks == {row: rank for row in range(1, rows)} and lowered.branch_left is None
    _assert_lowered_matches(module, lowered, x, ids)


def test_integer_branches_reading_the_quantized_input_stay_on_the_reference_path():
    module, gen = _module(3)
    module.set_branch(1, torch.randn(48, 4, generator=gen), torch.randn(4, 40, generator=gen), bits=8)
    module.use_text_weight("quantized")
    assert "integer CMC branches reading the quantized input" in unsupported_reason(module)
    with pytest.raises(ValueError, match="cannot be lowered to int8 kernels: integer CMC branches"):
        Int8QuantLinear.from_quant_linear(module)


def test_lowered_tiny_model_matches_the_reference(omni, int8_cmc):
    reference = int8_cmc.captured
    recorded = record_quant_linear_calls(reference.graph_module, omni.inputs)
    lowered = copy.deepcopy(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every linear lowers
        report = lower_to_torchao(lowered)
    assert len(report.lowered) == 14
    modules = {m.name: m for m in quant_linears(reference.graph_module)}
    int8 = {m.name: m for m in lowered.graph_module.modules() if isinstance(m, Int8QuantLinear)}
    assert sum(m.int8_right is not None for m in int8.values()) == len(_compensated(reference.graph_module)) == 12
    for name, module in modules.items():
        x, ids, y = recorded[name]
        if module.branches:
            _assert_lowered_matches(module, int8[name], x, ids)
        else:
            with torch.no_grad():
                assert (int8[name](x, ids) - y).abs().max() <= MODULE_RTOL * y.abs().max()
    with torch.no_grad():
        ref, out = reference(omni.inputs), lowered(omni.inputs)
    assert (out - ref).abs().max() <= LOGIT_RTOL * ref.abs().max()
    assert (out - ref).norm() < (ref - omni.fp).norm(), "backend deviates more than the quantization error"


@pytest.mark.parametrize("layout", ["indexed", "masked"])
def test_compiled_graph_fuses_every_int8_gemm_of_the_branches(omni, int8_cmc, layout):
    """x̃·L rides in the main GEMM (extra output columns); h·R is one more int8 GEMM per compensated
    linear (masked) or per compensated linear and modality (indexed), and every int8 GEMM is fused."""
    lowered = copy.deepcopy(int8_cmc.captured)
    lower_to_torchao(lowered, branch_layout=layout)
    modules = [m for m in lowered.graph_module.modules() if isinstance(m, Int8QuantLinear)]
    branch_gemms = {"indexed": sum(len(m.position_rows) for m in modules), "masked": sum(m.int8_right is not None for m in modules)}
    assert branch_gemms == {"indexed": 12 * 2, "masked": 12}
    gemms = sum(len(m.weights) for m in modules) + branch_gemms[layout]
    compiled = compile_graph(lowered)
    with torch._inductor.config.patch(fx_graph_cache=False):  # a cache hit would skip the pattern passes
        before = counters["inductor"][_QLINEAR]
        out = compiled(*omni.inputs.args())
        assert counters["inductor"][_QLINEAR] - before == gemms
    with torch.no_grad():
        ref = int8_cmc.captured(omni.inputs)
    assert (out - ref).abs().max() <= LOGIT_RTOL * ref.abs().max()


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("bits", [8, 4])
def test_integer_factors_round_trip_through_checkpoints(omni, int8_cmc, tmp_path, bits):
    recipe = replace(INT8_CMC, cmc=CMCConfig(rank=4, factor_bits=bits))
    context = int8_cmc if bits == 8 else omni.transformed(recipe)
    directory = save(context, tmp_path / "int", model=omni.model, recipe=recipe)
    loaded = load(directory, omni.model)
    with torch.no_grad():
        assert torch.equal(loaded(omni.inputs), context.captured(omni.inputs))
    saved = {m.name: m for m in quant_linears(context.graph_module)}
    for module in _compensated(loaded.graph_module):
        assert module.branch_bits == bits
        for row, (left_t, right_t) in module.branch_codes.items():
            original = saved[module.name].branch_codes[row]
            for ours, theirs in zip((left_t, right_t), original):
                assert torch.equal(ours.qdata, theirs.qdata) and torch.equal(ours.scale, theirs.scale)
    again = save(Context(loaded, [omni.inputs]), tmp_path / "again", model=omni.model, recipe=recipe)
    assert [p.read_bytes() for p in sorted(again.iterdir())] == [p.read_bytes() for p in sorted(directory.iterdir())]
    record = read_manifest(directory)["graph"]["linears"]["layers.0.self_attn.k_proj"]
    assert record["branch_bits"] == bits and record["branch_rows"] == [1, 2]


def test_integer_factors_take_about_a_quarter_of_the_float_bytes(omni, int8_cmc, tmp_path):
    float_dir = save(omni.transformed(FLOAT_CMC), tmp_path / "float", model=omni.model, recipe=FLOAT_CMC)
    int8_dir = save(int8_cmc, tmp_path / "int8", model=omni.model, recipe=INT8_CMC)
    float_bytes, int8_bytes = linear_bytes(float_dir).branch_bytes, linear_bytes(int8_dir).branch_bytes
    # codes: 1 byte instead of 4, plus a float32 scale per rank column of L and per output channel of R
    shapes = [(m.in_features, m.out_features, left.shape[1]) for m in _compensated(int8_cmc.graph_module) for left, _ in m.branches.values()]
    assert float_bytes == sum(4 * r * (i + o) for i, o, r in shapes)
    assert int8_bytes == sum(r * (i + o) + 4 * (r + o) for i, o, r in shapes)
    assert int8_bytes / float_bytes < 0.4  # 0.39 here (rank 4, small linears); 0.28 at rank 28 and 576 → 1536


def test_checkpoints_without_the_field_load_float_factors(omni, tmp_path):
    context = omni.transformed(FLOAT_CMC)
    directory = save(context, tmp_path / "old", model=omni.model, recipe=FLOAT_CMC)
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    for record in manifest["graph"]["linears"].values():  # as format 1 wrote it before factor_bits existed
        del record["branch_bits"]
        record.update(record.pop("state"), quantizers_enabled=True)
        assert record.pop("act_static_scale") is None
    del manifest["recipe"]["cmc"]["factor_bits"]
    data = (directory / "quantized.safetensors").read_bytes()  # format 1 recorded the file's bytes and sha256
    manifest["tensors"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest["format_version"] = 1
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    loaded = load(directory, omni.model)
    assert all(m.branch_bits is None and m.branches for m in _compensated(loaded.graph_module))
    with torch.no_grad():
        assert torch.equal(loaded(omni.inputs), context.captured(omni.inputs))


def test_cmc_reports_the_errors_of_the_integer_factors(omni):
    errors = {}
    for bits in (None, 8, 2):
        context = omni.transformed(replace(INT8_CMC, cmc=CMCConfig(rank=4, factor_bits=bits)))
        reports = context.diagnostics["cmc"]
        errors[bits] = sum(r.relative_error for r in reports) / len(reports)
        module = next(m for m in quant_linears(context.graph_module) if m.name == "layers.0.mlp.up_proj")
        left, right = module.branches[int(module.row_of_modality[Modality.VISION])]
    assert errors[None] < errors[8] < errors[None] + 0.02 < errors[2]
