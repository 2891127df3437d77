"""Reference quantizers: exact fake-quant numerics on torchao's integer grid.

Everything is computed in float32 (whatever the input dtype) and returned in the
input dtype. The formulas are those of torchao 0.18 ``choose_qparams_affine`` /
``quantize_affine`` / ``dequantize_affine`` (the code ``Int8Tensor.from_hp`` runs),
including its operation order, so a torchao backend reproduces the integers and
scales bit for bit. ``eps = torch.finfo(torch.float32).eps`` (as ``Int8Tensor`` uses).

Symmetric, b bits (zero point 0), per row / group / token ``amax = max|x|``:

* ``grid="full"`` (torchao, default): ``qmin = -2^(b-1)``, ``qmax = 2^(b-1) - 1``;
  ``scale = max(amax / ((qmax - qmin) / 2), eps)``, i.e. ``amax / 127.5`` for int8.
* ``grid="restricted"`` (official MASQuant code): ``qmin = -(2^(b-1) - 1)``,
  ``qmax = 2^(b-1) - 1``; the same formula gives ``scale = amax / (2^(b-1) - 1)``.
  (torchao reproduces it with ``quant_min=-(2^(b-1) - 1)``.)

Asymmetric (weights only), b bits, per row / group; ``mn = min(min(x), 0)``, ``mx = max(max(x), 0)``:

* ``qmin = -2^(b-1)``, ``qmax = 2^(b-1) - 1`` (signed codes stored in int8, the range of
  torchao's ``IntxUnpackedToInt8Tensor`` and of its int8 asymmetric per-token path;
  torchao's uint4 paths use ``0..2^b - 1``: same scale, codes and zero point shifted by
  ``2^(b-1)``, identical dequantized values);
* ``scale = max((mx - mn) / (qmax - qmin), eps)``;
  ``zero_point = clamp(qmin - round(mn / scale), qmin, qmax)``.

Quantize / dequantize (both modes, ``round`` = ``torch.round``, half to even)::

    q = clamp(round(x * (1 / scale)) + zero_point, qmin, qmax)
    x_hat = (q - zero_point) * scale

Note: torchao's ``Int8Tensor.from_hp`` on a bf16/fp16 tensor computes the scale in that
dtype before casting it to float32; to match this module exactly, upcast to float32 first
(or pass the scale).

Idempotence: with a fixed scale (static per tensor, or codes re-derived with the stored
scale) quantization is a projection. Re-deriving the scale, the restricted grid is
idempotent; the asymmetric one keeps its codes (the scale may move by an ulp) except at
exact rounding ties; the dynamic full grid is NOT: ``x_hat`` has ``amax = 127 * scale`` or
``128 * scale`` (not ``127.5 * scale``), so a second pass uses another scale.

Fake quantization uses straight-through rounding; the scale is computed from the input and
not detached, so gradients also flow through it (as in the official MASQuant code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from masq_fx.errors import InputError

__all__ = [
    "ActQuantConfig",
    "QuantizedWeight",
    "WeightQuantConfig",
    "act_scale",
    "calibrate_static_scale",
    "fake_quant_act",
    "fake_quant_weight",
    "grid_bounds",
    "quantize_weight",
]

EPS = torch.finfo(torch.float32).eps
_GRIDS = ("full", "restricted")
_GRANULARITIES = ("per_token", "per_tensor")


def _check_int(name: str, value: object, lo: int, hi: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InputError(f"{name} must be an int in [{lo}, {hi}], got {value!r}; {fix}")


def _check_grid(owner: str, grid: object) -> None:
    if grid not in _GRIDS:
        raise InputError(f"{owner}.grid must be 'full' or 'restricted', got {grid!r}")


@dataclass(frozen=True)
class WeightQuantConfig:
    """How to quantize a linear weight ``[out, in]``.

    ``group_size=None`` quantizes per output channel, otherwise per group of
    ``group_size`` consecutive input features. ``clip_search`` picks, per row or group,
    the clipping ratio in ``linspace(1, clip_min, clip_steps)`` minimizing the weight MSE
    (the ratio scales ``amax``, or both ``min`` and ``max`` if asymmetric; ties keep the larger).
    """

    bits: int = 8
    symmetric: bool = True
    group_size: int | None = None
    grid: Literal["full", "restricted"] = "full"
    clip_search: bool = False
    clip_min: float = 0.5
    clip_steps: int = 20

    def __post_init__(self) -> None:
        _check_int("WeightQuantConfig.bits", self.bits, 2, 8, "codes are stored as int8, use 2..8 bits")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise InputError(f"WeightQuantConfig.group_size must be a positive int or None (per channel), got {g!r}")
        _check_grid("WeightQuantConfig", self.grid)
        if self.grid == "restricted" and not self.symmetric:
            raise InputError(
                "WeightQuantConfig: grid='restricted' is a symmetric grid and cannot be used with "
                "symmetric=False; set symmetric=True or grid='full'"
            )
        if not 0.0 < float(self.clip_min) <= 1.0:
            raise InputError(f"WeightQuantConfig.clip_min must be in (0, 1], got {self.clip_min!r}")
        _check_int("WeightQuantConfig.clip_steps", self.clip_steps, 1, 10_000, "use e.g. 20")

    @property
    def qmin(self) -> int:
        return grid_bounds(self.bits, self.grid)[0]

    @property
    def qmax(self) -> int:
        return grid_bounds(self.bits, self.grid)[1]


@dataclass(frozen=True)
class ActQuantConfig:
    """How to quantize activations: symmetric, dynamic per token (last dim) or static per tensor."""

    bits: int = 8
    granularity: Literal["per_token", "per_tensor"] = "per_token"
    grid: Literal["full", "restricted"] = "full"

    def __post_init__(self) -> None:
        if self.granularity not in _GRANULARITIES:
            raise InputError(
                f"ActQuantConfig.granularity must be 'per_token' or 'per_tensor', got {self.granularity!r}"
            )
        if self.granularity == "per_token":
            _check_int("ActQuantConfig.bits", self.bits, 4, 8, "dynamic per-token quantization supports 4..8 bits")
        else:
            _check_int("ActQuantConfig.bits", self.bits, 2, 8, "use 2..8 bits")
        _check_grid("ActQuantConfig", self.grid)

    @property
    def qmin(self) -> int:
        return grid_bounds(self.bits, self.grid)[0]

    @property
    def qmax(self) -> int:
        return grid_bounds(self.bits, self.grid)[1]


def grid_bounds(bits: int, grid: str = "full") -> tuple[int, int]:
    """``(qmin, qmax)`` of the signed b-bit grid (also the asymmetric one, which uses ``grid='full'``)."""
    qmax = 2 ** (bits - 1) - 1
    return (-qmax - 1 if grid == "full" else -qmax), qmax


class _RoundSTE(torch.autograd.Function):
    """``torch.round`` (half to even) with an identity gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        return grad


def _symmetric_scale(amax: Tensor, qmin: int, qmax: int) -> Tensor:
    return torch.clamp(amax / (float(qmax - qmin) / 2), min=EPS)


def _asymmetric_qparams(mn: Tensor, mx: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    mn, mx = torch.clamp(mn, max=0.0), torch.clamp(mx, min=0.0)
    scale = torch.clamp((mx - mn) / float(qmax - qmin), min=EPS)
    zero_point = torch.clamp(qmin - _RoundSTE.apply(mn / scale), qmin, qmax)
    return scale, zero_point


def _quantize(x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int) -> Tensor:
    """Integer codes (as float32), torchao's ``quantize_affine`` op order; STE round."""
    q = _RoundSTE.apply(x * (1.0 / scale))
    if zero_point is not None:
        q = q + zero_point
    return torch.clamp(q, qmin, qmax)


def _dequantize(q: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
    if zero_point is not None:
        q = q - zero_point
    return q * scale


# ----------------------------------------------------------------------------- weights


def _grouped(w: Tensor, config: WeightQuantConfig) -> Tensor:
    """float32 view ``[out, n_groups, group]`` of a weight ``[out, in]``."""
    if w.dim() != 2:
        raise InputError(f"weight must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    out_features, in_features = w.shape
    g = in_features if config.group_size is None else config.group_size
    if in_features % g:
        divisors = [d for d in range(1, in_features + 1) if in_features % d == 0]
        near = sorted(sorted(divisors, key=lambda d: (abs(d - g), d))[:4])
        raise InputError(
            f"group_size={g} does not divide in_features={in_features}; "
            f"use a divisor of {in_features} (e.g. {near}) or group_size=None for per-channel"
        )
    return w.float().reshape(out_features, in_features // g, g)


def _weight_qparams(wg: Tensor, config: WeightQuantConfig, ratio: Tensor | float = 1.0) -> tuple[Tensor, Tensor | None]:
    """Scale (and zero point) ``[out, n_groups, 1]`` of grouped weights, ranges shrunk by ``ratio``."""
    qmin, qmax = config.qmin, config.qmax
    if config.symmetric:
        return _symmetric_scale(wg.abs().amax(-1, keepdim=True) * ratio, qmin, qmax), None
    mn, mx = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    return _asymmetric_qparams(mn * ratio, mx * ratio, qmin, qmax)


@torch.no_grad()
def _search_clip_ratio(wg: Tensor, config: WeightQuantConfig) -> Tensor:
    """Per row/group ratio in ``linspace(1, clip_min, clip_steps)`` with the least MSE (ties: the larger ratio)."""
    best_err = torch.full(wg.shape[:-1] + (1,), float("inf"), device=wg.device)
    best_ratio = torch.ones_like(best_err)
    for r in torch.linspace(1.0, config.clip_min, config.clip_steps).tolist():
        scale, zp = _weight_qparams(wg, config, r)
        fq = _dequantize(_quantize(wg, scale, zp, config.qmin, config.qmax), scale, zp)
        err = (fq - wg).pow(2).mean(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, r), best_ratio)
    return best_ratio


def _clip_ratio(wg: Tensor, config: WeightQuantConfig, ratio: Tensor | None) -> Tensor | float:
    """``[out, n_groups, 1]`` clipping ratios: the given (learned) ones, else the configured search's, else 1."""
    if ratio is not None:
        if ratio.shape != wg.shape[:-1]:
            raise InputError(
                f"clip ratio must be [out_features, n_groups] = {list(wg.shape[:-1])}, got {list(ratio.shape)}"
            )
        return ratio.float().unsqueeze(-1)
    return _search_clip_ratio(wg.detach(), config) if config.clip_search else 1.0


def _fake_quant_grouped(
    wg: Tensor, config: WeightQuantConfig, ratio: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    scale, zp = _weight_qparams(wg, config, _clip_ratio(wg, config, ratio))
    return _quantize(wg, scale, zp, config.qmin, config.qmax), scale, zp


@torch.no_grad()
def weight_qparams(w: Tensor, config: WeightQuantConfig, ratio: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Scale (and zero point) ``[out, 1]`` for a slice ``[out, k]`` of weight columns quantized as one
    group, its range shrunk by ``ratio [out, 1]`` if given, else by the configured clipping search;
    used by error-feedback solvers such as GPTQ."""
    wg = w.float()[:, None, :]
    scale, zp = _weight_qparams(wg, config, _clip_ratio(wg, config, ratio))
    return scale[:, 0], None if zp is None else zp[:, 0]


@torch.no_grad()
def quantize_with(x: Tensor, scale: Tensor, zero_point: Tensor | None, config: WeightQuantConfig) -> Tensor:
    """Integer codes (as float32) of ``x`` on ``config``'s grid with given (broadcastable) parameters."""
    q = torch.round(x.float() * (1.0 / scale))
    if zero_point is not None:
        q = q + zero_point
    return torch.clamp(q, config.qmin, config.qmax)


@torch.no_grad()
def fake_quant_with(x: Tensor, scale: Tensor, zero_point: Tensor | None, config: WeightQuantConfig) -> Tensor:
    """Quantize-dequantize ``x`` on ``config``'s grid with given (broadcastable) parameters (no STE)."""
    return _dequantize(quantize_with(x, scale, zero_point, config), scale, zero_point)


@dataclass
class QuantizedWeight:
    """Integer representation of a weight, for the backend and checkpoints.

    ``qdata`` int8 ``[out, in]``; ``scale`` float32 and ``zero_point`` int8 (None if
    symmetric) ``[out, 1]`` per channel or ``[out, in // group_size]`` per group;
    ``dtype`` is the original weight dtype, the one ``dequantize`` returns.
    """

    qdata: Tensor
    scale: Tensor
    zero_point: Tensor | None
    config: WeightQuantConfig
    dtype: torch.dtype = torch.float32

    def dequantize(self) -> Tensor:
        """``(qdata - zero_point) * scale`` in float32, cast to ``dtype``."""
        out_features, in_features = self.qdata.shape
        n_groups = self.scale.shape[-1]
        q = self.qdata.float().reshape(out_features, n_groups, in_features // n_groups)
        zp = None if self.zero_point is None else self.zero_point.float().unsqueeze(-1)
        w = _dequantize(q, self.scale.float().unsqueeze(-1), zp)
        return w.reshape(out_features, in_features).to(self.dtype)


@torch.no_grad()
def quantize_weight(w: Tensor, config: WeightQuantConfig, ratio: Tensor | None = None) -> QuantizedWeight:
    """Quantize a weight ``[out, in]`` to int8 codes, scales and zero points; ``ratio [out, n_groups]``
    shrinks each row's (group's) range (learned clipping) in place of ``config``'s clipping search."""
    q, scale, zp = _fake_quant_grouped(_grouped(w, config), config, ratio)
    return QuantizedWeight(
        qdata=q.reshape(w.shape).to(torch.int8),
        scale=scale.squeeze(-1),
        zero_point=None if zp is None else zp.squeeze(-1).to(torch.int8),
        config=config,
        dtype=w.dtype,
    )


def fake_quant_weight(w: Tensor, config: WeightQuantConfig, ratio: Tensor | None = None) -> Tensor:
    """Quantize-dequantize a weight ``[out, in]``; differentiable w.r.t. ``w`` and ``ratio`` (as
    :func:`quantize_weight`) through the STE rounding, the scale not detached."""
    q, scale, zp = _fake_quant_grouped(_grouped(w, config), config, ratio)
    return _dequantize(q, scale, zp).reshape(w.shape).to(w.dtype)


# ----------------------------------------------------------------------------- activations


def calibrate_static_scale(absmax: Tensor | float, config: ActQuantConfig) -> Tensor:
    """Static per-tensor scale (float32) from an observed abs-max."""
    absmax = torch.as_tensor(absmax, dtype=torch.float32)
    if not bool(torch.isfinite(absmax).all()) or bool((absmax < 0).any()):
        raise InputError(f"absmax must be finite and >= 0, got {absmax}")
    return _symmetric_scale(absmax, config.qmin, config.qmax)


def act_scale(x: Tensor, config: ActQuantConfig) -> Tensor:
    """float32 scale of ``x``: ``[..., 1]`` per token, or the 0-d per-tensor one from ``max|x|``."""
    x = x.float()
    if config.granularity == "per_token":
        return _symmetric_scale(x.abs().amax(-1, keepdim=True), config.qmin, config.qmax)
    return _symmetric_scale(x.abs().amax(), config.qmin, config.qmax)


def fake_quant_act(x: Tensor, config: ActQuantConfig, static_scale: Tensor | float | None = None) -> Tensor:
    """Quantize-dequantize activations (STE). ``per_tensor`` needs the calibrated ``static_scale``."""
    if config.granularity == "per_token" and static_scale is not None:
        raise InputError(
            "fake_quant_act: static_scale is only used with granularity='per_tensor'; "
            "drop it for dynamic per-token quantization or use ActQuantConfig(granularity='per_tensor')"
        )
    if config.granularity == "per_tensor":
        if static_scale is None:
            raise InputError(
                "fake_quant_act: granularity='per_tensor' needs static_scale; "
                "compute it with calibrate_static_scale(observed_absmax, config)"
            )
        scale = torch.as_tensor(static_scale, dtype=torch.float32, device=x.device)
    else:
        scale = act_scale(x, config)
    xf = x.float()
    return _dequantize(_quantize(xf, scale, None, config.qmin, config.qmax), scale, None).to(x.dtype)
