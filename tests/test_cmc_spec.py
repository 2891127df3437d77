"""Cross-modal compensation checked against the specification's formulas, written out here.

Spec §8 and the CMC issue, for a linear ``W`` [out, in] with per-modality smoothing scales and a
non-text modality ``m`` whose calibration activations (on the float stream) are ``X_m``::

    C   = Σ xᵀx over the tokens of m                    (float64)
    C̃  = D⁻¹ C D⁻¹ + λ·mean(diag(D⁻¹ C D⁻¹))·I         (D = diag(s_m))
    T   : any factor with TᵀT = C̃                       (here: Cholesky C̃ = GGᵀ, T = Gᵀ)
    E   = W·diag(s_m) − Q(W·diag(s_t))                   (target "float")
        = Q(W·diag(s_m)) − Q(W·diag(s_t))                (target "quantized")
    T·Eᵀ = U Σ Vᵀ;   L = T⁻¹ U_r;   R = Σ_r V_rᵀ

Factorizations of C̃ (Cholesky here, an eigendecomposition in the implementation) differ by an
orthogonal rotation and the SVD by signs, but the product ``L·R`` is unique when ``σ_r > σ_{r+1}``:
that product is compared with what the transform installs in the :class:`QuantLinear`. Only the
public transform (``CrossModalCompensation``, ``CMCConfig``) is imported from the CMC module; the
quantizer ``Q`` is :func:`masq_fx.quantizers.fake_quant_weight` (per-output-channel symmetric).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import graph_of
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from masq_fx.calibration import ModalityStats
from masq_fx.calibration.calibrate import observe
from masq_fx.capture.decoder import capture
from masq_fx.modality import Modality
from masq_fx.models import adapter_for
from masq_fx.models.tiny import tiny_model
from masq_fx.nn.quant_linear import QuantLinear
from masq_fx.pipeline import Context, Pipeline
from masq_fx.quantizers import ActQuantConfig, WeightQuantConfig, fake_quant_act, fake_quant_weight
from masq_fx.recipes import preset, recipe_steps
from masq_fx.transforms import quant_linears
from masq_fx.transforms.cmc import CMCConfig, CrossModalCompensation

TEXT, VISION, AUDIO = Modality.TEXT, Modality.VISION, Modality.AUDIO


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the spec, in plain torch


def spec_whitening(moment: torch.Tensor, s_m: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, T⁻¹) with TᵀT = C̃ = D⁻¹CD⁻¹ + λ·mean(diag(D⁻¹CD⁻¹))·I, from a Cholesky factor."""
    d_inv = torch.diag(1.0 / s_m.double())
    c_tilde = d_inv @ moment.double() @ d_inv
    c_tilde = c_tilde + damping * torch.diagonal(c_tilde).mean() * torch.eye(len(s_m), dtype=torch.float64)
    g = torch.linalg.cholesky(c_tilde)  # C̃ = G Gᵀ, G lower
    t = g.T  # TᵀT = G Gᵀ = C̃
    t_inv = torch.linalg.solve_triangular(t, torch.eye(len(s_m), dtype=torch.float64), upper=True)
    return t, t_inv


def spec_error(weight: torch.Tensor, s_t: torch.Tensor, s_m: torch.Tensor, wq: WeightQuantConfig, target: str) -> torch.Tensor:
    """E = W̃_m − Q(W·diag(s_t)) [out, in], float64 (the smoothed weights are float32, as stored)."""
    base = fake_quant_weight(weight.float() * s_t.float(), wq).double()
    if target == "quantized":
        goal = fake_quant_weight(weight.float() * s_m.float(), wq).double()
    else:
        goal = weight.double() * s_m.double()
    return goal - base


def spec_branch(error: torch.Tensor, t: torch.Tensor, t_inv: torch.Tensor, rank: int):
    """(L, R, σ): SVD of T·Eᵀ, L = T⁻¹U_r, R = Σ_r V_rᵀ."""
    u, sigma, vh = torch.linalg.svd(t @ error.T, full_matrices=False)
    return t_inv @ u[:, :rank], torch.diag(sigma[:rank]) @ vh[:rank], sigma


def assert_same_product(installed: tuple[torch.Tensor, torch.Tensor], left: torch.Tensor, right: torch.Tensor, error: torch.Tensor):
    """L_inst·R_inst == L·R up to the float32 storage of the installed factors."""
    got = installed[0].double() @ installed[1].double()
    expected = left @ right
    bound = 1e-6 * (left.abs() @ right.abs()) + 1e-9 * error.abs().max()
    assert ((got - expected).abs() <= bound).all(), (got - expected).abs().max()


def distinct_cut(sigma: torch.Tensor, rank: int) -> bool:
    """The rank-r product is unique (and numerically stable) when σ_r and σ_{r+1} are apart."""
    return rank >= len(sigma) or bool(sigma[rank - 1] - sigma[rank] > 1e-6 * sigma[0])


# ----------------------------------------------------------------------------- one QuantLinear


def compensated_linear(weight, bias, scales, wq, x, ids, config):
    """A 3-row QuantLinear in its own graph, observed on (x, ids), after the CMC transform."""
    module = QuantLinear(weight, bias, "lin")
    module.set_scales(scales, torch.tensor([0, 1, 2]))
    module.set_quantizers(weight=wq, activation=ActQuantConfig(bits=8))
    stats = ModalityStats.empty(weight.shape[1], (VISION, AUDIO))
    stats.update(x, ids)
    gm = graph_of(module)
    CrossModalCompensation(config)(gm, Context(captured=None, stats={"lin": stats}))
    return module


def random_case(seed: int, d_in: int, d_out: int, tokens: int):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=gen)
    bias = torch.randn(d_out, generator=gen)
    scales = torch.exp(torch.rand(3, d_in, generator=gen) * 3 - 1.5)
    xs, ids = [], []
    for modality in Modality:  # anisotropic, correlated, not centred
        mixing = torch.randn(d_in, d_in, generator=gen) * torch.exp(torch.randn(d_in, generator=gen))
        xs.append(torch.randn(tokens, d_in, generator=gen) @ mixing + torch.randn(d_in, generator=gen))
        ids.append(torch.full((tokens,), int(modality)))
    return weight, bias, scales, torch.cat(xs), torch.cat(ids)


@settings(max_examples=30)
@given(
    seed=st.integers(0, 2**31 - 1),
    d_in=st.integers(3, 20),
    d_out=st.integers(3, 20),
    rank=st.integers(1, 20),
    tokens=st.integers(2, 48),
    damping=st.sampled_from([0.0, 1e-3, 0.01, 0.3]),
    target=st.sampled_from(["float", "quantized"]),
    wbits=st.sampled_from([3, 4, 8]),
)
def test_installed_branch_is_the_spec_whitened_truncated_svd(seed, d_in, d_out, rank, tokens, damping, target, wbits):
    if damping == 0.0:
        tokens = max(tokens, 2 * d_in)  # undamped: C must be non-singular for the Cholesky factor
    rank = min(rank, d_in, d_out)
    weight, bias, scales, x, ids = random_case(seed, d_in, d_out, tokens)
    wq = WeightQuantConfig(bits=wbits)
    module = compensated_linear(weight, bias, scales, wq, x, ids, CMCConfig(rank=rank, damping=damping, target=target))
    assert module.weight_rows == "text" and set(module.branches) == {1, 2}
    for modality in (VISION, AUDIO):
        xm = x[ids == int(modality)].double()
        moment = xm.T @ xm  # C = Σ xᵀx
        t, t_inv = spec_whitening(moment, scales[int(modality)], damping)
        error = spec_error(weight, scales[0], scales[int(modality)], wq, target)
        left, right, sigma = spec_branch(error, t, t_inv, rank)
        assume(distinct_cut(sigma, rank))
        installed = module.branches[int(modality)]
        assert installed[0].shape == (d_in, rank) and installed[1].shape == (rank, d_out)
        assert_same_product(installed, left, right, error)
        # full rank: both reproduce Eᵀ
        full = min(d_in, d_out)
        l_full, r_full, _ = spec_branch(error, t, t_inv, full)
        torch.testing.assert_close(l_full @ r_full, error.T, rtol=0, atol=1e-8 * error.abs().max())


@settings(max_examples=15)
@given(
    seed=st.integers(0, 2**31 - 1),
    d_in=st.integers(3, 16),
    d_out=st.integers(3, 16),
    target=st.sampled_from(["float", "quantized"]),
)
def test_full_rank_branch_is_the_error_and_the_forward_is_the_spec_regime_2(seed, d_in, d_out, target):
    weight, bias, scales, x, ids = random_case(seed, d_in, d_out, tokens=3 * d_in)
    wq = WeightQuantConfig(bits=4)
    module = compensated_linear(weight, bias, scales, wq, x, ids, CMCConfig(rank_ratio=1.0, target=target))
    branches = {}
    for modality in (VISION, AUDIO):
        error = spec_error(weight, scales[0], scales[int(modality)], wq, target)
        left, right = module.branches[int(modality)]
        bound = 1e-6 * (left.double().abs() @ right.double().abs()) + 1e-9 * error.abs().max()
        assert ((left.double() @ right.double() - error.T).abs() <= bound).all()
        branches[modality] = error.T
    # spec §7 regime 2: y = Q_a(x ⊘ s_m)·Q_w(W·diag(s_t))ᵀ + b + [m ≠ t]·(x ⊘ s_m)·L_m·R_m
    with torch.no_grad():
        y = module(x, ids).double()
    q_text = fake_quant_weight(weight * scales[0], wq).double()
    x_tilde = x / scales[ids]
    expected = fake_quant_act(x_tilde, ActQuantConfig(bits=8)).double() @ q_text.T + bias.double()
    for modality, lr in branches.items():
        mask = (ids == int(modality)).unsqueeze(-1)
        expected = expected + torch.where(mask, x_tilde.double() @ lr, 0.0)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5 * expected.abs().max())


# ----------------------------------------------------------------------------- the tiny model


@pytest.fixture(scope="module")
def omni_stats():
    tiny = tiny_model("qwen2.5-omni-thinker", seed=0, batch_size=4)
    inputs = adapter_for(tiny.model).decoder_inputs(tiny.batch)
    captured = capture(tiny.model)
    stats = observe(Context(copy.deepcopy(captured), [inputs]), progress=False).stats
    return captured, inputs, stats


@pytest.mark.parametrize(
    "config",
    [
        CMCConfig(rank_ratio=0.2),
        CMCConfig(rank=20, damping=0.05, target="quantized"),
        CMCConfig(rank_ratio=1.0),
    ],
    ids=["ratio0.2", "rank20_quantized", "full"],
)
def test_tiny_model_branches_follow_the_spec_from_the_observed_statistics(omni_stats, config):
    captured, inputs, stats = omni_stats
    context = Context(copy.deepcopy(captured), [inputs], stats=stats, provided={"stats"})
    Pipeline(recipe_steps(preset("mas-init", 4, 8), progress=False)).run(context, progress=False)
    Pipeline([CrossModalCompensation(config)]).run(context, progress=False)
    checked = skipped = 0
    for module in quant_linears(context.graph_module):
        if module.scales is None:
            continue
        assert module.scales.shape[0] == 3 and module.weight_rows == "text"
        s = module.scales.detach()
        s_t = s[int(module.row_of_modality[TEXT])]
        d_in, d_out = module.in_features, module.out_features
        full = min(d_in, d_out)
        rank = full if config.rank_ratio == 1.0 else (config.rank if config.rank is not None else int(config.rank_ratio * full))
        rank = min(max(rank, 1), full)
        for modality in (VISION, AUDIO):
            row = int(module.row_of_modality[modality])
            moment = stats[module.name].moments[modality]  # C collected by the observers, float64
            t, t_inv = spec_whitening(moment, s[row], config.damping)
            error = spec_error(module.weight.detach(), s_t, s[row], module.weight_quant, config.target)
            left, right, sigma = spec_branch(error, t, t_inv, rank)
            installed = module.branches[row]
            assert installed[0].shape == (d_in, rank)
            if not distinct_cut(sigma, rank):
                skipped += 1
                continue
            assert_same_product(installed, left, right, error)
            if rank == full:
                torch.testing.assert_close(left @ right, error.T, rtol=0, atol=1e-9 * error.abs().max())
            checked += 1
    assert checked >= 22 and checked + skipped == 24
