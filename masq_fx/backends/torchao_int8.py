"""Lower a transformed graph's QuantLinears to torchao int8 kernels (W8A8 and W4A8, dynamic per-token activations).

:func:`lower_to_torchao` swaps every :class:`~masq_fx.nn.quant_linear.QuantLinear` whose weights are
symmetric per output channel (2 to 8 bits) and whose activations are 8-bit symmetric dynamic per token (full
int8 grid) for an :class:`Int8QuantLinear` with the same call signature ``(x, modality_ids)``. It
computes what the reference computes, with the integer GEMM done by torchao:

* per-token routed smoothing: ``x ⊘ s[row_of_modality[m]]`` (a gather; no-op if an upstream norm or
  router already divided). It divides, as the reference does, rather than multiplying by a
  precomputed ``1/s``: ``x·(1/s)`` is an ulp off often enough to move about 30% of the per-token
  scales (by an ulp) and 7e-5 of the activation codes (by one), while the two cost the same within
  timing noise (1.6% on a compiled 576→1536 linear, 512 tokens);
* one torchao ``Int8Tensor`` per stored weight row, built from the reference's own integer codes and
  per-channel scales (verified to dequantize to ``QuantLinear.quantized_weight(row)``); the call is
  ``F.linear(x, int8_weight)``, so torchao's ``__torch_function__`` quantizes the activation per
  token (same integers and scales as :func:`masq_fx.quantizers.fake_quant_act`, measured bit-exact)
  and runs the int8 GEMM;
* per-row outputs selected with ``torch.where`` (MAS simulation); CMC low-rank branches in one of
  two layouts (``branch_layout``), bias added last:

  - ``"indexed"`` (default): the graph takes each modality's token positions as inputs
    (:mod:`masq_fx.capture.positions`; computed from ``modality_ids`` when the caller passes only the
    usual inputs), and each branch is computed on its modality's tokens alone and added back with
    ``index_add``. A module called without them computes its branches masked;
  - ``"masked"``: the branches stacked into one GEMM pair for every token, each token keeping only its
    own row's rank columns (no extra graph inputs).

CMC branches with float factors run as two float32 GEMMs. Branches with integer factors
(``CMCConfig.factor_bits``) run on the int8 kernels, with the reference's codes:

* ``x̃·L``: the codes of every branch's ``Lᵀ`` (per rank column) are appended to the main weight's
  rows, so one int8 GEMM of ``out + R`` columns gives ``y`` and the hidden ``h``. The branch input
  is the main GEMM's (the smoothed input, quantized per token to 8 bits) and each column has its own
  scale, so this is exactly the reference's ``Q_8(x̃)·Q_b(L)``. A separate GEMM would not do: inductor
  shares the activation quantization between the two, and then rewrites neither into oneDNN qlinear
  (it fuses an int8 GEMM only when its quantized activation has no other consumer);
* ``h·R``: ``h`` masked per token (or each branch's columns of its own tokens' ``h``, indexed), then
  ``F.linear`` with an ``Int8Tensor`` of the stacked (or the branch's) ``Rᵀ`` codes and unit scales (torchao quantizes ``h`` per token with ``SYMMETRIC_NO_CLIPPING_ERR``, as the
  reference's :func:`~masq_fx.nn.quant_linear.fake_quant_hidden`); each token's output is multiplied by
  its own branch's per-channel scales (a ``[rows, out]`` table gathered per token), so every branch
  keeps its own scales of ``R``. ``h`` is a float product here and in the reference, rounded
  differently, so now and then one of its codes differs by one step between the two (measured: 1
  code in 2·10⁵ on random 576 → 256 linears with rank-16 branches).

Like the reference, the module computes in float32 and returns its input's dtype: a bfloat16
graph's activations are cast to float32 before the smoothing and the int8 GEMM, and the output is
cast back. torchao's ``Int8Tensor`` does take bfloat16 activations (and returns bfloat16), but it
then derives the per-token scales in bfloat16: on bfloat16 inputs about 5% of the activation
codes and nearly every scale differ from the float32 quantization of the same values.

Weights of fewer than 8 bits (W4A8) keep their integer codes on the int8 kernel: resident as one byte
per weight (checkpoints pack 4-bit codes two per byte), computed exactly as the reference computes them.

Weight-only linears of at most 4 bits (W4A16) go to PyTorch's int4 weight-only CPU kernel instead
(:class:`~masq_fx.backends.int4_cpu.Int4CpuLinear`, bfloat16 activations in the kernel by default).

Anything else (asymmetric or group-wise weights with quantized activations, static per-tensor or
restricted-grid activations, weight-only of more than 4 bits, quantizers off) stays a QuantLinear, and
the :class:`LoweringReport` says which and why (a warning is raised as well).

:func:`compile_graph` compiles a (lowered or float) graph with ``fullgraph=True`` and :data:`INDUCTOR_OPTIONS`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.experimental.symbolic_shapes import guard_or_true
from torchao.quantization import Int8Tensor, PerRow
from torchao.quantization.quant_primitives import MappingType
from torchao.quantization.quantize_.workflows.int8.int8_tensor import QuantizeTensorToInt8Kwargs

from masq_fx.backends.branches import branch_layout, stacked_branches
from masq_fx.backends.int4_cpu import KERNEL_DTYPES, Int4CpuLinear, int4_unsupported_reason
from masq_fx.capture.decoder import CapturedDecoder
from masq_fx.capture.positions import CompletePositions, add_position_inputs
from masq_fx.nn.quant_linear import QuantLinear
from masq_fx.nn.sparsity import SparseInputLinear, Threshold
from masq_fx.quantizers import ActQuantConfig, QuantizedWeight, fake_quant_act

__all__ = [
    "INDUCTOR_OPTIONS",
    "CompiledGraph",
    "Int8QuantLinear",
    "LoweringReport",
    "compile_graph",
    "lower_to_torchao",
    "unsupported_reason",
]

BranchLayout = Literal["indexed", "masked"]


#: ``torch._inductor.config`` settings that :class:`CompiledGraph` applies (``config.patch``) while it
#: runs: freezing makes the weights constants, so inductor folds weight-only work (transposes, the
#: u8s8 compensation column sums) and torchao's x86 freezing pass can rewrite an int8 GEMM whose
#: quantized activation has no other consumer into a oneDNN int8 linear with a prepacked weight;
#: float linears get MKL-prepacked weights the same way. torchao's
#: ``recommended_inductor_config_setter`` (coordinate-descent tuning, int_mm+mul fusion, Triton
#: names) targets GPUs and is not used.
INDUCTOR_OPTIONS: dict[str, object] = {"freezing": True}

_INT8_ACT = QuantizeTensorToInt8Kwargs(granularity=PerRow(), mapping_type=MappingType.SYMMETRIC)
#: the CMC hidden's quantization (:func:`masq_fx.nn.quant_linear.fake_quant_hidden`)
_INT8_HIDDEN = QuantizeTensorToInt8Kwargs(granularity=PerRow(), mapping_type=MappingType.SYMMETRIC_NO_CLIPPING_ERR)


def unsupported_reason(module: QuantLinear) -> str | None:
    """Why ``module`` cannot run on the int8 kernels (``None`` if it can)."""
    state = module.state
    w, a = state.weight_quant, state.act_quant
    if not module.quantizers_enabled:
        return "quantizers disabled (float linear)"
    if w is None:
        return "no weight quantizer"
    if a is None:
        return (
            f"weight-only W{w.bits}A16: the int8 kernels need activation quantization (lower_to_torchao puts weight-only "
            "linears of at most 4 bits on the int4 CPU kernel, masq_fx.backends.int4_cpu)"
        )
    if not w.symmetric:
        return "asymmetric weights (torchao's int8 kernels take symmetric weights)"
    if w.group_size is not None:
        return f"group-wise weights (group_size={w.group_size}); the int8 kernels are per output channel"
    if a.granularity != "per_token":
        return f"{a.granularity} static activations (kernels quantize dynamically per token)"
    if a.bits != 8:
        return f"{a.bits}-bit activations (kernels quantize activations to int8)"
    if a.grid != "full":
        return f"activation grid {a.grid!r} (torchao quantizes activations on the full int8 grid [-128, 127])"
    if module.branch_codes and state.branch_input != "smoothed":
        return (
            "integer CMC branches reading the quantized input (branch_input='quantized'): on the kernels the branch "
            "shares the main GEMM's smoothed input"
        )
    return None


@torch.no_grad()
def _int8_weight(module: QuantLinear, row: int) -> Int8Tensor:
    """torchao int8 weight of ``module.quantized_weight(row)``: the reference's own integer codes and
    per-channel scales (rounded to nearest, clipped, or solved by GPTQ), checked to dequantize to it."""
    config = module.state.weight_quant
    assert config is not None  # unsupported_reason: a weight quantizer is set
    codes = module.weight_codes(row)
    target = module.quantized_weight(row).detach().float()
    restored = codes.qdata.float() * codes.scale.float()
    if codes.zero_point is not None or codes.scale.shape[-1] != 1 or not torch.equal(restored, target):
        error = (restored - target).abs().max()
        raise ValueError(
            f"{module.name}: stored weights of row {row} are not on the per-channel {config.bits}-bit grid of their "
            f"scales (max deviation {float(error):.3g}); was the weight quantizer changed after freezing?"
        )
    return _int8_tensor(codes.qdata.float(), codes.scale.float())


def _int8_tensor(codes: Tensor, scale: Tensor, act: QuantizeTensorToInt8Kwargs = _INT8_ACT) -> Int8Tensor:
    """torchao int8 weight ``[out, in]`` with per-output-channel ``scale [out, 1]``; ``act``: how torchao
    quantizes the activation (per token)."""
    return Int8Tensor(
        codes.to(torch.int8).contiguous(),
        scale.float().contiguous(),
        block_size=[1, codes.shape[1]],
        dtype=torch.float32,
        act_quant_kwargs=act,
    )


def _pad_one_column(codes: Tensor) -> Tensor:
    """``codes [out, 1]`` with a zero column appended: torchao cannot quantize a one-column activation."""
    return F.pad(codes, (0, 1)) if codes.shape[1] == 1 else codes


@dataclass(frozen=True)
class _Int8Branches:
    """Integer CMC branches in the form the kernels take (see the module docstring)."""

    #: codes ``[R, in]`` and scales ``[R, 1]`` of the stacked ``Lᵀ``, appended to the main weight
    left_codes: Tensor
    left_scale: Tensor
    #: ``Int8Tensor`` of the stacked ``Rᵀ [out, R]`` codes with unit scales (masked layout)
    right: Int8Tensor
    #: scale row → ``Int8Tensor`` of that branch's ``Rᵀ`` codes with unit scales (indexed layout)
    right_rows: dict[int, Int8Tensor]
    #: ``[rows, out]``: row ``r``'s per-channel scales of ``R`` (zeros for a row without a branch)
    right_scale: Tensor
    #: scale row of each of the ``R`` rank columns
    owner: Tensor

    @classmethod
    def stack(cls, codes: dict[int, tuple[QuantizedWeight, QuantizedWeight]], rows: int) -> _Int8Branches:
        order = sorted(codes)
        lefts, rights = [codes[r][0] for r in order], [codes[r][1] for r in order]
        out_features = rights[0].qdata.shape[0]
        device = rights[0].qdata.device
        unit = torch.ones(out_features, 1, device=device)
        right_scale = torch.zeros(rows, out_features, device=device)
        for r, right in zip(order, rights):
            right_scale[r] = right.scale[:, 0]
        left_codes, left_scale = torch.cat([w.qdata for w in lefts]), torch.cat([w.scale for w in lefts])
        right_codes = torch.cat([w.qdata for w in rights], dim=1)
        owner = torch.cat([torch.full((w.qdata.shape[0],), r, device=device) for r, w in zip(order, lefts)])
        if len(owner) == 1:  # a zero column no token owns
            left_codes, left_scale = F.pad(left_codes, (0, 0, 0, 1)), F.pad(left_scale, (0, 0, 0, 1), value=1.0)
            right_codes, owner = _pad_one_column(right_codes), F.pad(owner, (0, 1), value=-1)
        return cls(
            left_codes=left_codes,
            left_scale=left_scale,
            right=_int8_tensor(right_codes, unit, _INT8_HIDDEN),
            right_rows={r: _int8_tensor(_pad_one_column(w.qdata), unit, _INT8_HIDDEN) for r, w in zip(order, rights)},
            right_scale=right_scale,
            owner=owner,
        )


#: CUDA's int8 GEMM (``torch._int_mm``) needs more than this many rows
_CUDA_INT_MM_MIN_ROWS = 16
#: oneDNN's fused int8 linear (what inductor makes of torchao's GEMM on CPU) takes 1 to 8 ms when the
#: output has at most this many elements, against about 0.1 ms just above (measured on an AMX-INT8 CPU,
#: torch 2.13: 576 → 192 at 1 row 1.7 ms, at 2 rows 0.09 ms); one decode token of a k/v projection
#: with 128 to 256 channels (GQA) falls in it
_CPU_QLINEAR_MIN_OUTPUTS = 256


def _min_rows(x: Tensor, weight: Tensor) -> int:
    """The fewest rows the int8 GEMM of ``x`` with ``weight`` (``[out, in]``) runs well with on ``x``'s device."""
    if x.device.type == "cuda":
        return _CUDA_INT_MM_MIN_ROWS + 1
    return _CPU_QLINEAR_MIN_OUTPUTS // weight.shape[0] + 1


def _int8_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear`` with int8 weights; inputs of fewer rows than the kernel runs well with (decode, a rarely
    routed expert) are padded with zero rows (each row is quantized on its own, so the real rows are unchanged).
    An MoE expert's rows, a data-dependent count in a compiled graph, are padded without branching."""
    tokens = x.numel() // x.shape[-1]
    rows = _min_rows(x, weight)
    if not guard_or_true(tokens < rows):  # unbacked (an expert's rows): treated as few
        return F.linear(x, weight)
    flat = x.reshape(tokens, x.shape[-1])
    # ``rows`` more (at least 2: torchao's activation quantizer needs to know there is more than one row), so that
    # the count is provably enough even unbacked
    padded = torch.cat([flat, flat.new_zeros(max(rows, 2), x.shape[-1])])
    return F.linear(padded, weight)[:tokens].reshape(*x.shape[:-1], weight.shape[0])


class Int8QuantLinear(nn.Module):
    """W8A8/W4A8 counterpart of a QuantLinear on torchao int8 kernels: ``forward(x, modality_ids, *positions) -> y``.

    ``positions``: the token positions of each of :data:`~masq_fx.capture.positions.POSITION_MODALITIES`
    (graph inputs added by :func:`lower_to_torchao` with ``branch_layout="indexed"``); without them
    (or ``None``) the CMC branches are computed masked. Built by :meth:`from_quant_linear`; holds no
    reference to the float weight.
    """

    #: buffers (``None`` where the layout does not use them) and the integer ``Rᵀ`` of the masked layout
    row_of_modality: Tensor
    branch_left: Tensor | None
    branch_right: Tensor | None
    branch_rows: Tensor | None
    int8_right: nn.Parameter | None
    int8_right_scale: Tensor | None

    def __init__(
        self,
        name: str,
        weights: Sequence[Int8Tensor],
        bias: Tensor | None,
        scales: Tensor | None,
        row_of_modality: Tensor,
        act_quant: ActQuantConfig,
        branches: dict[int, tuple[Tensor, Tensor]] | None = None,
        branch_input: Literal["smoothed", "quantized"] = "smoothed",
        branch_codes: dict[int, tuple[QuantizedWeight, QuantizedWeight]] | None = None,
    ) -> None:
        """``branches``: float CMC factors (L, R) by scale row; ``branch_codes``: integer ones (Lᵀ, Rᵀ), in
        which case ``branches`` is ignored (see the module docstring for how each runs)."""
        super().__init__()
        self.name = name
        self.in_features, self.out_features = int(weights[0].shape[1]), int(weights[0].shape[0])
        weights = list(weights)
        int8 = _Int8Branches.stack(branch_codes, max(int(row_of_modality.max()), *branch_codes) + 1) if branch_codes else None
        if int8 is not None:  # x̃·L as extra output columns of the main GEMM
            main = weights[0]
            weights[0] = _int8_tensor(torch.cat([main.qdata, int8.left_codes]), torch.cat([main.scale, int8.left_scale]))
            branches = None
        self.weights = nn.ParameterList([nn.Parameter(w, requires_grad=False) for w in weights])
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.scales = None if scales is None else nn.Parameter(scales.detach().float().clone(), requires_grad=False)
        self.register_buffer("row_of_modality", row_of_modality.detach().long().clone())
        self.act_quant = act_quant
        if branch_codes:  # int8 is not None
            self.branch_ranks = {row: int(left.qdata.shape[0]) for row, (left, _) in sorted(branch_codes.items())}
        else:
            self.branch_ranks = {row: int(left.shape[1]) for row, (left, _) in sorted((branches or {}).items())}
        #: scale row → its columns of the stacked factors (and of the hidden); the positions inputs' rows
        self.branch_spans, self.position_rows = branch_layout(self.branch_ranks, self.row_of_modality)
        left, right, owner = stacked_branches(branches) if branches else (None, None, None)
        self.register_buffer("branch_left", left)
        self.register_buffer("branch_right", right)
        self.register_buffer("branch_rows", int8.owner if int8 is not None else owner)
        self.register_parameter("int8_right", None if int8 is None else nn.Parameter(int8.right, requires_grad=False))
        right_rows = {} if int8 is None else int8.right_rows
        self.int8_right_rows = nn.ParameterDict({str(r): nn.Parameter(w, requires_grad=False) for r, w in right_rows.items()})
        self.register_buffer("int8_right_scale", None if int8 is None else int8.right_scale)
        self.branch_input = branch_input

    @classmethod
    def from_quant_linear(cls, module: QuantLinear) -> Int8QuantLinear:
        reason = unsupported_reason(module)
        if reason is not None:
            raise ValueError(f"{module.name} cannot be lowered to int8 kernels: {reason}")
        assert module.state.act_quant is not None  # unsupported_reason: an activation quantizer is set
        return cls(
            name=module.name,
            weights=[_int8_weight(module, row) for row in module.stored_rows()],
            bias=module.bias,
            scales=module.scales if module.state.divide_input else None,
            row_of_modality=module.row_of_modality,
            act_quant=module.state.act_quant,
            branches=dict(module.branches),
            branch_input=module.state.branch_input,
            branch_codes=dict(module.branch_codes),
        )

    @property
    def takes_positions(self) -> bool:
        """Whether a modality's tokens take a branch (then the indexed layout can pass positions)."""
        return bool(self.position_rows)

    def forward(self, x: Tensor, modality_ids: Tensor, *positions: Tensor | None) -> Tensor:
        dtype = x.dtype
        rows = self.row_of_modality[modality_ids]
        xs = x.float()
        if self.scales is not None:
            xs = xs / self.scales[rows]
        token_rows = rows.unsqueeze(-1)
        y = _int8_linear(xs, self.weights[0])
        hidden = None
        if self.int8_right is not None:
            y, hidden = y[..., : self.out_features], y[..., self.out_features :]
        for row in range(1, len(self.weights)):
            y = torch.where(token_rows == row, _int8_linear(xs, self.weights[row]), y)
        source = xs
        if self.branch_left is not None and self.branch_input == "quantized":
            source = fake_quant_act(xs, self.act_quant)
        if self.position_rows and positions and positions[0] is not None:
            y = self._indexed_branches(y, source, hidden, cast(Sequence[Tensor], positions))  # all given or all None
        elif self.branch_left is not None:  # all modalities' branches in one GEMM pair, masked per token
            assert self.branch_right is not None  # float factors are set together
            h = (source @ self.branch_left) * (token_rows == self.branch_rows)
            y = y + h @ self.branch_right
        elif hidden is not None:
            assert self.int8_right is not None and self.int8_right_scale is not None  # set with the hidden columns
            hidden = hidden * (token_rows == self.branch_rows)
            y = y + _int8_linear(hidden, self.int8_right) * self.int8_right_scale[rows]
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype)

    def _indexed_branches(self, y: Tensor, source: Tensor, hidden: Tensor | None, positions: Sequence[Tensor]) -> Tensor:
        """``y`` plus each modality's branch, computed on its tokens only (``positions``: flat token indices)."""
        flat = y.reshape(-1, self.out_features)
        for index, row in self.position_rows:
            tokens = positions[index]
            if tokens.numel() == 0:
                continue
            start, stop = self.branch_spans[row]
            if hidden is None:
                assert self.branch_left is not None and self.branch_right is not None  # float factors
                part = (source.reshape(-1, self.in_features)[tokens] @ self.branch_left[:, start:stop]) @ self.branch_right[start:stop]
            else:
                assert self.int8_right_scale is not None  # set with the hidden columns
                h = hidden.reshape(-1, hidden.shape[-1])[tokens, start:stop]
                h = F.pad(h, (0, 1)) if stop - start == 1 else h
                part = _int8_linear(h, self.int8_right_rows[str(row)]) * self.int8_right_scale[row]
            flat = flat.index_add(0, tokens, part)
        return flat.view(y.shape)

    def extra_repr(self) -> str:
        return (
            f"{self.name}, in={self.in_features}, out={self.out_features}, weight_rows={len(self.weights)}, "
            f"routed_smoothing={self.scales is not None}, branch_ranks={self.branch_ranks}, "
            f"int8_branches={self.int8_right is not None}"
        )


@dataclass
class LoweringReport:
    """Which QuantLinears were lowered, and why the others were not (module name → reason)."""

    lowered: list[str] = field(default_factory=list)
    unlowered: dict[str, str] = field(default_factory=dict)
    #: those of ``lowered`` on the int4 weight-only CPU kernel (the others are on torchao int8)
    int4: list[str] = field(default_factory=list)
    #: float linears moved onto the sparse-input kernel (:func:`masq_fx.backends.sparse.lower_sparse`)
    sparse: int = 0

    def __str__(self) -> str:
        int8 = len(self.lowered) - len(self.int4)
        kernels = "torchao int8" if not self.int4 else "the int4 CPU kernel" if not int8 else f"torchao int8 ({int8}) and the int4 CPU kernel ({len(self.int4)})"
        lines = [f"lowered {len(self.lowered)} QuantLinears to {kernels}, left {len(self.unlowered)} on the reference path"]
        if self.sparse:
            lines.append(f"{self.sparse} float linears on the sparse-input kernel")
        lines += [f"  {name}: {reason}" for name, reason in self.unlowered.items()]
        return "\n".join(lines)


def lower_to_torchao(
    target: CapturedDecoder | fx.GraphModule, branch_layout: BranchLayout = "indexed", int4_dtype: torch.dtype = torch.bfloat16
) -> LoweringReport:
    """Replace (in place) every lowerable QuantLinear of a transformed graph by an :class:`Int8QuantLinear`, or,
    weight-only of at most 4 bits, an :class:`~masq_fx.backends.int4_cpu.Int4CpuLinear` (``int4_dtype``: its
    kernel's activation dtype, bfloat16 (fast) or float32 (the reference's numbers, a slow scalar kernel)).

    With ``branch_layout="indexed"`` and CMC branches, the graph gains the per-modality positions
    inputs (:mod:`masq_fx.capture.positions`; a call with the usual inputs computes them). The float weights (shared with
    the HF model) are not modified. Warns if some QuantLinears stay on the reference path; the report
    names them with the reason.
    """
    gm = target.graph_module if isinstance(target, CapturedDecoder) else target
    if branch_layout not in ("indexed", "masked"):
        raise ValueError(f"branch_layout must be 'indexed' or 'masked', got {branch_layout!r}")
    if int4_dtype not in KERNEL_DTYPES:
        raise ValueError(f"int4_dtype must be torch.bfloat16 (fast) or torch.float32 (the reference's numbers, slow), got {int4_dtype}")
    report = LoweringReport()
    indexed: list[fx.Node] = []
    token_ids = next(n for n in gm.graph.find_nodes(op="placeholder") if n.name == "modality_ids")
    for node in gm.graph.find_nodes(op="call_module"):
        module = gm.get_submodule(str(node.target))
        if not isinstance(module, QuantLinear):
            continue
        weight_only = module.quantizers_enabled and module.state.weight_quant is not None and module.state.act_quant is None
        reason = int4_unsupported_reason(module) if weight_only else unsupported_reason(module)
        if reason is not None:
            report.unlowered[module.name] = reason
            continue
        lowered: Int8QuantLinear | Int4CpuLinear
        if weight_only:
            lowered = Int4CpuLinear.from_quant_linear(module, int4_dtype)
            report.int4.append(module.name)
        else:
            lowered = Int8QuantLinear.from_quant_linear(module)
        gm.add_submodule(str(node.target), lowered)
        report.lowered.append(module.name)
        if branch_layout == "indexed" and lowered.takes_positions and node.args[1] is token_ids:  # an expert's rows
            indexed.append(node)  # are not the graph's tokens: its branches stay masked
    if not report.lowered and not report.unlowered:
        raise ValueError("the graph has no QuantLinears: run PrepareQuantLinears and the quantizer transforms first")
    if report.unlowered:
        warnings.warn(str(report), stacklevel=2)
    add_position_inputs(gm, indexed)
    gm.recompile()
    return report


@functools.cache
def _register_torchao_x86_int8_pattern() -> None:
    """Register torchao's x86 freezing pattern for its int8 GEMM (the u8s8 form torchao emits on CPUs
    with VNNI and without AMX, which inductor's built-in pattern does not match). Torchao registers
    it only as a side effect of importing its PT2E x86 quantizer, which also installs a global
    pre-grad pass; this registers the one pattern (a private torchao 0.18 function)."""
    from torchao.quantization.pt2e.inductor_passes.x86 import _register_smooth_quant_int_mm_pattern

    _register_smooth_quant_int_mm_pattern()


class CompiledGraph:
    """``torch.compile(gm, fullgraph=True)``, run without autograd under :data:`INDUCTOR_OPTIONS`.

    Called with the graph's usual inputs; when the graph takes per-modality token positions (indexed
    CMC branches), they are computed from ``modality_ids`` and passed as well. Compilation happens at
    the first call (and on recompiles), so the options are applied around every call;
    ``torch.compile(options=...)`` does not enable freezing in torch 2.13.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        if any(t.device.type == "cpu" for t in gm.parameters()):  # a oneDNN (CPU) rewrite; it checks no device
            _register_torchao_x86_int8_pattern()
        self.positions = CompletePositions.of(gm)
        self.compiled = torch.compile(gm, fullgraph=True)
        # a threshold's sparse-input kernel keeps a data-dependent count of rows
        self.dynamic_outputs = any(isinstance(m, SparseInputLinear) and isinstance(m.sparsifier, Threshold) for m in gm.modules())

    def __call__(self, *args: Tensor) -> Tensor:
        if self.positions is not None:  # outside the compiled region: nonzero has a data-dependent shape
            args = self.positions.complete(args)
        with (
            torch.no_grad(),
            torch._inductor.config.patch(INDUCTOR_OPTIONS),
            torch._dynamo.config.patch(capture_dynamic_output_shape_ops=self.dynamic_outputs),
        ):
            return self.compiled(*args)


def compile_graph(target: CapturedDecoder | fx.GraphModule) -> CompiledGraph:
    """Compile a (lowered or float) decoder graph; call the result with the graph's positional inputs."""
    return CompiledGraph(target.graph_module if isinstance(target, CapturedDecoder) else target)
