"""Weight-only linears (W4A16, also 2 and 3 bits) on PyTorch's int4 weight-only CPU kernel.

:func:`masq_fx.backends.lower_to_torchao` swaps every weight-only
:class:`~masq_fx.nn.quant_linear.QuantLinear` this kernel can compute (:func:`int4_unsupported_reason`)
for an :class:`Int4CpuLinear` with the same call signature ``(x, modality_ids, *positions)``.

The kernel (torch 2.13, ``aten/src/ATen/native/cpu/int4mm_kernel.cpp``), as measured here:

* ``_convert_weight_to_int4pack_for_cpu(u, inner_k_tiles)``: ``u`` int32 ``[N, K]`` of unsigned codes
  ``0..15``, ``N`` a multiple of 16; returns uint8 ``[N, K / 2]`` (two codes a byte, in the layout of the
  CPU's vector width); ``inner_k_tiles`` is ignored on CPU;
* ``_weight_int4pack_mm_for_cpu(x, packed, g, scales_and_zeros)``: ``x`` ``[M, K]`` 2-D contiguous
  float32, bfloat16 or float16, ``g`` in {32, 64, 128, 256} dividing ``K``, ``scales_and_zeros``
  ``[K / g, N, 2]`` of ``x``'s dtype; computes ``y = x · Wᵀ`` in ``x``'s dtype with
  ``W[n, k] = fma(u[n, k] - 8, scale[k // g, n], zero[k // g, n])`` in float32 (a fused multiply-add:
  one rounding) and float32 accumulation. The zero is a float offset, not an integer zero point.
  Only bfloat16 has vectorized (AVX2/AVX-512) x86 code: float32 and float16 run a scalar loop,
  10 to 100 times slower than the float32 GEMM they replace.

Our codes map onto it exactly: signed codes ``q`` in ``[-8, 7]`` (b ≤ 4 bits, full or restricted grid)
are stored as ``u = q + 8``. Per-channel weights use the largest kernel group dividing ``K`` (their
scale repeated), groups of ``G`` input channels the largest kernel group dividing ``G``; output channels
are padded to a multiple of 16 with zero weights. By ``kernel_dtype``:

* ``torch.float32``: the reference's numbers, on the slow scalar loop (for checking, not for speed).
  ``zero = −zp·scale`` (0 if symmetric): a symmetric weight is ``q·scale``, bit for bit
  :meth:`QuantLinear.quantized_weight <masq_fx.nn.quant_linear.QuantLinear.quantized_weight>`; an
  asymmetric one ``fma(q, s, −zp·s)``, not ``(q − zp)·s``: within ``(|zp|/2 + |q − zp|)·s·eps`` of it.
  Outputs agree within float32 rounding;
* ``torch.bfloat16`` (default, the fast kernel): the smoothed activation goes to the kernel in bfloat16
  and the GEMM's output comes back in bfloat16 (float32 accumulation inside). Per-channel weights keep
  their float32 scales: the kernel multiplies by the integer ``q − zp`` (scale 1, ``zero = −zp``, exact)
  and the scale is applied after it in float32. Group-wise weights compute with their scales rounded to
  bfloat16 (``s₁₆``, relative error ≤ 2⁻⁹) as ``(q − zp)·s₁₆``: the offset ``−zp·s₁₆`` (exact in float32)
  is split into its bfloat16 part, in the kernel, and the rest, added in float32 as the activation's group
  sums times it. Outputs agree within bfloat16 rounding (tests: ≤ 1e-2 · max|y| per linear).

Routed smoothing (``x ⊘ s[row]``, unless an upstream router divided), one packed weight per stored
scale row selected per token with ``torch.where``, float CMC branches (masked, or indexed by the
per-modality positions inputs) and the bias run in float32 around the kernel, as in
:class:`~masq_fx.backends.torchao_int8.Int8QuantLinear`; the module returns its input's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from masq_fx.backends.branches import branch_layout, stacked_branches
from masq_fx.errors import InputError
from masq_fx.nn.quant_linear import QuantLinear
from masq_fx.quantizers import QuantizedWeight

__all__ = ["KERNEL_DTYPES", "KERNEL_GROUP_SIZES", "Int4CpuLinear", "PackedInt4", "int4_unsupported_reason", "kernel_group_size", "pack_for_kernel"]

#: group sizes the kernel takes, largest first
KERNEL_GROUP_SIZES = (256, 128, 64, 32)
#: activation dtypes offered: bfloat16 (vectorized) and float32 (scalar loop, the reference's numbers)
KERNEL_DTYPES = (torch.bfloat16, torch.float32)
#: the kernel's output channels come in blocks of this many (weights are padded to it)
_N_BLOCK = 16


def kernel_group_size(in_features: int, group_size: int | None) -> int | None:
    """The kernel group for weights quantized per ``group_size`` input channels (``None``: per output
    channel): the largest of :data:`KERNEL_GROUP_SIZES` dividing the group; ``None`` if none does."""
    span = in_features if group_size is None else group_size
    return next((g for g in KERNEL_GROUP_SIZES if span % g == 0), None)


def int4_unsupported_reason(module: QuantLinear) -> str | None:
    """Why weight-only ``module`` cannot run on the int4 CPU kernel (``None`` if it can)."""
    state = module.state
    w = state.weight_quant
    if not module.quantizers_enabled:
        return "quantizers disabled (float linear)"
    if w is None:
        return "no weight quantizer"
    if state.act_quant is not None:
        return f"W{w.bits}A{state.act_quant.bits}: the int4 kernel is weight-only (float activations)"
    if w.bits > 4:
        return f"weight-only W{w.bits}A16: the int4 CPU kernel takes weights of at most 4 bits, the int8 kernels need quantized activations"
    if module.weight.device.type != "cpu":
        return f"weights on {module.weight.device.type}: the int4 kernel of this backend is CPU-only"
    if kernel_group_size(module.in_features, w.group_size) is None:
        what = f"group_size={w.group_size}" if w.group_size is not None else f"per-channel weights of {module.in_features} input channels"
        return f"{what}: the int4 CPU kernel takes groups of 32, 64, 128 or 256 input channels (or a multiple of 32)"
    if module.branch_codes:
        return "integer CMC factors (factor_bits) on a weight-only linear: they compute with 8-bit activations, not lowered"
    return None


@dataclass(frozen=True)
class PackedInt4:
    """One integer weight ``[out, in]`` in the kernel's form (:func:`pack_for_kernel`)."""

    #: uint8 ``[N, in / 2]``; ``N``: ``out`` rounded up to a multiple of 16 (zero weights)
    packed: Tensor
    #: ``[in / group, N, 2]`` in the kernel's dtype: scale and float zero offset of each kernel group
    scales_and_zeros: Tensor
    #: float32 ``[out]`` scales to apply after the kernel (bfloat16, per channel: the kernel computes with scale 1)
    channel_scales: Tensor | None
    #: float32 ``[out, in / group_size]``: what rounding the zero offsets to bfloat16 lost (asymmetric group-wise
    #: weights in bfloat16), added back in float32 as ``Σ_group x · residual``
    zero_residual: Tensor | None


@torch.no_grad()
def pack_for_kernel(codes: QuantizedWeight, group: int, kernel_dtype: torch.dtype) -> PackedInt4:
    """``codes`` (≤ 4 bits, ``[out, in]``) in the kernel's form, for kernel groups of ``group`` input channels."""
    out_features, in_features = codes.qdata.shape
    pad = -out_features % _N_BLOCK
    signed = F.pad(codes.qdata.to(torch.int32), (0, 0, 0, pad))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((signed + 8).contiguous(), 1)
    scale = codes.scale.float()
    per_channel = scale.shape[1] == 1
    zero_point = torch.zeros_like(scale) if codes.zero_point is None else codes.zero_point.float()
    outside = residual = None
    if kernel_dtype == torch.bfloat16 and per_channel:  # kernel weight q - zp, exact; scale after it in float32
        outside, zero, scale = scale[:, 0].contiguous(), -zero_point, torch.ones_like(scale)
    elif kernel_dtype == torch.float32:
        zero = -(zero_point * scale)
    else:  # (q − zp)·s₁₆: the offset −zp·s₁₆ (exact in float32) as its bfloat16 part and the residual
        scale = scale.to(kernel_dtype).float()
        zero = -(zero_point * scale)
        if codes.zero_point is not None:
            residual = (zero - zero.to(kernel_dtype).float()).contiguous()
    repeat = in_features // scale.shape[1] // group
    table = torch.stack([scale.repeat_interleave(repeat, 1), zero.repeat_interleave(repeat, 1)], dim=-1)  # [out, in / g, 2]
    table = F.pad(table, (0, 0, 0, 0, 0, pad)).transpose(0, 1).to(kernel_dtype).contiguous()
    return PackedInt4(packed, table, outside, residual)


class Int4CpuLinear(nn.Module):
    """Weight-only counterpart of a QuantLinear on the int4 CPU kernel: ``forward(x, modality_ids, *positions) -> y``.

    ``positions``: the token positions of each of :data:`~masq_fx.capture.positions.POSITION_MODALITIES`
    (inputs :func:`~masq_fx.backends.lower_to_torchao` adds with ``branch_layout="indexed"``); without
    them the CMC branches are computed masked. Built by :meth:`from_quant_linear`; holds no reference
    to the float weight.
    """

    row_of_modality: Tensor
    packed: Tensor
    scales_and_zeros: Tensor
    channel_scales: Tensor | None
    zero_residual: Tensor | None
    branch_left: Tensor | None
    branch_right: Tensor | None
    branch_rows: Tensor | None

    def __init__(
        self,
        name: str,
        weights: Sequence[QuantizedWeight],
        bias: Tensor | None,
        scales: Tensor | None,
        row_of_modality: Tensor,
        branches: dict[int, tuple[Tensor, Tensor]] | None = None,
        kernel_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        """``weights``: the integer weight of each stored scale row; ``branches``: float CMC factors (L, R) by scale row."""
        super().__init__()
        if kernel_dtype not in KERNEL_DTYPES:
            raise InputError(f"kernel_dtype must be torch.bfloat16 (fast) or torch.float32 (exact, slow), got {kernel_dtype}")
        self.name = name
        self.out_features, self.in_features = (int(n) for n in weights[0].qdata.shape)
        config = weights[0].config
        group = kernel_group_size(self.in_features, config.group_size)
        if config.bits > 4 or group is None:
            raise InputError(f"{name}: {config} cannot run on the int4 CPU kernel (at most 4 bits, groups of a multiple of 32)")
        self.group_size, self.kernel_dtype = group, kernel_dtype
        packed = [pack_for_kernel(w, group, kernel_dtype) for w in weights]
        self.register_buffer("packed", torch.stack([p.packed for p in packed]))
        self.register_buffer("scales_and_zeros", torch.stack([p.scales_and_zeros for p in packed]))
        outside = [p.channel_scales for p in packed if p.channel_scales is not None]
        self.register_buffer("channel_scales", torch.stack(outside) if outside else None)
        residual = [p.zero_residual for p in packed if p.zero_residual is not None]
        self.register_buffer("zero_residual", torch.stack(residual) if residual else None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.scales = None if scales is None else nn.Parameter(scales.detach().float().clone(), requires_grad=False)
        self.register_buffer("row_of_modality", row_of_modality.detach().long().clone())
        branches = branches or {}
        order = sorted(branches)
        self.branch_ranks = {row: int(branches[row][0].shape[1]) for row in order}
        self.branch_spans, self.position_rows = branch_layout(self.branch_ranks, self.row_of_modality)
        left, right, owner = stacked_branches(branches) if order else (None, None, None)
        self.register_buffer("branch_left", left)
        self.register_buffer("branch_right", right)
        self.register_buffer("branch_rows", owner)

    @classmethod
    def from_quant_linear(cls, module: QuantLinear, kernel_dtype: torch.dtype = torch.bfloat16) -> Int4CpuLinear:
        """The lowered ``module``; its stored weights' integer codes checked to dequantize to the reference's."""
        reason = int4_unsupported_reason(module)
        if reason is not None:
            raise InputError(f"{module.name} cannot be lowered to the int4 CPU kernel: {reason}")
        weights = []
        for row in module.stored_rows():
            codes = module.weight_codes(row)
            target = module.quantized_weight(row).detach().float()
            if not torch.equal(codes.dequantize().float(), target):
                error = (codes.dequantize().float() - target).abs().max()
                raise ValueError(
                    f"{module.name}: stored weights of row {row} are not on the grid of their scales (max deviation "
                    f"{float(error):.3g}); was the weight quantizer changed after freezing?"
                )
            weights.append(codes)
        return cls(
            name=module.name,
            weights=weights,
            bias=module.bias,
            scales=module.scales if module.state.divide_input else None,
            row_of_modality=module.row_of_modality,
            branches=dict(module.branches),
            kernel_dtype=kernel_dtype,
        )

    @property
    def takes_positions(self) -> bool:
        """Whether a modality's tokens take a branch (then the indexed layout can pass positions)."""
        return bool(self.position_rows)

    @property
    def weight_bytes(self) -> int:
        """Bytes held for the weights: packed codes, scales and zeros, per-channel scales."""
        tensors = (self.packed, self.scales_and_zeros, self.channel_scales, self.zero_residual)
        return sum(t.nbytes for t in tensors if t is not None)

    def _gemm(self, flat: Tensor, xs: Tensor, row: int) -> Tensor:
        """float32 ``[tokens, out]`` of the stored weight of ``row`` applied to ``flat`` (``xs`` in ``kernel_dtype``, 2-D)."""
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed[row], self.group_size, self.scales_and_zeros[row])
        y = y[:, : self.out_features].float()
        if self.channel_scales is not None:
            y = y * self.channel_scales[row]
        if self.zero_residual is not None:
            groups = self.zero_residual.shape[-1]
            y = y + xs.reshape(-1, groups, self.in_features // groups).sum(-1) @ self.zero_residual[row].T
        return y

    def forward(self, x: Tensor, modality_ids: Tensor, *positions: Tensor | None) -> Tensor:
        dtype = x.dtype
        rows = self.row_of_modality[modality_ids]
        xs = x.float()
        if self.scales is not None:
            xs = xs / self.scales[rows]
        flat = xs.reshape(-1, self.in_features).to(self.kernel_dtype).contiguous()
        shape = (*xs.shape[:-1], self.out_features)
        token_rows = rows.unsqueeze(-1)
        y = self._gemm(flat, xs, 0).view(shape)
        for row in range(1, self.packed.shape[0]):
            y = torch.where(token_rows == row, self._gemm(flat, xs, row).view(shape), y)
        if self.position_rows and positions and positions[0] is not None:
            y = self._indexed_branches(y, xs, cast(Sequence[Tensor], positions))  # all given or all None
        elif self.branch_left is not None:  # all modalities' branches in one GEMM pair, masked per token
            assert self.branch_right is not None  # set together
            h = (xs @ self.branch_left) * (token_rows == self.branch_rows)
            y = y + h @ self.branch_right
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype)

    def _indexed_branches(self, y: Tensor, source: Tensor, positions: Sequence[Tensor]) -> Tensor:
        """``y`` plus each modality's branch, computed on its tokens only (``positions``: flat token indices)."""
        assert self.branch_left is not None and self.branch_right is not None  # position_rows needs branches
        flat = y.reshape(-1, self.out_features)
        for index, row in self.position_rows:
            tokens = positions[index]
            if tokens.numel() == 0:
                continue
            start, stop = self.branch_spans[row]
            part = (source.reshape(-1, self.in_features)[tokens] @ self.branch_left[:, start:stop]) @ self.branch_right[start:stop]
            flat = flat.index_add(0, tokens, part)
        return flat.view(y.shape)

    def extra_repr(self) -> str:
        return (
            f"{self.name}, in={self.in_features}, out={self.out_features}, weight_rows={self.packed.shape[0]}, "
            f"group={self.group_size}, kernel_dtype={self.kernel_dtype}, routed_smoothing={self.scales is not None}, "
            f"branch_ranks={self.branch_ranks}"
        )
