"""GPTQ-style error feedback for the quantized weights (an optional weight-side transform).

For each QuantLinear and scale row ``r`` the smoothed weight ``W̃ = W·diag(s_r)`` is quantized
column by column; the rounding error of each column is spread over the not-yet-quantized columns
through the inverse Hessian ``H̃⁻¹`` of the layer-wise loss ``E‖x̃(W̃ − Q)ᵀ‖²``, where
``H̃ = D⁻¹HD⁻¹`` and ``H = Σ xᵀx`` over the calibration tokens that use row ``r`` (the observers'
float64 second moments, so no extra calibration pass). Scales are fixed per output channel from
the full row (or per group when a group starts), on the same grid as the plain quantizer, so the
result is an ordinary quantized weight. Run it after the scales are final (after MAS learning);
changing the scales drops the solved weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, fx
from tqdm.auto import tqdm

from masq_fx.calibration.calibrate import STATS
from masq_fx.distributed import solve_once
from masq_fx.modality import Modality
from masq_fx.nn.quant_linear import QuantLinear
from masq_fx.pipeline import Capability, Context
from masq_fx.quantizers import (
    QuantizedWeight,
    WeightQuantConfig,
    quantize_with,
    weight_qparams,
)
from masq_fx.transforms.prepare import quant_linears
from masq_fx.transforms.quantize import WEIGHT_QUANT

SOLVED_WEIGHTS = Capability.SOLVED_WEIGHTS


@dataclass(frozen=True)
class GPTQConfig:
    damping: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        if self.damping <= 0:
            raise ValueError(f"damping must be positive, got {self.damping}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")


@torch.no_grad()
def gptq_quantize(
    weight: Tensor, hessian: Tensor, config: WeightQuantConfig, gptq: GPTQConfig, ratio: Tensor | None = None
) -> Tensor:
    """Quantize-dequantized ``weight`` ``[out, in]`` minimising ``tr((W − Q) H (W − Q)ᵀ)`` greedily."""
    return gptq_codes(weight, hessian, config, gptq, ratio).dequantize().to(weight.dtype)


@torch.no_grad()
def gptq_codes(
    weight: Tensor, hessian: Tensor, config: WeightQuantConfig, gptq: GPTQConfig, ratio: Tensor | None = None, scratch: bool = False
) -> QuantizedWeight:
    """The integer codes and scales of :func:`gptq_quantize`'s result.

    ``ratio [out, n_groups]`` (learned clipping) shrinks each channel's (group's) range before its
    scale is taken. The inverse-Hessian factor is computed in float64; the column sweep in float32.
    ``scratch``: ``weight`` (float32) and ``hessian`` (float64) are the caller's to overwrite, not copied (a 7B
    down_proj's Hessian is 2.7 GiB; its inverse factor is computed with two such matrices held at most).
    """
    w = weight.float() if scratch else weight.float().clone()
    h = hessian.double() if scratch else hessian.double().clone()
    del hessian
    columns = w.shape[1]
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(gptq.damping * h.diagonal().mean())
    # H⁻¹ = L⁻ᵀL⁻¹ through a triangular solve (torch.cholesky_inverse is ~100x slower on CPU), in place where it can be
    lower = torch.linalg.cholesky(h, out=h)
    eye = torch.eye(columns, dtype=h.dtype, device=h.device)
    l_inv = torch.linalg.solve_triangular(lower, eye, upper=False, out=eye)
    del h, lower
    product = l_inv.T @ l_inv
    del l_inv, eye
    h_inv = torch.linalg.cholesky(product, upper=True, out=product).float()
    del product
    group = columns if config.group_size is None else config.group_size
    block = max(group, gptq.block_size // group * group) if group < columns else gptq.block_size
    codes = torch.zeros_like(w)
    scales: list[Tensor] = []
    zero_points: list[Tensor | None] = []
    #: the current group's parameters, set at column 0 before any use
    scale: Tensor
    zero_point: Tensor | None
    def group_ratio(column: int) -> Tensor | None:
        return None if ratio is None else ratio[:, column // group : column // group + 1]

    if group == columns:
        scale, zero_point = weight_qparams(w, config, group_ratio(0))
        scales.append(scale)
        zero_points.append(zero_point)
    for start in range(0, columns, block):
        end = min(start + block, columns)
        w_block = w[:, start:end].clone()
        errors = torch.zeros_like(w_block)
        h_block = h_inv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if group < columns and column % group == 0:
                scale, zero_point = weight_qparams(w_block[:, i : i + group], config, group_ratio(column))
                scales.append(scale)
                zero_points.append(zero_point)
            value = w_block[:, i : i + 1]
            code = quantize_with(value, scale, zero_point, config)
            quantized = code * scale if zero_point is None else (code - zero_point) * scale
            codes[:, column : column + 1] = code
            error = (value - quantized) / h_block[i, i]
            w_block[:, i:].addmm_(error, h_block[i : i + 1, i:], alpha=-1.0)
            errors[:, i : i + 1] = error
        w[:, end:].addmm_(errors, h_inv[start:end, end:], alpha=-1.0)
    return QuantizedWeight(
        qdata=codes.to(torch.int8),
        scale=torch.cat(scales, dim=1),
        zero_point=None if zero_points[0] is None else torch.cat(cast(list[Tensor], zero_points), dim=1).to(torch.int8),  # all or none
        config=config,
    )


def _row_hessian(module: QuantLinear, stats, row: int) -> Tensor:
    """The second moment of a scale row's tokens; of all the site's tokens for a fallback row none of whose
    modalities it saw (an expert only vision tokens were routed to falls back from text to them)."""
    modalities = [m for m in Modality if int(module.row_of_modality[m]) == row and stats.count[m] > 0]
    if not modalities and row == int(module.row_of_modality[Modality.TEXT]):
        modalities = stats.present()
    missing = [m for m in modalities if m not in stats.moments]
    if missing or not modalities:
        names = ", ".join(m.name.lower() for m in missing) or "any modality"
        raise ValueError(
            f"GPTQ needs the second moment of {names} at {module.name}: calibrate with "
            "InsertObservers(moment_modalities=(Modality.TEXT, Modality.VISION, Modality.AUDIO))"
        )
    hessian = stats.moments[modalities[0]].clone()
    for modality in modalities[1:]:
        hessian += stats.moments[modality]
    return hessian


@dataclass
class GPTQWeights:
    """Solve every quantized QuantLinear's weights (per scale row) with GPTQ error feedback."""

    config: GPTQConfig = field(default_factory=GPTQConfig)
    progress: bool = True
    name: str = "gptq"
    requires: tuple[Capability, ...] = (WEIGHT_QUANT, STATS)
    provides: tuple[Capability, ...] = (SOLVED_WEIGHTS,)

    def __call__(self, gm: fx.GraphModule, context: Context) -> fx.GraphModule:
        """In a process group each linear is solved on one rank (by cost) and its codes broadcast to the others."""
        modules = [m for m in quant_linears(gm) if m.weight_quant is not None and context.in_scope(m.name)]
        for module in modules:
            if module.name not in context.stats:
                raise ValueError(f"no calibration statistics for {module.name}: run Calibrate before GPTQ")
        # an MoE expert no calibration token was routed to has no Hessian: it keeps its round-to-nearest codes
        modules = [m for m in modules if context.stats[m.name].present()]
        bar = tqdm(total=len(modules), desc="GPTQ", unit="linear", disable=not self.progress or context.layer is not None)

        def solve(module: QuantLinear) -> list[Tensor]:
            solved = _flat(self._solve(module, context.stats[module.name]))
            bar.update(1)
            return solved

        costs = [float(_rows(m) * m.in_features**2 * (m.in_features + m.out_features)) for m in modules]
        results = solve_once(modules, solve, _blank, costs, "sharing the GPTQ weights", context.layer)
        bar.close()
        for module, tensors in zip(modules, results):
            module.set_solved(_unflat(module, tensors))
        return gm

    def _solve(self, module: QuantLinear, stats) -> dict[int, QuantizedWeight]:
        assert module.weight_quant is not None  # chosen so
        solved = {}
        for row in range(_rows(module)):
            weight = module.weight.detach().to(torch.float32, copy=True)
            if module.scales is not None:
                weight.mul_(module.scales[row].detach().float())  # = the float64 product rounded: float32 products are exact in it
            # the Hessian passed inline: gptq_codes holds its only reference and lets it go once factored
            solved[row] = gptq_codes(weight, _smoothed_hessian(module, stats, row), module.weight_quant, self.config, module.clip_ratio(row), scratch=True)
            del weight
        return solved


def _smoothed_hessian(module: QuantLinear, stats, row: int) -> Tensor:
    """``D⁻¹HD⁻¹`` of scale row ``row`` (``D = diag(s_row)``), a new float64 tensor."""
    hessian = _row_hessian(module, stats, row)
    if module.scales is not None:
        scale = module.scales[row].detach().double()
        hessian.div_(scale[:, None]).div_(scale[None, :])
    return hessian


def _rows(module: QuantLinear) -> int:
    return 1 if module.scales is None else module.scales.shape[0]


def _blank(module: QuantLinear) -> list[Tensor]:
    """Tensors of the shapes and dtypes :func:`_flat` gives of ``module``'s GPTQ codes (what another rank's
    solution is received into)."""
    config = module.weight_quant
    assert config is not None
    out, groups = module.out_features, 1 if config.group_size is None else module.in_features // config.group_size
    device = module.weight.device
    shapes = [((out, module.in_features), torch.int8), ((out, groups), torch.float32)]
    if not config.symmetric:
        shapes.append(((out, groups), torch.int8))
    return [torch.empty(shape, dtype=dtype, device=device) for _ in range(_rows(module)) for shape, dtype in shapes]


def _flat(solved: dict[int, QuantizedWeight]) -> list[Tensor]:
    return [t for row in sorted(solved) for t in (solved[row].qdata, solved[row].scale, solved[row].zero_point) if t is not None]


def _unflat(module: QuantLinear, tensors: list[Tensor]) -> dict[int, QuantizedWeight]:
    """``module``'s solved codes from the tensors :func:`_flat` lists."""
    config = module.weight_quant
    assert config is not None
    values = iter(tensors)
    return {
        row: QuantizedWeight(qdata=next(values), scale=next(values), zero_point=None if config.symmetric else next(values), config=config)
        for row in range(_rows(module))
    }
