"""Graph transforms: smoothing invariance, routed MAS numerics, SmoothQuant golden values, MAS learning.

Module-level properties run on :class:`QuantLinear` directly (hypothesis); graph-level ones run on
deep copies of one captured tiny Qwen2.5-Omni thinker (text + image + audio), so the model is
captured once per module. Every expected value is computed here, independently of the transform
under test, from the observed statistics, the float weights and :mod:`masq_fx.quantizers`.
"""

from __future__ import annotations

import copy
import json
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from masq_fx.calibration.calibrate import Calibrate, InsertObservers
from masq_fx.capture.decoder import CapturedDecoder, capture
from masq_fx.modality import NUM_MODALITIES, Modality
from masq_fx.models import DecoderInputs, adapter_for
from masq_fx.models.tiny import tiny_model
from masq_fx.nn.quant_linear import QuantLinear, QuantLinearState, quantizers_off
from masq_fx.nn.routing import ModalityScale
from masq_fx.pipeline import Context, Pipeline
from masq_fx.quantizers import (
    ActQuantConfig,
    WeightQuantConfig,
    calibrate_static_scale,
    fake_quant_act,
    fake_quant_weight,
)
from masq_fx.transforms import (
    PrepareQuantLinears,
    QuantizeActivations,
    QuantizeWeights,
    SmoothingConfig,
    SmoothScales,
    quant_linears,
)
from masq_fx.transforms.mas import LearnMAS, MASLearningConfig, modality_weighted_mae
from masq_fx.transforms.smoothing import smoothquant_scales

TEXT, VISION, AUDIO = Modality.TEXT, Modality.VISION, Modality.AUDIO
W4 = WeightQuantConfig(bits=4)
A8 = ActQuantConfig(bits=8)
PER_LINEAR = SmoothingConfig()  # MAS initialisation: per linear, per modality
TIED_ROUTED = SmoothingConfig(variant="tied", per_modality=True, fold_into_norm=False)
TIED_FOLDED = SmoothingConfig(variant="tied", per_modality=False)
SMOOTHQUANT_PER_LINEAR = SmoothingConfig(variant="per_linear", per_modality=False)


# ----------------------------------------------------------------------------- helpers


@dataclass
class Captured:
    """A captured tiny model kept pristine: every test works on a deep copy of ``captured``."""

    model: nn.Module
    captured: CapturedDecoder
    inputs: DecoderInputs
    reference: torch.Tensor  # float logits of ``inputs``

    def fresh(self) -> CapturedDecoder:
        return copy.deepcopy(self.captured)


def _captured(family: str) -> Captured:
    tiny = tiny_model(family, seed=0, batch_size=2)
    inputs = adapter_for(tiny.model).decoder_inputs(tiny.batch)
    captured = capture(tiny.model)
    with torch.no_grad():
        reference = captured(inputs)
    return Captured(tiny.model, captured, inputs, reference)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def omni() -> Captured:
    return _captured("qwen2.5-omni-thinker")


@pytest.fixture(scope="module")
def llama() -> Captured:
    return _captured("llama")


def with_ids(inputs: DecoderInputs, ids: torch.Tensor) -> DecoderInputs:
    return replace(inputs, modality_ids=ids)


def relabel(inputs: DecoderInputs, old: Modality, new: Modality) -> DecoderInputs:
    ids = inputs.modality_ids
    return with_ids(inputs, torch.where(ids == int(old), int(new), ids))


def smoothed(
    base: Captured,
    smoothing: SmoothingConfig | None,
    weight: WeightQuantConfig | None = None,
    activation: ActQuantConfig | None = None,
    calibration: list[DecoderInputs] | None = None,
    captured: CapturedDecoder | None = None,
) -> Context:
    """Fresh copy → observe + calibrate → prepare → (smooth) → (quantize weights / activations)."""
    context = Context(base.fresh() if captured is None else captured, calibration or [base.inputs])
    steps = [InsertObservers(), Calibrate(progress=False), PrepareQuantLinears()]
    if smoothing is not None:
        steps.append(SmoothScales(smoothing))
    if weight is not None:
        steps.append(QuantizeWeights(weight))
    if activation is not None:
        steps.append(QuantizeActivations(activation))
    return Pipeline(steps).run(context, progress=False)


@torch.no_grad()
def logits(context: Context | CapturedDecoder, inputs: DecoderInputs) -> torch.Tensor:
    captured = context.captured if isinstance(context, Context) else context
    return captured(inputs)


def modules(context: Context) -> dict[str, QuantLinear]:
    return {m.name: m for m in quant_linears(context.graph_module)}


def golden_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float, floor: float = 1e-5) -> torch.Tensor:
    """SmoothQuant, written out in float64: clamp(a^α / w^(1-α), floor) with a, w clamped to floor first."""
    a = act_absmax.double().clamp_min(floor)
    w = weight_absmax.double().clamp_min(floor)
    return (a**alpha / w ** (1.0 - alpha)).clamp_min(floor)


def linear_case(seed: int, rows: int, in_features: int = 16, out_features: int = 6, spread: float = 2.0):
    """Weights, bias, a ``[2, 7, in]`` input, modality ids and ``[rows, in]`` positive scales."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen)
    x = torch.randn(2, 7, in_features, generator=gen) * torch.exp(torch.randn(in_features, generator=gen))
    ids = torch.randint(0, NUM_MODALITIES, (2, 7), generator=gen)
    scales = torch.exp((torch.rand(rows, in_features, generator=gen) * 2 - 1) * spread)
    return weight, bias, x, ids, scales


# ----------------------------------------------------------------------------- 1. smoothing invariance


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 3),
    routing=st.lists(st.integers(0, 2), min_size=NUM_MODALITIES, max_size=NUM_MODALITIES),
    spread=st.floats(0.0, 4.6),  # scales in [e^-spread, e^spread], up to ~1e±2
    quantizers=st.sampled_from(["never_added", "disabled", "disabled_frozen"]),
    upstream_divides=st.booleans(),
    use_bias=st.booleans(),
)
def test_quant_linear_with_any_positive_scales_and_no_quantizers_is_the_float_linear(
    seed, rows, routing, spread, quantizers, upstream_divides, use_bias
):
    weight, bias, x, ids, scales = linear_case(seed, rows, spread=spread)
    bias = bias if use_bias else None
    route = torch.tensor([r % rows for r in routing])
    module = QuantLinear(weight, bias, "lin")
    module.set_scales(scales, route)
    if quantizers != "never_added":
        module.set_quantizers(weight=W4, activation=ActQuantConfig(bits=4))
        if quantizers == "disabled_frozen":
            module.freeze()
    if upstream_divides:  # a router / folded norm already divided every token by its row
        module.divide_upstream()
        x_in = x / scales[route[ids]]
    else:
        x_in = x
    with nullcontext() if quantizers == "never_added" else module.quantizers_off():
        y = module(x_in, ids)
    expected = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    # float32 rounding bound of a dot product, relative to Σ|x||W|: rtol 1e-5 in the right norm
    bound = 1e-5 * (x.abs().double() @ weight.abs().double().T) + 1e-6
    assert ((y.double() - expected).abs() <= bound).all(), (y.double() - expected).abs().max()


@pytest.mark.parametrize(
    "config",
    [
        PER_LINEAR,
        replace(PER_LINEAR, kinds=("norm", "attention", "activation")),
        replace(SMOOTHQUANT_PER_LINEAR, kinds=("norm", "attention", "activation")),
        replace(TIED_FOLDED, kinds=("norm", "attention", "activation")),
        replace(TIED_ROUTED, kinds=("norm", "attention", "activation")),
        replace(TIED_ROUTED, fold_into_norm=True),  # 3 rows cannot be folded: routed anyway
    ],
    ids=["per_linear", "per_linear+act", "sq_per_linear+act", "tied_folded+act", "tied_routed+act", "tied_3rows_fold"],
)
def test_smoothed_graph_without_quantizers_gives_the_float_logits(omni, config):
    context = smoothed(omni, config)
    mods = modules(context)
    kinds = set(config.kinds)
    expected = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj"} | ({"down_proj"} if "activation" in kinds else set())
    smoothed_names = {name.rsplit(".", 1)[1] for name, m in mods.items() if m.scales is not None}
    assert smoothed_names == expected
    scales = torch.cat([m.scales.detach().flatten() for m in mods.values() if m.scales is not None])
    assert scales.min() > 0 and scales.log().abs().max() > 1.0, "scales are trivially close to 1"
    rows = {m.scales.shape[0] for m in mods.values() if m.scales is not None}
    assert rows == ({3} if config.per_modality else {1})
    norm = context.graph_module.get_submodule("decoder.layers.0.input_layernorm").weight
    folded = config.variant == "tied" and config.fold_into_norm and not config.per_modality
    original = omni.captured.graph_module.get_submodule("decoder.layers.0.input_layernorm").weight
    assert torch.equal(norm, original) == (not folded)
    routers = [m for m in context.graph_module.modules() if isinstance(m, ModalityScale)]
    assert bool(routers) == (config.variant == "tied" and not folded)

    torch.testing.assert_close(logits(context, omni.inputs), omni.reference, rtol=0, atol=1e-4)

    # quantizers added and then switched off: still the float graph
    Pipeline([QuantizeWeights(W4), QuantizeActivations(A8)]).run(context, progress=False)
    quantized = logits(context, omni.inputs)
    assert (quantized - omni.reference).abs().max() > 1e-3, "the W4A8 graph should differ from the float one"
    with quantizers_off(context.graph_module):
        torch.testing.assert_close(logits(context, omni.inputs), omni.reference, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- 2. routed == masked sum


@settings(max_examples=20)
@given(
    seed=st.integers(0, 2**31 - 1),
    routing=st.permutations([0, 1, 2]),
    wbits=st.sampled_from([3, 4, 8]),
    granularity=st.sampled_from(["per_token", "per_tensor"]),
    frozen=st.booleans(),
)
def test_routed_quant_linear_equals_the_masked_sum_of_per_modality_gemms(seed, routing, wbits, granularity, frozen):
    weight, bias, x, ids, scales = linear_case(seed, 3)
    ids[0, :3] = torch.tensor([0, 1, 2])  # every modality occurs
    route = torch.tensor(routing)
    wq, aq = WeightQuantConfig(bits=wbits), ActQuantConfig(bits=8, granularity=granularity)
    static = calibrate_static_scale((x / scales[route[ids]]).abs().max() * 0.8, aq) if granularity == "per_tensor" else None
    module = QuantLinear(weight, bias, "lin")
    module.set_scales(scales, route)
    module.set_quantizers(weight=wq, activation=aq, static_scale=static)
    if frozen:
        module.freeze()
    y = module(x, ids)

    # Σ_m mask_m ⊙ (Q_a(x ⊘ s_m) · Q_w(W·diag(s_m))ᵀ) + b, one masked copy of the input per modality
    expected = torch.zeros(2, 7, weight.shape[0])
    for m in Modality:
        mask = (ids == int(m)).unsqueeze(-1)
        s = scales[route[int(m)]]
        xm = torch.where(mask, x / s, torch.zeros(()))
        expected = expected + torch.where(mask, fake_quant_act(xm, aq, static) @ fake_quant_weight(weight * s, wq).T, 0.0)
    expected = expected + bias
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # and it is not the single-scale computation (the rows are really distinct)
    single = fake_quant_act(x / scales[route[0]], aq, static) @ fake_quant_weight(weight * scales[route[0]], wq).T + bias
    assert (y - single).abs().max() > 1e-3


# ----------------------------------------------------------------------------- 3. s ≡ 1


@settings(max_examples=20)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 3),
    wbits=st.sampled_from([2, 4, 8]),
    symmetric=st.booleans(),
    granularity=st.sampled_from(["per_token", "per_tensor"]),
)
def test_unit_scales_with_quantizers_are_exactly_rtn(seed, rows, wbits, symmetric, granularity):
    weight, bias, x, ids, _ = linear_case(seed, rows)
    wq = WeightQuantConfig(bits=wbits, symmetric=symmetric)
    aq = ActQuantConfig(bits=8, granularity=granularity)
    static = calibrate_static_scale(x.abs().max(), aq) if granularity == "per_tensor" else None
    rtn, smooth = QuantLinear(weight, bias, "rtn"), QuantLinear(weight, bias, "ones")
    smooth.set_scales(torch.ones(rows, weight.shape[1]), torch.arange(NUM_MODALITIES) % rows)
    for module in (rtn, smooth):
        module.set_quantizers(weight=wq, activation=aq, static_scale=static)
    assert torch.equal(smooth(x, ids), rtn(x, ids))
    smooth.freeze()
    assert torch.equal(smooth(x, ids), rtn(x, ids))


def test_quant_linear_state_changes_only_through_methods_that_keep_the_cache_right():
    weight, bias, x, ids, scales = linear_case(5, 3)
    aq = ActQuantConfig(granularity="per_tensor")

    def fresh(table: torch.Tensor) -> QuantLinear:
        module = QuantLinear(weight, bias, "fresh")
        module.set_scales(table, torch.tensor([0, 1, 2]))
        module.set_quantizers(weight=W4, activation=aq, static_scale=0.05)
        return module

    module = fresh(scales)
    y = module(x, ids)
    assert module.cached_weights is not None and torch.equal(y, fresh(scales)(x, ids))
    with pytest.raises(AttributeError):
        module.weight_quant = None
    with pytest.raises(ValueError, match="act_static_scale is needed exactly with per-tensor activations"):
        module.set_quantizers(static_scale=None)
    with torch.no_grad():  # an in-place update (an optimizer step, CMC's projection) rebuilds the cache
        module.scales.mul_(1.5)
    assert torch.equal(module(x, ids), fresh(module.scales.detach().clone())(x, ids))
    assert not torch.equal(module(x, ids), y)
    with module.quantizers_off():
        assert module.cached_weights is None and not module.quantizers_enabled
        module.freeze()  # the cache always holds the quantized weights
    assert module.quantizers_enabled and torch.equal(module(x, ids), fresh(module.scales.detach().clone())(x, ids))
    module.set_quantizers(weight=WeightQuantConfig(bits=8))  # a new quantizer: the cache follows
    other = fresh(module.scales.detach().clone())
    other.set_quantizers(weight=WeightQuantConfig(bits=8))
    assert torch.equal(module(x, ids), other(x, ids))
    module.use_text_weight()
    assert module.cached_weights.shape[0] == 1 and module.state.weight_rows == "text"
    assert QuantLinearState.from_dict(json.loads(json.dumps(module.state.to_dict()))) == module.state


def test_text_weight_without_compensation_computes_x_diag_st_over_sm_w():
    """``weight_rows="text"`` (the CMC base, spec §7): a non-text token gets x·diag(s_t/s_m)·Wᵀ."""
    weight, bias, x, ids, scales = linear_case(3, 3)
    module = QuantLinear(weight, bias, "lin")
    module.set_scales(scales, torch.tensor([0, 1, 2]))
    module.use_text_weight()  # no quantizers installed: the text weight is W·diag(s_t) exactly
    y = module(x, ids)
    with module.quantizers_off():  # off means the smoothed float linear, whatever weight_rows says
        off = module(x, ids)
    torch.testing.assert_close(off.double(), x.double() @ weight.double().T + bias.double(), rtol=1e-5, atol=1e-5)
    ratio = scales[0] / scales[ids]  # [2, 7, in]
    expected = torch.einsum("bti,oi->bto", x.double() * ratio.double(), weight.double()) + bias.double()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 4. all-text MAS == SmoothQuant


def test_text_only_mas_init_is_smoothquant_with_text_scales(llama):
    mas = smoothed(llama, PER_LINEAR, W4, A8)
    sq = smoothed(llama, SMOOTHQUANT_PER_LINEAR, W4, A8)
    for name, module in modules(mas).items():
        other = modules(sq)[name]
        if module.scales is None:
            assert other.scales is None
            continue
        assert module.scales.shape == other.scales.shape == (1, module.in_features)
        assert torch.equal(module.scales, other.scales)
        assert torch.equal(module.row_of_modality, other.row_of_modality)
    mas_logits = logits(mas, llama.inputs)
    assert torch.equal(mas_logits, logits(sq, llama.inputs))
    assert (mas_logits - llama.reference).abs().max() > 1e-3  # quantizers are really on


def _text_row_only(context: Context) -> None:
    """Replace every scale table by its text row (shared tables stay shared) and refreeze."""
    new: dict[int, nn.Parameter] = {}

    def text_row(scales: nn.Parameter, rows: torch.Tensor) -> nn.Parameter:
        if id(scales) not in new:
            row = int(rows[TEXT])
            new[id(scales)] = nn.Parameter(scales.detach()[row : row + 1].clone(), requires_grad=False)
        return new[id(scales)]

    for module in context.graph_module.modules():
        if isinstance(module, ModalityScale):
            module.scales = text_row(module.scales, module.row_of_modality)
            module.row_of_modality = torch.zeros_like(module.row_of_modality)
    for module in quant_linears(context.graph_module):
        if module.scales is not None:
            module.set_scales(text_row(module.scales, module.row_of_modality))
            if module.weight_quant is not None:
                module.freeze()


@pytest.mark.parametrize("config", [PER_LINEAR, TIED_ROUTED], ids=["per_linear", "tied_routed"])
def test_multimodal_mas_init_on_text_only_input_uses_only_the_text_row(omni, config):
    mas = smoothed(omni, config, W4, A8)
    text_only = smoothed(omni, config, W4, A8)
    _text_row_only(text_only)
    assert all(m.scales.shape[0] == 1 for m in modules(text_only).values() if m.scales is not None)
    all_text = with_ids(omni.inputs, torch.zeros_like(omni.inputs.modality_ids))
    assert torch.equal(logits(mas, all_text), logits(text_only, all_text))
    # the real input (image and audio tokens) does use the other rows
    assert (logits(mas, omni.inputs) - logits(text_only, omni.inputs)).abs().max() > 1e-3


# ----------------------------------------------------------------------------- 5. routing is used


def _first(ids: torch.Tensor, modality: Modality) -> list[int]:
    return [int(torch.nonzero(row == int(modality))[0]) for row in ids]


@pytest.mark.parametrize("config", [PER_LINEAR, TIED_ROUTED], ids=["per_linear", "tied_routed"])
def test_modality_ids_drive_the_routing(omni, config):
    context = smoothed(omni, config, W4, A8)
    ids = omni.inputs.modality_ids
    relabelled = relabel(omni.inputs, VISION, TEXT)
    before, after = logits(context, omni.inputs), logits(context, relabelled)
    first_image = _first(ids, VISION)
    for b, start in enumerate(first_image):
        # causal: positions before the first image token never see the relabelled tokens
        assert torch.equal(before[b, :start], after[b, :start])
        # the image tokens themselves change
        assert (before[b, start:] - after[b, start:]).abs().max() > 1e-3

    single = smoothed(omni, replace(config, per_modality=False), W4, A8)
    assert torch.equal(logits(single, omni.inputs), logits(single, relabelled))


# ----------------------------------------------------------------------------- 6. golden SmoothQuant


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**31 - 1),
    alpha=st.sampled_from([0.0, 0.3, 0.5, 0.8, 1.0]),
    min_scale=st.sampled_from([1e-5, 1e-2]),
)
def test_smoothquant_scales_formula(seed, alpha, min_scale):
    gen = torch.Generator().manual_seed(seed)
    a = torch.exp(torch.randn(3, 24, generator=gen) * 3)
    w = torch.exp(torch.randn(24, generator=gen) * 3)
    a[0, :3] = 0.0  # an absent channel / modality
    w[5] = 0.0
    got = smoothquant_scales(a, w, alpha, min_scale)
    assert got.dtype == torch.float32 and got.shape == (3, 24)
    torch.testing.assert_close(got.double(), golden_scales(a, w, alpha, min_scale), rtol=1e-5, atol=0)
    assert (got >= min_scale).all()


_TIED = {"q_proj": ("q_proj", "k_proj", "v_proj"), "k_proj": ("q_proj", "k_proj", "v_proj"),
         "v_proj": ("q_proj", "k_proj", "v_proj"), "gate_proj": ("gate_proj", "up_proj"),
         "up_proj": ("gate_proj", "up_proj"), "o_proj": ("o_proj",)}  # fmt: skip


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
@pytest.mark.parametrize(
    "variant, per_modality", [("per_linear", True), ("tied", False), ("tied", True)], ids=["per_linear_mas", "tied_sq", "tied_mas"]
)
def test_installed_scales_match_smoothquant_from_observed_stats(omni, alpha, variant, per_modality):
    config = SmoothingConfig(alpha=alpha, variant=variant, per_modality=per_modality, fold_into_norm=False)
    context = smoothed(omni, config)
    mods = modules(context)
    checked = 0
    for name, module in mods.items():
        prefix, short = name.rsplit(".", 1)
        if short == "down_proj":
            assert module.scales is None
            continue
        stats = context.stats[name]
        per_mod = torch.stack([stats.of(m).absmax for m in (TEXT, VISION, AUDIO)])
        act = per_mod if per_modality else per_mod.amax(0, keepdim=True)
        members = _TIED[short] if variant == "tied" else (short,)
        w = torch.cat([mods[f"{prefix}.{member}"].weight.detach() for member in members]).abs().amax(0)
        expected = golden_scales(act, w, alpha)
        torch.testing.assert_close(module.scales.detach().double(), expected, rtol=1e-5, atol=0)
        expected_rows = torch.arange(3) if per_modality else torch.zeros(3, dtype=torch.long)
        assert torch.equal(module.row_of_modality, expected_rows)
        checked += 1
    assert checked == 12  # 2 layers × (q, k, v, o, gate, up)
    if variant == "tied":  # q/k/v share one table object, gate/up another
        layer = "layers.1"
        assert mods[f"{layer}.self_attn.q_proj"].scales is mods[f"{layer}.self_attn.v_proj"].scales
        assert mods[f"{layer}.mlp.gate_proj"].scales is mods[f"{layer}.mlp.up_proj"].scales


# ----------------------------------------------------------------------------- 7. absent modality


def test_modality_absent_from_calibration_warns_and_uses_the_text_row(omni):
    text_only = with_ids(omni.inputs, torch.zeros_like(omni.inputs.modality_ids))
    with pytest.warns(UserWarning, match=r"calibration has no vision, audio tokens") as record:
        context = smoothed(omni, PER_LINEAR, W4, A8, calibration=[text_only])
    assert len([w for w in record if "calibration has no" in str(w.message)]) == 1
    for module in modules(context).values():
        if module.scales is not None:
            assert module.scales.shape[0] == 1
            assert torch.equal(module.row_of_modality, torch.zeros(NUM_MODALITIES, dtype=torch.long))
    # vision (and audio) tokens are computed exactly as if they were text
    assert torch.equal(logits(context, omni.inputs), logits(context, text_only))


def test_only_the_absent_modality_falls_back(omni):
    no_audio = relabel(omni.inputs, AUDIO, TEXT)
    with pytest.warns(UserWarning, match=r"calibration has no audio tokens") as record:
        context = smoothed(omni, PER_LINEAR, W4, A8, calibration=[no_audio])
    assert not any("vision" in str(w.message) for w in record)
    q = modules(context)["layers.0.self_attn.q_proj"]
    assert q.scales.shape[0] == 2 and q.row_of_modality.tolist() == [0, 1, 0]
    assert torch.equal(logits(context, omni.inputs), logits(context, no_audio))
    assert not torch.equal(logits(context, omni.inputs), logits(context, relabel(omni.inputs, VISION, TEXT)))


def test_single_row_smoothing_does_not_warn_about_absent_modalities(omni):
    text_only = with_ids(omni.inputs, torch.zeros_like(omni.inputs.modality_ids))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="calibration has no")
        smoothed(omni, TIED_FOLDED, calibration=[text_only])


# ----------------------------------------------------------------------------- 8. MAS learning


def _scale_tables(context: Context) -> dict[str, torch.Tensor]:
    return {m.name: m.scales.detach().clone() for m in quant_linears(context.graph_module) if m.scales is not None}


def test_mas_learning_reduces_the_loss_and_keeps_scales_positive(omni):
    hf_state = {k: v.clone() for k, v in omni.model.state_dict().items()}
    config = MASLearningConfig(epochs=4)
    context = smoothed(omni, TIED_ROUTED, W4, A8)
    init_logits = logits(context, omni.inputs)
    init_scales = _scale_tables(context)
    learn = LearnMAS(config, progress=False)
    Pipeline([learn]).run(context, progress=False)
    learned_logits = logits(context, omni.inputs)
    learned_scales = _scale_tables(context)

    # the layer losses: recorded for both layers, decreasing for at least one
    assert sorted(learn.losses) == [0, 1]
    assert all(first > 0 and last > 0 for first, last in learn.losses.values())
    assert any(last < first for first, last in learn.losses.values()), learn.losses
    # scales moved, and stayed at or above min_scale
    assert any(not torch.equal(init_scales[n], learned_scales[n]) for n in init_scales)
    assert all(bool((s >= config.min_scale).all()) for s in learned_scales.values())
    # the whole model is closer to the float one than MAS-init, in the learning's own metric
    valid = omni.inputs.attention_mask.bool()
    ids = omni.inputs.modality_ids

    def mae(out: torch.Tensor) -> float:
        return float(modality_weighted_mae(out, omni.reference, ids, valid, config.loss_weights))

    assert mae(learned_logits) <= mae(init_logits), (mae(learned_logits), mae(init_logits))

    # learned scales keep the smoothing exact (the routers share the tables), HF weights untouched
    with quantizers_off(context.graph_module):
        torch.testing.assert_close(logits(context, omni.inputs), omni.reference, rtol=0, atol=1e-4)
    assert all(torch.equal(v, hf_state[k]) for k, v in omni.model.state_dict().items())


def test_mas_learning_clamps_to_min_scale_and_leaves_folded_scales_fixed(omni, monkeypatch):
    smallest_before_step: list[float] = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        smallest_before_step.append(min(float(p.detach().min()) for g in self.param_groups for p in g["params"]))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    context = smoothed(omni, TIED_FOLDED, W4, A8)
    mods = modules(context)
    init = _scale_tables(context)
    learnable = {n for n, m in mods.items() if m.scales is not None and not m.scales_folded}
    assert learnable == {f"layers.{i}.self_attn.o_proj" for i in range(2)}
    floor = float(torch.cat([init[n].flatten() for n in learnable]).quantile(0.25))
    config = MASLearningConfig(epochs=1, min_scale=floor)
    Pipeline([LearnMAS(config, progress=False)]).run(context, progress=False)
    learned = _scale_tables(context)
    assert len(smallest_before_step) == 2 and min(smallest_before_step) >= floor  # one step per layer
    for name in init:
        if name in learnable:
            assert (learned[name] >= floor).all() and not torch.equal(learned[name], init[name])
        else:  # folded into the norm: fixed
            assert torch.equal(learned[name], init[name])
    with quantizers_off(context.graph_module):
        torch.testing.assert_close(logits(context, omni.inputs), omni.reference, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- 9. modality-weighted MAE


def test_modality_weighted_mae_by_hand():
    # one sequence of 5 tokens, d = 2; token 4 is padding
    target = torch.zeros(1, 5, 2)
    output = torch.tensor([[[1.0, 3.0], [2.0, -2.0], [0.0, 6.0], [4.0, 4.0], [100.0, 100.0]]])
    ids = torch.tensor([[0, 1, 2, 0, 1]])  # text, vision, audio, text, (pad)
    valid = torch.tensor([[True, True, True, True, False]])
    # per-token mean |Δ|: 2, 2, 3, 4 (pad: 100) → text mean 3, vision 2, audio 3
    weights = (1.0, 0.5, 1.0)
    mean = modality_weighted_mae(output, target, ids, valid, weights)
    assert float(mean) == pytest.approx((1.0 * 3 + 0.5 * 2 + 1.0 * 3) / 2.5)
    official = modality_weighted_mae(output, target, ids, valid, weights, "official")
    # Σ_m w_m Σ_{i∈m} Σ_c |Δ| / (d · N): (1·(4 + 8) + 0.5·4 + 1·6) / (2 · 4)
    assert float(official) == pytest.approx((12 + 2 + 6) / 8)

    # a zero-weight modality is ignored in the mean (not in the normalisation)...
    assert float(modality_weighted_mae(output, target, ids, valid, (1.0, 0.0, 1.0))) == pytest.approx(3.0)
    # ...but its tokens still count in the official denominator (spec §5.7)
    assert float(modality_weighted_mae(output, target, ids, valid, (1.0, 0.0, 1.0), "official")) == pytest.approx(18 / 8)
    # an absent modality (no audio token) drops out of the mean
    no_audio = torch.tensor([[0, 1, 0, 0, 1]])
    # text tokens 0, 2, 3: 2, 3, 4 → 3; vision 2
    assert float(modality_weighted_mae(output, target, no_audio, valid, weights)) == pytest.approx((3 + 0.5 * 2) / 1.5)
    # all weights zero or no valid token: 0, not NaN
    assert float(modality_weighted_mae(output, target, ids, valid, (0.0, 0.0, 0.0))) == 0.0
    assert float(modality_weighted_mae(output, target, ids, torch.zeros_like(valid), weights)) == 0.0


def test_modality_weighted_mae_is_differentiable():
    out = torch.randn(2, 3, 4, requires_grad=True)
    loss = modality_weighted_mae(out, torch.zeros(2, 3, 4), torch.tensor([[0, 1, 2]] * 2), torch.ones(2, 3, dtype=torch.bool), (1.0, 0.5, 1.0))
    loss.backward()
    assert out.grad is not None and out.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- 10. static per-tensor


def smoothed_absmax(context: Context, module: QuantLinear) -> torch.Tensor:
    """max over modalities m and channels j of absmax_m[j] / s[row(m)][j], from the observed stats."""
    stats = context.stats[module.name]
    if module.scales is None:
        return stats.all_tokens().absmax.max()
    rows = module.row_of_modality
    return torch.stack([(stats.of(m).absmax / module.scales.detach()[rows[m]]).max() for m in Modality]).max()


@pytest.mark.parametrize(
    "config, grid",
    [(PER_LINEAR, "full"), (TIED_ROUTED, "restricted"), (TIED_FOLDED, "full")],
    ids=["per_linear", "tied_routed", "tied_folded"],
)
def test_static_per_tensor_activation_scale_is_the_smoothed_calibration_absmax(omni, config, grid):
    aq = ActQuantConfig(bits=8, granularity="per_tensor", grid=grid)
    context = smoothed(omni, config, W4, aq)
    mods = modules(context)

    # what each QuantLinear really quantizes on the calibration data: x ⊘ s[m] over valid tokens
    seen: dict[str, torch.Tensor] = {}
    valid = omni.inputs.attention_mask.bool()
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, args: seen.__setitem__(mod.name, mod.smooth_input(*args)[valid].abs().max())
        )
        for m in mods.values()
    ]
    try:
        with quantizers_off(context.graph_module):
            logits(context, omni.inputs)
    finally:
        for h in hooks:
            h.remove()

    for name, module in mods.items():
        assert isinstance(module.act_static_scale, float)
        assert module.act_static_scale == float(calibrate_static_scale(smoothed_absmax(context, module), aq)), name
        torch.testing.assert_close(torch.tensor(module.act_static_scale), calibrate_static_scale(seen[name], aq), rtol=1e-5, atol=0)

    out = logits(context, omni.inputs)
    assert torch.isfinite(out).all() and (out - omni.reference).abs().max() > 1e-3


def test_static_activation_quantization_needs_calibration(omni):
    context = Context(omni.fresh(), [omni.inputs])
    Pipeline([PrepareQuantLinears()]).run(context, progress=False)
    with pytest.raises(ValueError, match="calibration statistics"):
        Pipeline([QuantizeActivations(ActQuantConfig(granularity="per_tensor"))]).run(context, progress=False)


def test_static_activation_scales_follow_the_learned_smoothing_scales(omni):
    """After MAS learning the per-tensor scales must be those of the *learned* x ⊘ s, not of the init."""
    aq = ActQuantConfig(bits=8, granularity="per_tensor")
    context = smoothed(omni, PER_LINEAR, W4, aq)
    Pipeline([LearnMAS(MASLearningConfig(epochs=1), progress=False)]).run(context, progress=False)
    for module in quant_linears(context.graph_module):
        assert module.act_static_scale == float(calibrate_static_scale(smoothed_absmax(context, module), aq)), module.name
