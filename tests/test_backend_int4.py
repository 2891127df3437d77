"""int4 weight-only CPU backend: the kernel's semantics, the reference's codes, outputs to float (bfloat16) rounding.

Tolerances (measured values in the comments):
* ``kernel_dtype=float32``: kernel weights are the reference's bit for bit (symmetric) or within
  ``(|zp|/2 + |q − zp|)·scale·eps`` (asymmetric: measured ≤ 13.4·scale·eps); module outputs within ``1e-5 · max|y|``
  (measured ≤ 8.2e-7; bfloat16 inputs and outputs: 1e-2, measured 1.0e-4);
* ``kernel_dtype=bfloat16``: the codes are the reference's bit for bit, per-channel scales too, group scales
  rounded to bfloat16; module outputs within ``1e-2 · max|y|`` (measured ≤ 7.4e-3), logits of a tiny graph
  within ``2e-2 · max|logit|`` (measured 3.2e-3) and far below the quantization error (measured 2% of it).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace

import pytest
import torch
from helpers import CalibratedTiny, calibrated_tiny

from masq_fx import load, quantize
from masq_fx.backends import Int4CpuLinear, int4_unsupported_reason, lower_to_torchao
from masq_fx.backends.int4_cpu import kernel_group_size
from masq_fx.errors import InputError
from masq_fx.modality import NUM_MODALITIES
from masq_fx.models.tiny import tiny_model
from masq_fx.nn.quant_linear import QuantLinear
from masq_fx.quantizers import WeightQuantConfig
from masq_fx.recipes import preset
from masq_fx.transforms import QuantizeWeights
from masq_fx.transforms.cmc import CMCConfig
from masq_fx.transforms.quantize import ModuleFilter

W4A16_CMC = replace(preset("mas-init", 4, 16), cmc=CMCConfig(rank=4))
CONFIGS = [
    WeightQuantConfig(bits=4, group_size=64),
    WeightQuantConfig(bits=4),
    WeightQuantConfig(bits=4, grid="restricted", group_size=32),
    WeightQuantConfig(bits=4, symmetric=False, group_size=32),
    WeightQuantConfig(bits=4, symmetric=False),
    WeightQuantConfig(bits=3, group_size=96),
]
EXACT, BF16 = torch.float32, torch.bfloat16


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def omni() -> CalibratedTiny:
    return calibrated_tiny("qwen2.5-omni-thinker")


def _kernel_weight(module: Int4CpuLinear, row: int) -> torch.Tensor:
    """The float32 ``[out, in]`` weight the kernel computes with, read back through an identity input."""
    eye = torch.eye(module.in_features, dtype=module.kernel_dtype)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, module.packed[row], module.group_size, module.scales_and_zeros[row])
    return out.float().T[: module.out_features]


def _kernel_codes(module: Int4CpuLinear, row: int) -> torch.Tensor:
    """The signed codes ``u − 8`` the kernel holds, read back with scale 1 and zero 0."""
    k, n = module.in_features, module.packed.shape[1]
    unit = torch.tensor([1.0, 0.0]).expand(k // module.group_size, n, 2).to(BF16).contiguous()
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(k, dtype=BF16), module.packed[row], module.group_size, unit)
    return out.float().T[: module.out_features].to(torch.int8)


def _linear(config: WeightQuantConfig, rows: int = 3, out_features: int = 40, in_features: int = 192, seed: int = 0) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    module = QuantLinear(torch.randn(out_features, in_features, generator=gen), torch.randn(out_features, generator=gen), "lin")
    module.set_scales(torch.exp(torch.randn(rows, in_features, generator=gen)), torch.tensor([r % rows for r in range(NUM_MODALITIES)]))
    module.set_quantizers(weight=config)
    return module


# ----------------------------------------------------------------------------- the kernel itself


def test_kernel_computes_fma_of_offset_codes_scale_and_float_zero():
    gen = torch.Generator().manual_seed(0)
    n, k, group = 32, 128, 32
    u = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    assert packed.shape == (n, k // 2) and packed.dtype == torch.uint8
    assert torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 8), packed), "inner_k_tiles is ignored on CPU"
    scale, zero = torch.rand(k // group, n, generator=gen), torch.randn(k // group, n, generator=gen)
    table = torch.stack([scale, zero], -1)
    weight = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(k), packed, group, table).T
    s, z = (t.T.repeat_interleave(group, 1).double() for t in (scale, zero))
    assert torch.equal(weight, ((u - 8).double() * s + z).float()), "one rounding: a fused multiply-add"
    x = torch.randn(5, k, generator=gen)
    torch.testing.assert_close(torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, table), x @ weight.T)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("group 16", "qGroupSize to be 32, 64, 128 or 256"),
        ("group 128 of K 96", "K to be divisible by qGroupSize"),
        ("N 24", "N to be dividable by 16"),
        ("float64", "32-bit or 16-bit float"),
        ("3-D", "2D"),
        ("scales float32, x bfloat16", "BFloat16"),
    ],
)
def test_kernel_limits(case, message):
    k, n, group, x, dtype = 96, 16, 32, torch.randn(3, 96), torch.float32
    if case == "group 16":
        group = 16
    elif case == "group 128 of K 96":
        group = 128
    elif case == "N 24":
        n = 24
    elif case == "float64":
        x = x.double()
    elif case == "3-D":
        x = x[None]
    elif case == "scales float32, x bfloat16":
        x = x.bfloat16()
    with pytest.raises(RuntimeError, match=message):
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.zeros(n, k, dtype=torch.int32), 1)
        table = torch.ones(max(k // group, 1), n, 2, dtype=dtype if case != "float64" else torch.float64)
        torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, table)


def test_kernel_groups_cover_multiples_of_32():
    assert kernel_group_size(576, None) == 64 and kernel_group_size(1536, None) == 256
    assert kernel_group_size(576, 64) == 64 and kernel_group_size(576, 96) == 32 and kernel_group_size(1024, 512) == 256
    assert kernel_group_size(576, 16) is None and kernel_group_size(80, None) is None


# ----------------------------------------------------------------------------- same codes


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_float32_kernel_weights_are_the_reference_weights(config):
    module = _linear(config)
    lowered = Int4CpuLinear.from_quant_linear(module, EXACT)
    for row in range(3):
        target = module.quantized_weight(row)
        weight = _kernel_weight(lowered, row)
        if config.symmetric:
            assert torch.equal(weight, target)
        else:  # fma(q, s, −zp·s) against (q − zp)·s: the roundings of zp·s and of both results
            codes = module.weight_codes(row)
            spread = module.in_features // codes.scale.shape[1]
            scale, zero_point = codes.scale.repeat_interleave(spread, 1), codes.zero_point.float().repeat_interleave(spread, 1)
            bound = (zero_point.abs() / 2 + (codes.qdata - zero_point).abs()) * scale * torch.finfo(torch.float32).eps
            assert ((weight - target).abs() <= bound).all() and not torch.equal(weight, target)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_bfloat16_kernel_holds_the_reference_codes_and_scales(config):
    module = _linear(config)
    lowered = Int4CpuLinear.from_quant_linear(module, BF16)
    for row in range(3):
        codes = module.weight_codes(row)
        assert torch.equal(_kernel_codes(lowered, row), codes.qdata)
        table = lowered.scales_and_zeros[row, :, : module.out_features].float()  # [in / group, out, 2]
        zero_point = torch.zeros_like(codes.scale) if codes.zero_point is None else codes.zero_point.float()
        repeat = table.shape[0] // codes.scale.shape[1]
        if config.group_size is None:  # scale 1 and zero −zp in the kernel (exact), the float32 scale after it
            assert lowered.channel_scales is not None and torch.equal(lowered.channel_scales[row], codes.scale[:, 0])
            assert torch.equal(table[..., 0], torch.ones_like(table[..., 0]))
            assert torch.equal(table[..., 1], -zero_point.expand(-1, table.shape[0]).T)
            assert lowered.zero_residual is None
        else:  # (q − zp)·s₁₆: the offset −zp·s₁₆ as its bfloat16 part and the float32 rest
            s16 = codes.scale.bfloat16().float()
            offset = -(zero_point * s16)
            assert torch.equal(table[..., 0], s16.repeat_interleave(repeat, 1).T)
            assert torch.equal(table[..., 1], offset.bfloat16().float().repeat_interleave(repeat, 1).T)
            if config.symmetric:
                assert lowered.zero_residual is None
            else:
                assert lowered.zero_residual is not None
                assert torch.equal(lowered.zero_residual[row], offset - offset.bfloat16().float())


# ----------------------------------------------------------------------------- module numerics


@pytest.mark.parametrize("kernel_dtype", [EXACT, BF16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("variant", ["per_row", "text+branches", "divided upstream", "bfloat16 input"])
def test_lowered_linear_matches_the_reference(config, variant, kernel_dtype):
    module = _linear(config, seed=CONFIGS.index(config))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 11, 192, generator=gen) * torch.exp(torch.randn(192, generator=gen))
    ids = torch.randint(0, NUM_MODALITIES, (2, 11), generator=gen)
    if variant == "text+branches":
        module.use_text_weight()
        for row in (1, 2):
            module.set_branch(row, torch.randn(192, 4, generator=gen) * 0.1, torch.randn(4, 40, generator=gen))
    elif variant == "divided upstream":
        module.divide_upstream()
    elif variant == "bfloat16 input":
        x = x.bfloat16()
    with torch.no_grad():
        expected = module(x, ids)
        lowered = Int4CpuLinear.from_quant_linear(module, kernel_dtype)
        y = lowered(x, ids)
    assert y.dtype == x.dtype
    tolerance = 1e-5 if kernel_dtype == EXACT and variant != "bfloat16 input" else 1e-2
    assert (y.float() - expected.float()).abs().max() <= tolerance * expected.float().abs().max()


# ----------------------------------------------------------------------------- graphs


def test_omni_w4a16_with_cmc_branches_lowers_to_the_int4_kernel(omni):
    context = omni.transformed(W4A16_CMC)
    reference = context.captured
    lowered = copy.deepcopy(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left on the reference path
        report = lower_to_torchao(lowered)
    assert len(report.lowered) == len(report.int4) == 14 and not report.unlowered
    assert str(report) == "lowered 14 QuantLinears to the int4 CPU kernel, left 0 on the reference path"
    modules = [m for m in lowered.graph_module.modules() if isinstance(m, Int4CpuLinear)]
    assert len(modules) == 14 and sum(len(m.branch_ranks) for m in modules) == 24
    assert any(m.takes_positions for m in modules), "vision/audio branches on their own tokens (indexed layout)"
    with torch.no_grad():
        ref, out = reference(omni.inputs), lowered(omni.inputs)
    assert (out - ref).abs().max() <= 2e-2 * ref.abs().max()
    assert (out - ref).norm() < 0.1 * (ref - omni.fp).norm(), "the kernel deviates far less than the quantization error"


def test_weight_only_settings_the_kernel_cannot_take_stay_reference(omni):
    w8 = QuantizeWeights(WeightQuantConfig(bits=8), ModuleFilter(include=(r"layers\.0\.mlp\.up_proj",)))
    g16 = QuantizeWeights(WeightQuantConfig(bits=4, group_size=16), ModuleFilter(include=(r"layers\.1\.mlp\.up_proj",)))
    context = omni.transformed(preset("rtn", 4, 16), (w8, g16))
    with pytest.warns(UserWarning, match="left 2 on the reference path"):
        report = lower_to_torchao(context.captured)
    assert "at most 4 bits" in report.unlowered["layers.0.mlp.up_proj"]
    assert "group_size=16" in report.unlowered["layers.1.mlp.up_proj"]
    assert len(report.int4) == 12


def test_unsupported_modules_and_dtypes_are_refused():
    module = _linear(WeightQuantConfig(bits=4, group_size=64), rows=2)
    assert int4_unsupported_reason(module) is None
    module.use_text_weight()
    module.set_branch(1, torch.randn(192, 4), torch.randn(4, 40), bits=8)
    assert "factor_bits" in int4_unsupported_reason(module)
    with pytest.raises(InputError, match="cannot be lowered to the int4 CPU kernel"):
        Int4CpuLinear.from_quant_linear(module)
    with pytest.raises(InputError, match="kernel_dtype"):
        Int4CpuLinear.from_quant_linear(_linear(WeightQuantConfig(bits=4)), torch.float16)
    with pytest.raises(ValueError, match="int4_dtype"):
        lower_to_torchao(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()), int4_dtype=torch.float16)


def test_loaded_w4a16_lowers_compiles_and_generates(tmp_path):
    tiny = tiny_model("qwen2.5-omni-thinker", seed=0, batch_size=2)
    qm = quantize(tiny.model, W4A16_CMC, [tiny.batch], progress=False)
    reference = qm.logits(tiny.batch)
    qm.save(tmp_path / "w4a16")
    loaded = load(tmp_path / "w4a16", tiny.model)
    assert len(loaded.lower().int4) == 14
    logits = loaded.logits(tiny.batch)
    assert (logits - reference).abs().max() <= 2e-2 * reference.abs().max()
    eager = loaded.generate(tiny.batch, max_new_tokens=3)
    assert torch.equal(loaded.generate(tiny.batch, max_new_tokens=3, compiled=True), eager)  # through compile_graph
