"""Cross-modal compensation (CMC): properties and behaviour of the implementation.

Graph-level checks run on deep copies of one captured tiny Qwen2.5-Omni thinker (text + image +
audio, 4 rows) calibrated once per module; module-level properties run on a single
:class:`QuantLinear` traced into its own graph, with random weights, scales and activations
(hypothesis). Expected values come from the float weights, the installed scales, the observed
statistics and :mod:`masq_fx.quantizers`; ``Whitening`` and ``low_rank_factors`` are tested as
building blocks in their own right.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, replace

import pytest
import torch
from helpers import graph_of
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from masq_fx.calibration import ModalityStats
from masq_fx.calibration.calibrate import observe
from masq_fx.capture.decoder import CapturedDecoder, capture
from masq_fx.modality import Modality
from masq_fx.models import DecoderInputs, adapter_for
from masq_fx.models.tiny import tiny_model
from masq_fx.nn.quant_linear import QuantLinear, quantizers_off
from masq_fx.pipeline import Context, Pipeline
from masq_fx.quantizers import ActQuantConfig, WeightQuantConfig, fake_quant_act, fake_quant_weight
from masq_fx.recipes import Recipe, preset, recipe_steps
from masq_fx.transforms import quant_linears
from masq_fx.transforms.cmc import (
    BranchReport,
    CMCConfig,
    CrossModalCompensation,
    ProjectScales,
    Whitening,
    low_rank_factors,
)
from masq_fx.transforms.gptq import GPTQConfig

TEXT, VISION, AUDIO = Modality.TEXT, Modality.VISION, Modality.AUDIO
W4 = WeightQuantConfig(bits=4)
A8 = ActQuantConfig(bits=8)
MAS_INIT = preset("mas-init", 4, 8)
MAS_INIT_TIED = preset("mas-init", 4, 8, variant="tied")  # 3 rows: routed, not folded


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- tiny-model helpers


@dataclass
class Omni:
    captured: CapturedDecoder  # pristine: every test works on a deep copy
    inputs: DecoderInputs
    stats: dict  # Σxᵀx of vision and audio (the default observers)
    reference: torch.Tensor  # float logits


@pytest.fixture(scope="module")
def omni() -> Omni:
    tiny = tiny_model("qwen2.5-omni-thinker", seed=0, batch_size=4)
    inputs = adapter_for(tiny.model).decoder_inputs(tiny.batch)
    captured = capture(tiny.model)
    with torch.no_grad():
        reference = captured(inputs)
    stats = observe(Context(copy.deepcopy(captured), [inputs]), progress=False).stats
    return Omni(captured, inputs, stats, reference)


def mas_init(omni: Omni, recipe: Recipe = MAS_INIT, stats: dict | None = None) -> Context:
    """A fresh MAS-init (W4A8, per-linear, per-modality scales) context: the MAS simulation graph."""
    context = Context(copy.deepcopy(omni.captured), [omni.inputs], stats=stats or omni.stats, provided={"stats"})
    return Pipeline(recipe_steps(recipe, progress=False)).run(context, progress=False)


def run_cmc(context: Context, config: CMCConfig) -> CrossModalCompensation:
    cmc = CrossModalCompensation(config)
    Pipeline([cmc]).run(context, progress=False)
    return cmc


@torch.no_grad()
def logits(context: Context, inputs: DecoderInputs) -> torch.Tensor:
    return context.captured(inputs)


def modules(context: Context) -> dict[str, QuantLinear]:
    return {m.name: m for m in quant_linears(context.graph_module)}


def multi_row(context: Context) -> list[QuantLinear]:
    return [m for m in quant_linears(context.graph_module) if m.scales is not None and m.scales.shape[0] > 1]


def branches(context: Context):
    """(module, modality, row, L, R) of every installed branch, L and R in float64."""
    for module in multi_row(context):
        for modality in (VISION, AUDIO):
            row = int(module.row_of_modality[modality])
            if row in module.branches:
                left, right = module.branches[row]
                yield module, modality, row, left.double(), right.double()


def text_weight(module: QuantLinear) -> torch.Tensor:
    """Q_w(W·diag(s_t)) in float64 (the single stored weight)."""
    s_t = module.scales.detach()[int(module.row_of_modality[TEXT])]
    return fake_quant_weight(module.weight.detach().float() * s_t, module.weight_quant).double()


def row_weight(module: QuantLinear, row: int, quantized: bool) -> torch.Tensor:
    """W·diag(s_m) (float64) or Q_w(W·diag(s_m))."""
    s = module.scales.detach()[row]
    if quantized:
        return fake_quant_weight(module.weight.detach().float() * s, module.weight_quant).double()
    return module.weight.detach().double() * s.double()


def float32_factor_bound(left: torch.Tensor, right: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |L₃₂R₃₂ − LR|: L and R are stored in float32 (relative error 2⁻²⁴ each)."""
    return 1e-6 * (left.abs() @ right.abs()) + 1e-9 * reference.abs().max()


def record_inputs(context: Context) -> tuple[dict[str, tuple], list]:
    """Forward pre-hooks storing each QuantLinear's (x, modality_ids)."""
    seen: dict[str, tuple] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: seen.__setitem__(mod.name, tuple(a.detach() for a in args)))
        for m in quant_linears(context.graph_module)
    ]
    return seen, hooks


# ----------------------------------------------------------------------------- single-linear helpers


@dataclass
class LinearCase:
    module: QuantLinear
    x: torch.Tensor  # [N, in] calibration tokens
    ids: torch.Tensor  # [N]
    stats: ModalityStats


def linear_case(seed: int, d_in: int, d_out: int, tokens: int = 96, spread: float = 1.0, aniso: float = 2.0) -> LinearCase:
    """A 3-row QuantLinear (W4) and anisotropic, correlated activations of all three modalities."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=gen)
    bias = torch.randn(d_out, generator=gen)
    scales = torch.exp((torch.rand(3, d_in, generator=gen) * 2 - 1) * spread)
    module = QuantLinear(weight, bias, "lin")
    module.set_scales(scales, torch.tensor([0, 1, 2]))
    module.set_quantizers(weight=W4)
    xs, ids = [], []
    for modality in Modality:  # each modality has its own channel spectrum and mixing
        mixing = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen))[0]
        spectrum = torch.exp(torch.randn(d_in, generator=gen) * aniso)
        xs.append((torch.randn(tokens, d_in, generator=gen) * spectrum) @ mixing + torch.randn(d_in, generator=gen))
        ids.append(torch.full((tokens,), int(modality)))
    x, ids = torch.cat(xs), torch.cat(ids)
    stats = ModalityStats.empty(d_in, (VISION, AUDIO))
    stats.update(x, ids)
    return LinearCase(module, x, ids, stats)


def compensate(case: LinearCase, config: CMCConfig, stats: ModalityStats | None = None) -> tuple[QuantLinear, CrossModalCompensation]:
    """Run the transform on a deep copy of ``case.module`` (traced into its own graph)."""
    module = copy.deepcopy(case.module)
    context = Context(captured=None, stats={module.name: stats or case.stats})
    cmc = CrossModalCompensation(config)
    cmc(graph_of(module), context)
    return module, cmc


def calibration_error(case: LinearCase, module: QuantLinear, modality: Modality, error_t: torch.Tensor) -> float:
    """Σ over calibration tokens of ``modality`` of ‖x̃(Eᵀ − LR)‖², x̃ = x ⊘ s_m (float64)."""
    row = int(module.row_of_modality[modality])
    left, right = module.branches[row]
    x_tilde = case.x[case.ids == int(modality)].double() / module.scales.detach()[row].double()
    return float((x_tilde @ (error_t - left.double() @ right.double())).square().sum())


def spd(seed: int, n: int, k: int, aniso: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A PSD moment Σxᵀx of ``k`` anisotropic tokens in ``n`` channels (rank min(n, k)) and positive scales."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(k, n, generator=gen, dtype=torch.float64) * torch.exp(torch.randn(n, generator=gen, dtype=torch.float64) * aniso)
    scale = torch.exp(torch.randn(n, generator=gen)).float()
    return x.T @ x, scale


def damped(moment: torch.Tensor, scale: torch.Tensor, damping: float) -> torch.Tensor:
    inv = 1.0 / scale.double()
    c = moment * inv[:, None] * inv[None, :]
    return c + damping * c.diagonal().mean() * torch.eye(c.shape[0], dtype=torch.float64)


# ----------------------------------------------------------------------------- 1. full rank is exact


@pytest.mark.parametrize("recipe", [MAS_INIT, MAS_INIT_TIED], ids=["per_linear", "tied_routed"])
def test_full_rank_float_target_reproduces_the_smoothed_float_weight(omni, recipe):
    context = mas_init(omni, recipe)
    cmc = run_cmc(context, CMCConfig(rank_ratio=1.0))
    checked = 0
    for module, modality, row, left, right in branches(context):
        assert left.shape == (module.in_features, min(module.in_features, module.out_features))
        target = row_weight(module, row, quantized=False)
        got = text_weight(module) + (left @ right).T  # installed float32 factors
        bound = float32_factor_bound(left, right, target).T
        assert ((got - target).abs() <= bound).all(), (module.name, modality, (got - target).abs().max())
        # the same in float64 (the factors before storage): exact up to float64 rounding
        moment = omni.stats[module.name].moments[modality]
        whitening = Whitening.from_moment(moment, module.scales.detach()[row], 0.01)
        rank = min(module.in_features, module.out_features)
        left64, right64, _ = low_rank_factors((target - text_weight(module)).T, whitening, rank)
        torch.testing.assert_close(text_weight(module) + (left64 @ right64).T, target, rtol=0, atol=1e-11 * target.abs().max())
        checked += 1
    assert checked == 24 == len(cmc.reports)  # 2 layers × (q, k, v, o, gate, up) × (vision, audio)


def test_full_rank_quantized_target_reproduces_the_mas_simulation_weights(omni):
    context = mas_init(omni)
    run_cmc(context, CMCConfig(rank_ratio=1.0, target="quantized"))
    for module, modality, row, left, right in branches(context):
        target = row_weight(module, row, quantized=True)
        got = text_weight(module) + (left @ right).T
        assert ((got - target).abs() <= float32_factor_bound(left, right, target).T).all(), (module.name, modality)
        assert (target - row_weight(module, row, quantized=False)).abs().max() > 1e-3  # really the quantized one


@pytest.mark.parametrize("recipe", [MAS_INIT, MAS_INIT_TIED], ids=["per_linear", "tied_routed"])
def test_full_rank_quantized_cmc_graph_equals_the_mas_simulation_graph(omni, recipe):
    """Weight-only quantization (W4A16): the CMC graph computes the MAS simulation's logits."""
    context = mas_init(omni, recipe)
    for module in quant_linears(context.graph_module):
        module.set_quantizers(activation=None)
    simulation = logits(context, omni.inputs)
    assert (simulation - omni.reference).abs().max() > 1e-3  # weights really quantized
    uncompensated = copy.deepcopy(context)
    for module in multi_row(uncompensated):
        module.use_text_weight()
    run_cmc(context, CMCConfig(rank_ratio=1.0, target="quantized"))
    assert all(m.weight_rows == "text" and len(m.branches) == 2 for m in multi_row(context))
    compensated = logits(context, omni.inputs)
    torch.testing.assert_close(compensated, simulation, rtol=0, atol=1e-4)
    # without the branches, the text weight is badly wrong for image and audio tokens
    assert (logits(uncompensated, omni.inputs) - simulation).abs().max() > 1e-2


def test_full_rank_branches_with_activation_quantization_follow_the_spec_algebra(omni):
    """W4A8, module by module on the same inputs (spec §8.5):

    * target quantized, branch on Q_a(x̃): exactly the MAS simulation's output;
    * target quantized, branch on x̃: MAS simulation + (x̃ − Q_a(x̃))·(Q(W s_m) − Q(W s_t))ᵀ;
    * target float, branch on x̃: x·Wᵀ + b + (Q_a(x̃) − x̃)·Q(W s_t)ᵀ (only the activation error is left).
    """
    simulation = mas_init(omni)
    configs = {
        "q_quant": CMCConfig(rank_ratio=1.0, target="quantized", branch_input="quantized"),
        "q_smooth": CMCConfig(rank_ratio=1.0, target="quantized"),
        "f_smooth": CMCConfig(rank_ratio=1.0),
    }
    contexts = {}
    for key, config in configs.items():
        contexts[key] = copy.deepcopy(simulation)
        run_cmc(contexts[key], config)
    seen, hooks = record_inputs(contexts["q_quant"])
    try:
        logits(contexts["q_quant"], omni.inputs)
    finally:
        for hook in hooks:
            hook.remove()
    sim = modules(simulation)
    got = {key: modules(c) for key, c in contexts.items()}
    checked = 0
    with torch.no_grad():
        for name, module in sim.items():
            if module.scales is None or module.scales.shape[0] < 2:
                continue
            x, ids = seen[name]
            y_sim = module(x, ids).double()
            scale = y_sim.abs().max()
            xs = module.smooth_input(x, ids)
            xq = fake_quant_act(xs, module.act_quant, module.act_static_scale)
            token_rows = module.row_of_modality[ids].unsqueeze(-1)
            extra = torch.zeros_like(y_sim)
            for row in (1, 2):
                delta = (row_weight(module, row, True) - text_weight(module)).T
                extra = torch.where(token_rows == row, (xs - xq).double() @ delta, extra)
            float_out = x.double() @ module.weight.double().T + module.bias.double() if module.bias is not None else x.double() @ module.weight.double().T
            act_error = (xq - xs).double() @ text_weight(module).T
            torch.testing.assert_close(got["q_quant"][name](x, ids).double(), y_sim, rtol=0, atol=2e-5 * scale)
            torch.testing.assert_close(got["q_smooth"][name](x, ids).double(), y_sim + extra, rtol=0, atol=2e-5 * scale)
            expected_float = torch.where(token_rows == 0, y_sim, float_out + act_error)
            torch.testing.assert_close(got["f_smooth"][name](x, ids).double(), expected_float, rtol=0, atol=2e-5 * scale)
            assert (extra.abs().max() > 1e-4 * scale) and ((expected_float - y_sim).abs().max() > 1e-3 * scale)
            checked += 1
    assert checked == 12


@settings(max_examples=15)
@given(
    seed=st.integers(0, 2**31 - 1),
    d_in=st.integers(4, 24),
    d_out=st.integers(4, 24),
    target=st.sampled_from(["float", "quantized"]),
    damping=st.sampled_from([0.0, 1e-3, 0.1]),
)
def test_full_rank_on_random_linears_is_exact_in_float64(seed, d_in, d_out, target, damping):
    case = linear_case(seed, d_in, d_out, tokens=max(4, d_in // 2))  # often fewer tokens than channels
    module = case.module
    base = text_weight(module)
    for modality in (VISION, AUDIO):
        row = int(module.row_of_modality[modality])
        goal = row_weight(module, row, quantized=target == "quantized")
        whitening = Whitening.from_moment(case.stats.moments[modality], module.scales.detach()[row], damping)
        left, right, sigma = low_rank_factors((goal - base).T, whitening, min(d_in, d_out))
        assert torch.isfinite(left).all() and torch.isfinite(right).all()
        # a singular undamped moment is floored at eigh's resolution n·eps·λ_max: T is then
        # conditioned ~1/√(n·eps), which costs ~√eps of the float64 accuracy
        rel = 1e-9 if damping > 0 else 1e-7
        torch.testing.assert_close(base + (left @ right).T, goal, rtol=0, atol=rel * goal.abs().max())
    installed, cmc = compensate(case, CMCConfig(rank_ratio=1.0, damping=damping, target=target))
    for report in cmc.reports:
        assert report.relative_error < 1e-9
        row = int(installed.row_of_modality[report.modality])
        left, right = (f.double() for f in installed.branches[row])
        goal = row_weight(installed, row, quantized=target == "quantized")
        assert ((base + (left @ right).T - goal).abs() <= float32_factor_bound(left, right, goal).T).all()


# ----------------------------------------------------------------------------- 2. error vs rank


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**31 - 1),
    d_in=st.integers(2, 20),
    d_out=st.integers(2, 20),
    tokens=st.integers(1, 40),
    damping=st.sampled_from([0.0, 1e-4, 1e-2, 1.0]),
    whiten=st.booleans(),
)
def test_whitened_error_does_not_grow_with_rank(seed, d_in, d_out, tokens, damping, whiten):
    moment, scale = spd(seed, d_in, tokens, aniso=1.5)
    gen = torch.Generator().manual_seed(seed + 1)
    error_t = torch.randn(d_in, d_out, generator=gen, dtype=torch.float64) * torch.exp(torch.randn(d_out, generator=gen, dtype=torch.float64))
    whitening = Whitening.from_moment(moment, scale, damping) if whiten else Whitening.identity(d_in)
    full = min(d_in, d_out)
    errors = []
    for rank in range(1, full + 1):
        left, right, sigma = low_rank_factors(error_t, whitening, rank)
        assert left.shape == (d_in, rank) and right.shape == (rank, d_out)
        errors.append(float((whitening.t @ (error_t - left @ right)).norm()))
        # Eckart–Young: the residual is the energy of the dropped singular values
        assert errors[-1] == pytest.approx(float(sigma[rank:].square().sum().sqrt()), rel=1e-6, abs=1e-9 * float(sigma[0]))
    total = float((whitening.t @ error_t).norm())
    assert all(b <= a + 1e-9 * total for a, b in zip(errors, errors[1:])), errors
    assert errors[0] <= total * (1 + 1e-12)
    assert errors[-1] <= 1e-9 * total


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    d_in=st.integers(4, 16),
    d_out=st.integers(4, 16),
    keep=st.integers(0, 4),
)
def test_own_channels_make_the_scale_mismatch_fit_the_rank(seed, d_in, d_out, keep):
    """With a modality's own scale on ``k`` channels only, its mismatch ``W·diag(s_m − s_t)`` has rank ≤ k:
    a rank-k branch leaves at most the text weight's quantization error on that modality's tokens."""
    case = linear_case(seed, d_in, d_out, spread=1.5)
    rank = max(keep, 1)
    module, _ = compensate(case, CMCConfig(rank=rank, own_channels="rank" if keep else 0, damping=0.0))
    scales = module.scales.detach().double()
    text = scales[int(module.row_of_modality[TEXT])]
    original = case.module.scales.detach().double()
    for modality in (VISION, AUDIO):
        row = int(module.row_of_modality[modality])
        own = scales[row] != text
        assert int(own.sum()) <= keep
        assert torch.equal(scales[row][own], original[row][own])  # kept channels keep the learned scale
        base = text_weight(module).double()
        error_t = (module.weight.double() * scales[row] - base).T
        quant_only = (module.weight.double() * text - base).T
        with_branch = calibration_error(case, module, modality, error_t)
        x_tilde = case.x[case.ids == int(modality)].double() / scales[row]
        assert with_branch <= float((x_tilde @ quant_only).square().sum()) * (1 + 1e-6) + 1e-9


def test_own_channels_refuse_bad_values_and_solved_weights():
    for bad in (-1, 1.5, True, "all"):
        with pytest.raises(ValueError, match="own_channels"):
            CMCConfig(own_channels=bad)
    case = linear_case(0, 8, 8)
    case.module.set_solved({row: case.module.weight_codes(row) for row in case.module.stored_rows()})
    with pytest.raises(ValueError, match="run ProjectScales before GPTQ"):
        compensate(case, CMCConfig(own_channels="rank"))


def test_project_scales_alone_then_cmc_is_cmc_with_own_channels(omni):
    config = CMCConfig(rank=2, own_channels="rank")
    with pytest.raises(ValueError, match="needs CMCConfig.own_channels"):
        Pipeline([ProjectScales(CMCConfig())]).run(mas_init(omni), progress=False)
    together, apart = mas_init(omni), mas_init(omni)
    run_cmc(together, config)
    Pipeline([ProjectScales(config), CrossModalCompensation(config)]).run(apart, progress=False)
    assert torch.equal(logits(together, omni.inputs), logits(apart, omni.inputs))
    for module in multi_row(apart):
        assert torch.equal(module.scales, modules(together)[module.name].scales)


def test_recipe_projects_the_scales_before_gptq_solves_the_weights(omni):
    """own_channels with GPTQ: the recipe confines the scale mismatch first, GPTQ solves the text weight,
    and the full-rank branches then reach the projected rows' smoothed weights from the solved one."""
    stats = observe(Context(copy.deepcopy(omni.captured), [omni.inputs]), moment_modalities=tuple(Modality), progress=False).stats
    recipe = replace(MAS_INIT, cmc=CMCConfig(rank_ratio=1.0, own_channels=2), gptq=GPTQConfig())
    steps = [type(step).__name__ for step in recipe_steps(recipe, progress=False)]
    assert steps.index("ProjectScales") < steps.index("GPTQWeights") < steps.index("CrossModalCompensation")
    context = mas_init(omni, recipe, stats)
    checked = 0
    for module, _modality, row, left, right in branches(context):
        scales = module.scales.detach()
        text = scales[int(module.row_of_modality[TEXT])]
        assert module.has_solved_weights and int((scales[row] != text).sum()) <= 2
        base = module.quantized_weight(int(module.row_of_modality[TEXT])).double()
        target = module.weight.double() * scales[row].double()
        assert ((base + (left @ right).T - target).abs() <= float32_factor_bound(left, right, target).T).all()
        checked += 1
    assert checked == 24


# ----------------------------------------------------------------------------- 3. Whitening


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 24),
    extra_tokens=st.integers(0, 30),
    damping=st.sampled_from([0.0, 1e-3, 0.01, 1.0]),
)
def test_whitening_factor_of_a_full_rank_moment(seed, n, extra_tokens, damping):
    moment, scale = spd(seed, n, n + extra_tokens, aniso=1.0)
    w = Whitening.from_moment(moment, scale, damping)
    c = damped(moment, scale, damping)
    assert w.t.dtype == w.t_inv.dtype == torch.float64
    torch.testing.assert_close(w.t.T @ w.t, c, rtol=0, atol=1e-11 * c.abs().max())
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(w.t_inv @ w.t, eye, rtol=0, atol=1e-6)
    torch.testing.assert_close(w.t @ w.t_inv, eye, rtol=0, atol=1e-6)


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(2, 24),
    tokens=st.integers(0, 23),
    damping=st.sampled_from([1e-3, 0.01, 0.5]),
)
def test_whitening_of_a_rank_deficient_moment_with_damping(seed, n, tokens, damping):
    tokens = min(tokens, n - 1)
    moment, scale = spd(seed, n, tokens, aniso=1.0)
    if tokens > 0:
        assert int(torch.linalg.matrix_rank(moment)) <= tokens < n
    w = Whitening.from_moment(moment, scale, damping)
    c = damped(moment, scale, damping) if tokens > 0 else torch.zeros(n, n, dtype=torch.float64)
    if tokens > 0:
        torch.testing.assert_close(w.t.T @ w.t, c, rtol=0, atol=1e-11 * c.abs().max())
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.isfinite(w.t_inv).all()
    torch.testing.assert_close(w.t_inv @ w.t, eye, rtol=0, atol=1e-8)
    torch.testing.assert_close(w.t @ w.t_inv, eye, rtol=0, atol=1e-8)


def test_whitening_identity():
    w = Whitening.identity(5)
    assert torch.equal(w.t, torch.eye(5, dtype=torch.float64)) and torch.equal(w.t_inv, w.t)


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 24), tokens=st.integers(1, 23))
def test_undamped_whitening_of_a_rank_deficient_moment_gives_finite_factors(seed, n, tokens):
    """damping=0 is allowed (the official code has none); fewer tokens than channels must not give inf."""
    tokens = min(tokens, n - 1)
    moment, scale = spd(seed, n, tokens, aniso=1.0)
    w = Whitening.from_moment(moment, scale, 0.0)
    assert torch.isfinite(w.t).all() and torch.isfinite(w.t_inv).all()
    c = damped(moment, scale, 0.0)
    torch.testing.assert_close(w.t.T @ w.t, c, rtol=0, atol=1e-11 * c.abs().max())
    gen = torch.Generator().manual_seed(seed)
    error_t = torch.randn(n, 7, generator=gen, dtype=torch.float64)
    for rank in range(1, min(n, 7) + 1):
        left, right, _ = low_rank_factors(error_t, w, rank)
        assert torch.isfinite(left).all() and torch.isfinite(right).all()
        # float32 storage must not overflow either
        assert torch.isfinite(left.float()).all() and torch.isfinite(right.float()).all()
    full = min(n, 7)
    left, right, _ = low_rank_factors(error_t, w, full)
    if full == n:  # full rank: L R = Eᵀ whatever the null space of C
        torch.testing.assert_close(left @ right, error_t, rtol=0, atol=1e-6)


def test_undamped_cmc_on_the_tiny_model_is_finite(omni):
    """Vision has 16 calibration tokens in 64 channels: its Σxᵀx is singular. damping=0 must still work."""
    assert int(omni.stats["layers.0.self_attn.q_proj"].count[VISION]) < 64
    context = mas_init(omni)
    simulation = logits(context, omni.inputs)
    run_cmc(context, CMCConfig(rank_ratio=0.2, damping=0.0))
    for module, modality, _row, left, right in branches(context):
        assert torch.isfinite(left).all() and torch.isfinite(right).all(), (module.name, modality)
    out = logits(context, omni.inputs)
    assert torch.isfinite(out).all()
    assert (out - simulation).abs().max() < 1.0


# ----------------------------------------------------------------------------- 4. whitened beats unwhitened


def test_whitened_branch_has_lower_calibration_error_on_tiny_model_linears(omni):
    """Σ_calibration tokens ‖x̃(Eᵀ − LR)‖², with the tokens each linear really reads in the float graph."""
    plain = mas_init(omni)
    whitened = copy.deepcopy(plain)
    seen, hooks = record_inputs(plain)
    try:
        with quantizers_off(plain.graph_module):
            logits(plain, omni.inputs)  # the float stream (quantizers off == float graph)
    finally:
        for hook in hooks:
            hook.remove()
    run_cmc(whitened, CMCConfig(rank_ratio=0.2, damping=1e-3))
    run_cmc(plain, CMCConfig(rank_ratio=0.2, whiten=False))
    valid = omni.inputs.attention_mask.bool()
    totals = {"whitened": 0.0, "plain": 0.0}
    strictly_better = 0
    for name, module in modules(whitened).items():
        if not module.branches:
            continue
        x, ids = seen[name]
        errors = {}
        for key, context in (("whitened", whitened), ("plain", plain)):
            other = modules(context)[name]
            per_modality = []
            for modality in (VISION, AUDIO):
                row = int(other.row_of_modality[modality])
                s = other.scales.detach()[row].double()
                x_tilde = x[valid & (ids == int(modality))].double() / s
                if not other.divide_input:  # tied: the router already divided
                    x_tilde = x[valid & (ids == int(modality))].double()
                error_t = (row_weight(other, row, False) - text_weight(other)).T
                left, right = (f.double() for f in other.branches[row])
                per_modality.append(float((x_tilde @ (error_t - left @ right)).square().sum()))
            errors[key] = per_modality
        for w, p in zip(errors["whitened"], errors["plain"]):
            assert w <= p * (1 + 1e-6), (name, errors)
            strictly_better += w < 0.99 * p
            totals["whitened"] += w
            totals["plain"] += p
    assert strictly_better >= 20  # of 24
    assert totals["whitened"] < 0.5 * totals["plain"], totals


@settings(max_examples=15)
@given(
    seed=st.integers(0, 2**31 - 1),
    d_in=st.integers(6, 24),
    d_out=st.integers(6, 24),
    ratio=st.sampled_from([0.1, 0.25, 0.5, 0.75]),
    damping=st.sampled_from([0.0, 1e-4, 1e-2]),
)
def test_whitened_branch_has_lower_calibration_error_on_anisotropic_random_data(seed, d_in, d_out, ratio, damping):
    case = linear_case(seed, d_in, d_out, tokens=3 * d_in, aniso=1.5)
    whitened, _ = compensate(case, CMCConfig(rank_ratio=ratio, damping=damping))
    plain, _ = compensate(case, CMCConfig(rank_ratio=ratio, whiten=False))
    rank = CMCConfig(rank_ratio=ratio).rank_for(d_in, d_out)
    assume(rank < min(d_in, d_out))
    base = text_weight(case.module)
    for modality in (VISION, AUDIO):
        row = int(case.module.row_of_modality[modality])
        error_t = (row_weight(case.module, row, False) - base).T
        w = calibration_error(case, whitened, modality, error_t)
        p = calibration_error(case, plain, modality, error_t)
        assert w < p, (modality, w, p)


# ----------------------------------------------------------------------------- 5. text untouched


def test_text_only_input_is_untouched_by_cmc(omni):
    cmc = mas_init(omni)
    simulation = copy.deepcopy(cmc)
    run_cmc(cmc, CMCConfig(rank_ratio=0.2))
    text_weight_only = mas_init(omni)  # MAS-init with the single text weight and no branches
    for module in multi_row(text_weight_only):
        module.use_text_weight()
    for module in multi_row(cmc):
        assert module.weight_rows == "text"
        assert set(module.branches) == {int(module.row_of_modality[VISION]), int(module.row_of_modality[AUDIO])}
        assert int(module.row_of_modality[TEXT]) not in module.branches
        assert module.cached_weights.shape[0] == 1
    all_text = replace(omni.inputs, modality_ids=torch.zeros_like(omni.inputs.modality_ids))
    text_logits = logits(cmc, all_text)
    assert torch.equal(text_logits, logits(text_weight_only, all_text))
    assert torch.equal(text_logits, logits(simulation, all_text))  # text tokens use the text row there too
    # a mixed batch: everything before the first image/audio token is bit-identical, after it the branches act
    mixed_cmc, mixed_base = logits(cmc, omni.inputs), logits(text_weight_only, omni.inputs)
    ids, valid = omni.inputs.modality_ids, omni.inputs.attention_mask.bool()
    for b in range(ids.shape[0]):
        first = int(torch.nonzero(ids[b] != int(TEXT))[0])
        assert torch.equal(mixed_cmc[b, :first], mixed_base[b, :first])
        assert (mixed_cmc[b, first:] - mixed_base[b, first:]).abs().max() > 1e-3
    # and the branches move the non-text tokens towards the MAS simulation
    target = logits(simulation, omni.inputs)
    assert (mixed_cmc - target)[valid].abs().mean() < (mixed_base - target)[valid].abs().mean()


# ----------------------------------------------------------------------------- 6. rank semantics & config


@pytest.mark.parametrize(
    "config, d_in, d_out, expected",
    [
        (CMCConfig(rank_ratio=0.2), 64, 128, 12),  # ⌊0.2·64⌋
        (CMCConfig(rank_ratio=0.2), 128, 32, 6),  # ⌊0.2·32⌋
        (CMCConfig(rank_ratio=0.5), 7, 9, 3),
        (CMCConfig(rank_ratio=1.0), 64, 32, 32),  # ratio 1 is full rank
        (CMCConfig(rank_ratio=0.01), 64, 64, 1),  # ⌊0.64⌋ = 0 → at least 1
        (CMCConfig(rank=8), 64, 128, 8),  # absolute
        (CMCConfig(rank=100), 64, 32, 32),  # capped at min(d_in, d_out)
        (CMCConfig(rank_ratio=0.2, rank_floor=32), 64, 128, 32),  # official floor
        (CMCConfig(rank_ratio=0.2, rank_floor=32), 16, 8, 8),  # floor capped at full rank
        (CMCConfig(rank=4, rank_floor=10), 64, 64, 10),
        (CMCConfig(rank_ratio=0.2, rank_floor=3), 64, 64, 12),  # floor below the ratio's rank
    ],
)
def test_rank_for(config, d_in, d_out, expected):
    assert config.rank_for(d_in, d_out) == expected


@pytest.mark.parametrize(
    "config, k_rank, q_rank",
    [
        (CMCConfig(rank_ratio=0.2), 6, 12),  # k_proj is 64 → 32, q_proj 64 → 64
        (CMCConfig(rank=20), 20, 20),
        (CMCConfig(rank=40), 32, 40),
        (CMCConfig(rank_ratio=0.1, rank_floor=16), 16, 16),
    ],
)
def test_installed_branch_ranks(omni, config, k_rank, q_rank):
    context = mas_init(omni)
    cmc = run_cmc(context, config)
    mods = modules(context)
    for name, rank in (("layers.0.self_attn.k_proj", k_rank), ("layers.1.self_attn.q_proj", q_rank)):
        for left, right in mods[name].branches.values():
            assert left.shape == (64, rank) and right.shape == (rank, mods[name].out_features)
    for module, _, _, left, _ in branches(context):
        assert left.shape[1] == config.rank_for(module.in_features, module.out_features)
    assert {r.rank for r in cmc.reports if r.module == "layers.0.self_attn.k_proj"} == {k_rank}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=8, rank_ratio=0.5), "at most one"),
        (dict(rank_ratio=0.0), "rank_ratio"),
        (dict(rank_ratio=-0.1), "rank_ratio"),
        (dict(rank_ratio=1.5), "rank_ratio"),
        (dict(rank_ratio=float("nan")), "rank_ratio"),
        (dict(rank=0), "rank must be at least 1"),
        (dict(damping=-1e-3), "damping"),
        (dict(damping=float("nan")), "damping"),
        (dict(target="both"), "target"),
        (dict(branch_input="raw"), "branch_input"),
    ],
)
def test_cmc_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CMCConfig(**kwargs)


def test_cmc_config_defaults():
    config = CMCConfig()
    assert (config.rank_ratio, config.rank, config.rank_floor, config.damping) == (None, None, 0, 0.01)
    assert config.rank_for(100, 50) == 10  # neither rank field set: ratio 0.2
    assert CMCConfig(rank=8).rank_for(64, 128) == 8
    assert (config.target, config.whiten, config.branch_input) == ("float", True, "smoothed")
    CMCConfig(damping=0.0)  # allowed: the official code has no damping


def test_cmc_skips_float_linears_and_needs_enabled_quantizers():
    case = linear_case(0, 8, 6)
    case.module.set_quantizers(weight=None)  # left out of quantization: exact per row, nothing to compensate
    module, _ = compensate(case, CMCConfig())
    assert not module.branches and module.weight_rows == case.module.weight_rows
    case = linear_case(0, 8, 6)
    with case.module.quantizers_off(), pytest.raises(ValueError, match="no active weight quantizer"):
        compensate(case, CMCConfig())


# ----------------------------------------------------------------------------- 7. absent statistics


def test_modality_without_second_moment_gets_an_unwhitened_branch_and_a_warning(omni):
    vision_only = observe(Context(copy.deepcopy(omni.captured), [omni.inputs]), (VISION,), progress=False).stats
    assert set(vision_only["layers.0.self_attn.q_proj"].moments) == {VISION}
    context = mas_init(omni, stats=vision_only)
    with pytest.warns(UserWarning, match=r"no second-moment statistics of audio: their CMC branches are unwhitened") as record:
        cmc = run_cmc(context, CMCConfig())
    messages = [str(w.message) for w in record if "second-moment" in str(w.message)]
    assert len(messages) == 1 and "vision" not in messages[0]  # one warning, naming only audio
    for module in multi_row(context):
        assert len(module.branches) == 2
        assert module.weight_rows == "text"
    assert {r.modality for r in cmc.reports} == {VISION, AUDIO}
    # the audio branch equals the unwhitened one
    unwhitened = mas_init(omni, stats=vision_only)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="no second-moment")
        run_cmc(unwhitened, CMCConfig(whiten=False))
    for a, b in zip(multi_row(context), multi_row(unwhitened)):
        row = int(a.row_of_modality[AUDIO])
        torch.testing.assert_close(a.branches[row][0] @ a.branches[row][1], b.branches[row][0] @ b.branches[row][1])


def test_modality_absent_from_calibration_gets_no_branch_without_a_cmc_warning(omni):
    ids = omni.inputs.modality_ids
    no_audio = replace(omni.inputs, modality_ids=torch.where(ids == int(AUDIO), int(TEXT), ids))
    stats = observe(Context(copy.deepcopy(omni.captured), [no_audio]), progress=False).stats
    with pytest.warns(UserWarning, match="calibration has no audio"):
        context = mas_init(omni, stats=stats)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="no second-moment")
        cmc = run_cmc(context, CMCConfig())
    for module in multi_row(context):
        assert module.row_of_modality.tolist() == [0, 1, 0]
        assert set(module.branches) == {1}
    assert {r.modality for r in cmc.reports} == {VISION}
    # audio tokens are computed exactly as text tokens
    assert torch.equal(logits(context, omni.inputs), logits(context, no_audio))


# ----------------------------------------------------------------------------- 8. diagnostics


def test_branch_reports(omni):
    reports = {}
    for ratio in (0.2, 0.5, 1.0):
        context = mas_init(omni)
        cmc = run_cmc(context, CMCConfig(rank_ratio=ratio))
        reports[ratio] = {(r.module, r.modality): r for r in cmc.reports}
        assert len(cmc.reports) == 24 and all(isinstance(r, BranchReport) for r in cmc.reports)
        mods = modules(context)
        for report in cmc.reports:
            module = mods[report.module]
            d_in, d_out = module.in_features, module.out_features
            assert report.rank == CMCConfig(rank_ratio=ratio).rank_for(d_in, d_out)
            assert 0.0 <= report.relative_error <= 1.0
            assert 1.0 <= report.effective_rank <= min(d_in, d_out)
            assert report.overhead == pytest.approx(report.rank * (d_in + d_out) / (d_in * d_out), rel=1e-12)
            if ratio == 1.0:
                assert report.relative_error < 1e-9
            else:
                assert report.relative_error > 1e-4
    for key, full in reports[1.0].items():
        assert reports[0.5][key].relative_error <= reports[0.2][key].relative_error + 1e-12
        # the effective rank describes T·Eᵀ, independent of the truncation
        assert full.effective_rank == pytest.approx(reports[0.2][key].effective_rank, rel=1e-9)
    assert reports[1.0][("layers.0.self_attn.q_proj", VISION)].overhead == pytest.approx(2.0)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), d_in=st.integers(4, 16), d_out=st.integers(4, 16), ratio=st.sampled_from([0.25, 0.5, 1.0]))
def test_report_relative_error_is_the_dropped_singular_energy(seed, d_in, d_out, ratio):
    case = linear_case(seed, d_in, d_out)
    config = CMCConfig(rank_ratio=ratio)
    module, cmc = compensate(case, config)
    for report in cmc.reports:
        row = int(module.row_of_modality[report.modality])
        whitening = Whitening.from_moment(case.stats.moments[report.modality], module.scales.detach()[row], config.damping)
        sigma = torch.linalg.svdvals(whitening.t @ (row_weight(module, row, False) - text_weight(module)).T)
        expected = float((sigma[report.rank :].square().sum() / sigma.square().sum()).sqrt())
        assert report.relative_error == pytest.approx(expected, rel=1e-6, abs=1e-10)
        p = sigma / sigma.sum()
        assert report.effective_rank == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-9)


# ----------------------------------------------------------------------------- 9. quantizers off


def test_quantizers_off_after_cmc_gives_the_float_logits(omni):
    context = mas_init(omni)
    run_cmc(context, CMCConfig(rank_ratio=0.2))
    quantized = logits(context, omni.inputs)
    assert (quantized - omni.reference).abs().max() > 1e-3
    with quantizers_off(context.graph_module):
        torch.testing.assert_close(logits(context, omni.inputs), omni.reference, rtol=0, atol=1e-4)
    # back on: the cached text weight and the branches again
    assert torch.equal(logits(context, omni.inputs), quantized)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), branch_input=st.sampled_from(["smoothed", "quantized"]))
def test_quantizers_off_single_linear_is_the_float_linear(seed, branch_input):
    case = linear_case(seed, 12, 9)
    module, _ = compensate(case, CMCConfig(rank_ratio=0.5, branch_input=branch_input))
    module.set_quantizers(activation=A8)
    expected = case.x.double() @ module.weight.double().T + module.bias.double()
    with module.quantizers_off():
        torch.testing.assert_close(module(case.x, case.ids).double(), expected, rtol=1e-5, atol=1e-4)
