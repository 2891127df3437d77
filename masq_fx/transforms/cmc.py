"""Cross-Modal Compensation (CMC): one stored weight plus a whitened low-rank branch per modality.

After MAS, each linear has a scale row per modality. CMC keeps a single quantized weight
``Q(W·diag(s_t))`` (text's) and, for every other row ``m``, adds ``x̃·L_m·R_m`` to that row's tokens,
where ``x̃ = x ⊘ s_m``. The branch approximates the error ``E_m = W·diag(s_m) − Q(W·diag(s_t))``
(or ``Q(W·diag(s_m)) − Q(W·diag(s_t))`` with ``target="quantized"``) in the norm that matters on
that modality's activations::

    C̃ = D⁻¹ C D⁻¹ + λ·mean(diag(D⁻¹ C D⁻¹))·I      (C = Σ xᵀx of modality m, float64; D = diag(s_m))
    C̃ = U S Uᵀ (eigh);   T = S^½ Uᵀ  (TᵀT = C̃);   T⁻¹ = U S^-½   (closed form, no inverse)
    T Eᵀ = U' Σ V'ᵀ (SVD);   L = T⁻¹ U'_r;   R = Σ_r V'_rᵀ

so ``E[‖x̃(Eᵀ − LR)‖²] ∝ ‖T(Eᵀ − LR)‖²_F`` is minimal among rank-``r`` factors (Eckart–Young in
the whitened space). ``whiten=False`` uses ``T = I`` (plain truncated SVD). ``C`` is the raw
second moment the observers collected on the float stream; no second calibration pass.

The rank is ``rank`` (absolute) or ``⌊rank_ratio·min(d_in, d_out)⌋``, at least ``rank_floor``
(0 by default; the official code uses 32), at most ``min(d_in, d_out)``. A modality without its
own scale row (absent from calibration) gets no branch; one whose second moment was not collected
gets an unwhitened branch, with a warning.

``own_channels=k`` (an int, or ``"rank"`` for the branch's rank) first projects every non-text scale
row onto text's except in ``k`` input channels: those where the mismatch costs most on that
modality's activations, ``diag(C)_j / s_m[j]² · ‖W[:, j]‖² · (s_m[j] − s_t[j])²`` summed over the
linears sharing the table. The mismatch part of ``E`` is then ``W·diag(s_m − s_t)`` with at most ``k``
non-zero columns, so a rank-``k`` branch leaves at most the text weight's quantization error on those
tokens (Eckart–Young) instead of an unreachable full-rank mismatch. ``None`` (the spec) keeps every
channel's own scale.

``factor_bits=b`` stores ``L`` and ``R`` as b-bit codes (per rank column of ``L``, per output channel
of ``R``) and computes the branch as torchao's int8 kernels do: the branch input and the masked
hidden ``x̃·L`` quantized dynamically per token to 8 bits (see :mod:`masq_fx.nn.quant_linear`). The
lowered module then runs ``x̃·L`` inside the main int8 GEMM and ``h·R`` as a second int8 GEMM,
instead of two float32 GEMMs. The reported errors are those of the quantized factors.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from torch import Tensor, fx

from masq_fx.distributed import gather, solve_once
from masq_fx.errors import CoverageWarning
from masq_fx.modality import Modality
from masq_fx.nn.quant_linear import WEIGHT_BLOCK_ROWS, QuantLinear
from masq_fx.pipeline import Capability, Context
from masq_fx.transforms.prepare import quant_linears
from masq_fx.transforms.quantize import WEIGHT_QUANT
from masq_fx.transforms.smoothing import SCALES

CMC = Capability.CMC
SCALES_PROJECTED = Capability.SCALES_PROJECTED


@dataclass(frozen=True)
class CMCConfig:
    """Rank: ``rank`` (absolute) or ``rank_ratio`` (of ``min(d_in, d_out)``), at most one of them;
    neither means ``rank_ratio=0.2``. ``factor_bits``: ``None`` keeps the factors float32, ``b`` (2 to 8)
    stores them as b-bit codes computed with 8-bit activations on the int8 kernels."""

    rank_ratio: float | None = None
    rank: int | None = None
    rank_floor: int = 0
    damping: float = 0.01
    target: Literal["float", "quantized"] = "float"
    whiten: bool = True
    branch_input: Literal["smoothed", "quantized"] = "smoothed"
    factor_bits: int | None = None
    own_channels: int | Literal["rank"] | None = None

    def __post_init__(self) -> None:
        own = self.own_channels
        if own is not None and own != "rank" and (isinstance(own, bool) or not isinstance(own, int) or own < 0):
            raise ValueError(f"own_channels must be None (all channels), 'rank' or a non-negative int, got {own!r}")
        if self.rank is not None and self.rank_ratio is not None:
            raise ValueError("set at most one of rank (absolute) and rank_ratio (fraction of min(d_in, d_out))")
        if self.rank_ratio is not None and not 0.0 < self.rank_ratio <= 1.0:
            raise ValueError(f"rank_ratio must lie in (0, 1], got {self.rank_ratio}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        if not self.damping >= 0:
            raise ValueError(f"damping must be a non-negative number, got {self.damping}")
        if self.target not in ("float", "quantized"):
            raise ValueError(f"target must be 'float' or 'quantized', got {self.target!r}")
        if self.branch_input not in ("smoothed", "quantized"):
            raise ValueError(f"branch_input must be 'smoothed' or 'quantized', got {self.branch_input!r}")
        bits = self.factor_bits
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8):
            raise ValueError(
                f"factor_bits must be None (float32 factors) or an int in [2, 8] (codes on the int8 kernels), got {bits!r}"
            )
        if bits is not None and self.branch_input == "quantized":
            raise ValueError(
                "factor_bits quantizes the branch input per token to 8 bits itself; with branch_input='quantized' "
                "it would be quantized twice: use branch_input='smoothed' (or factor_bits=None)"
            )

    def own_channels_for(self, d_in: int, d_out: int) -> int | None:
        """Input channels that keep a modality's own scale (``None``: all of them)."""
        if self.own_channels is None:
            return None
        return min(d_in, self.rank_for(d_in, d_out) if self.own_channels == "rank" else self.own_channels)

    def rank_for(self, d_in: int, d_out: int) -> int:
        full = min(d_in, d_out)
        ratio = 0.2 if self.rank_ratio is None else self.rank_ratio
        wanted = self.rank if self.rank is not None else math.floor(ratio * full)
        return max(1, min(full, max(self.rank_floor, wanted)))


@dataclass(frozen=True)
class Whitening:
    """``T`` with ``TᵀT = C̃`` and its closed-form inverse."""

    t: Tensor
    t_inv: Tensor

    @classmethod
    def from_moment(cls, moment: Tensor, scale: Tensor, damping: float) -> Whitening:
        inv = 1.0 / scale.double()
        c = moment.double() * inv[:, None] * inv[None, :]
        c = c + damping * c.diagonal().mean().clamp_min(1e-30) * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
        eigenvalues, u = torch.linalg.eigh(c)
        # eigenvalues under eigh's resolution (n·eps·λ_max) are numerically zero: a singular moment
        # (damping 0 and fewer tokens than channels) would otherwise give T⁻¹ ~ 1/√tiny = inf in float32
        f64 = torch.finfo(torch.float64)
        floor = (eigenvalues.max() * c.shape[0] * f64.eps).clamp_min(f64.tiny)
        eigenvalues = eigenvalues.clamp_min(floor)
        return cls(t=eigenvalues.sqrt()[:, None] * u.T, t_inv=u * eigenvalues.rsqrt()[None, :])

    @classmethod
    def identity(cls, channels: int, device: torch.device | str = "cpu") -> Whitening:
        eye = torch.eye(channels, dtype=torch.float64, device=device)
        return cls(t=eye, t_inv=eye)


@dataclass(frozen=True)
class BranchReport:
    """Diagnostics of one branch."""

    module: str
    modality: Modality
    rank: int
    #: ‖T(Eᵀ − LR)‖ / ‖TEᵀ‖ (whitened, i.e. on the calibration distribution)
    relative_error: float
    #: exp(entropy of the normalised singular values of TEᵀ)
    effective_rank: float
    #: branch parameters (= extra multiply-adds per token) relative to the dense weight's
    overhead: float


def low_rank_factors(error_t: Tensor, whitening: Whitening, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(L, R, singular values) of the rank-``rank`` whitened approximation of ``error_t`` = Eᵀ [in, out]."""
    return _whitened_factors(whitening.t @ error_t.double(), whitening, rank)


def _whitened_factors(a: Tensor, whitening: Whitening, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(L, R, singular values) of the rank-``rank`` approximation of Eᵀ from ``a = T·Eᵀ`` (float64, left as is).

    The singular vectors come from the eigendecomposition of the smaller Gram matrix of ``a`` (``aaᵀ`` or
    ``aᵀa``) rather than an SVD of ``a``: the same rank-``rank`` projection, several times faster for the wide
    matrices of real models (a 2048 × 11008 gate_proj error: one GEMM and a 2048² eigh instead of a
    2048 × 11008 SVD).
    """
    if a.shape[0] <= a.shape[1]:
        eigenvalues, u = torch.linalg.eigh(a @ a.T)  # ascending
        u = u.flip(-1)[:, :rank]
        right = u.T @ a  # σ·vᵀ of the top singular triplets
    else:
        eigenvalues, v = torch.linalg.eigh(a.T @ a)
        v = v.flip(-1)[:, :rank]
        u = torch.linalg.qr(a @ v).Q  # an orthonormal basis of the top directions' span, however A is conditioned
        right = u.T @ a
    sigma = eigenvalues.flip(-1).clamp_min(0).sqrt()
    return whitening.t_inv @ u, right, sigma


def _effective_rank(sigma: Tensor) -> float:
    p = sigma / sigma.sum().clamp_min(1e-300)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def compensated(gm: fx.GraphModule) -> list[QuantLinear]:
    """Quantized linears with several scale rows (one row, or a float linear, is exact without a branch)."""
    return [m for m in quant_linears(gm) if m.scales is not None and m.scales.shape[0] >= 2 and m.weight_quant is not None]


def _column_energy(weight: Tensor) -> Tensor:
    """``Σ_o W[o, j]²`` per input channel in float64, a block of output rows at a time (no float64 copy of ``W``)."""
    energy = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    for block in weight.split(WEIGHT_BLOCK_ROWS):
        energy += block.double().square().sum(0)
    return energy


def own_channel_masks(sharing: list[QuantLinear], config: CMCConfig, stats: dict) -> dict[int, Tensor]:
    """Non-text scale row → the input channels that keep that row's own scale (bool ``[in]``) under
    ``config.own_channels``, for the linears ``sharing`` one scale table: the ``k`` channels where the
    mismatch with text's scale costs most on the row's modality (see the module docstring).
    ``stats``: module name → observer statistics (their second moments, when collected)."""
    first = sharing[0]
    # callers set own_channels, so each count is an int
    keep = min(cast(int, config.own_channels_for(m.in_features, m.out_features)) for m in sharing)
    assert first.scales is not None  # compensated linears
    scales = first.scales.detach().double()
    text_row = int(first.row_of_modality[Modality.TEXT])
    column_energy = [_column_energy(m.weight.detach()) for m in sharing]
    masks: dict[int, Tensor] = {}
    for modality in Modality:
        row = int(first.row_of_modality[modality])
        if row == text_row or row in masks:
            continue
        gap = (scales[row] - scales[text_row]).square() / scales[row].square()
        cost = torch.zeros_like(gap)
        for module, columns in zip(sharing, column_energy):
            module_stats = stats.get(module.name)
            moment = None if module_stats is None else module_stats.moments.get(modality)
            energy = moment.diagonal().double() if moment is not None else torch.ones_like(gap)
            cost += energy * columns * gap
        own = torch.zeros_like(gap, dtype=torch.bool)
        own[cost.topk(keep).indices] = True
        masks[row] = own
    return masks


@torch.no_grad()
def tie_to_text(scales: Tensor, text_row: int, masks: dict[int, Tensor]) -> None:
    """Set each row of ``masks`` (row → own channels) to text's scale outside its own channels, in place."""
    for row, own in masks.items():
        scales[row] = torch.where(own, scales[row], scales[text_row])


@dataclass
class ProjectScales:
    """CMC's ``own_channels`` step on its own: set each non-text scale row to text's outside its
    ``own_channels`` costliest channels (per shared table).

    :class:`CrossModalCompensation` runs it itself; a pipeline that solves weights for the final
    scales (GPTQ) runs it first, then GPTQ, then CMC (as :func:`masq_fx.recipes.recipe_steps` does).
    """

    config: CMCConfig = field(default_factory=CMCConfig)
    name: str = "project_scales"
    requires: tuple[Capability, ...] = (SCALES,)
    provides: tuple[Capability, ...] = (SCALES_PROJECTED,)
    invalidates: tuple[Capability, ...] = (Capability.SOLVED_WEIGHTS, Capability.CMC)

    def __call__(self, gm: fx.GraphModule, context: Context) -> fx.GraphModule:
        if self.config.own_channels is None:
            raise ValueError("ProjectScales needs CMCConfig.own_channels (an int or 'rank'); None keeps every channel")
        tables: dict[int, list[QuantLinear]] = {}
        for module in compensated(gm):
            if not context.in_scope(module.name):
                continue
            tables.setdefault(id(module.scales), []).append(module)
        for sharing in tables.values():
            first = sharing[0]
            assert first.scales is not None  # compensated linears
            if first.has_solved_weights:
                raise ValueError(
                    f"{first.name}: CMC own_channels changes the scales after GPTQ solved the weights for them; "
                    "run ProjectScales before GPTQ (recipe_steps does), or leave own_channels at None"
                )
            tie_to_text(first.scales, int(first.row_of_modality[Modality.TEXT]), own_channel_masks(sharing, self.config, context.stats))
        return gm


@dataclass
class CrossModalCompensation:
    """Switch every multi-row QuantLinear to one text weight plus a low-rank branch per other row."""

    config: CMCConfig = field(default_factory=CMCConfig)
    name: str = "cmc"
    requires: tuple[Capability, ...] = (SCALES, WEIGHT_QUANT)
    provides: tuple[Capability, ...] = (CMC,)
    #: one per branch of the last run (of every layer so far, in a layer-sequential run)
    reports: list[BranchReport] = field(default_factory=list, init=False)

    def __call__(self, gm: fx.GraphModule, context: Context) -> fx.GraphModule:
        if context.layer is None or context.layer == 0:  # a layer-sequential run gathers its layers' reports
            self.reports = []
        skipped: set[Modality] = set()
        linears = [m for m in compensated(gm) if context.in_scope(m.name)]
        if self.config.own_channels is not None and SCALES_PROJECTED not in context.provided:
            ProjectScales(self.config)(gm, context)
        tasks: list[tuple[QuantLinear, Modality, int, Tensor | None]] = []  # a branch each
        for module in linears:
            if not module.quantizers_enabled:
                raise ValueError(
                    f"{module.name} has no active weight quantizer: run QuantizeWeights before CMC "
                    "(with quantizers enabled)"
                )
            stats = context.stats.get(module.name)
            text_row = int(module.row_of_modality[Modality.TEXT])
            for modality in Modality:
                row = int(module.row_of_modality[modality])
                if modality == Modality.TEXT or row == text_row:
                    continue
                moment = None if stats is None else stats.moments.get(modality)
                if self.config.whiten and moment is None:
                    skipped.add(modality)
                tasks.append((module, modality, row, moment))
        # in a process group each branch is solved on one rank (by cost) and its factors broadcast
        solved: dict[int, BranchReport] = {}
        text_weight: dict[str, Tensor] = {}  # of the module being solved: its branches all correct it

        def solve(index: int) -> list[Tensor]:
            module = tasks[index][0]
            if module.name not in text_weight:
                text_weight.clear()
                text_weight[module.name] = module.quantized_weight(int(module.row_of_modality[Modality.TEXT])).detach()
            factors, solved[index] = self._compensate(*tasks[index], text_weight[module.name])
            return list(factors)

        def blank(index: int) -> list[Tensor]:
            module = tasks[index][0]
            rank = self.config.rank_for(module.in_features, module.out_features)
            shapes = ((module.in_features, rank), (rank, module.out_features))
            return [torch.empty(shape, dtype=torch.float64, device=module.weight.device) for shape in shapes]

        costs = [float(m.in_features**2 * (m.in_features + m.out_features)) for m, *_ in tasks]
        factors = solve_once(range(len(tasks)), solve, blank, costs, "sharing the CMC branches", context.layer)
        for index, ((module, _, row, _), (left, right)) in enumerate(zip(tasks, factors)):
            if index not in solved:  # solved on another rank; this rank's own are set already
                module.set_branch(row, left, right, self.config.factor_bits)
        for module in linears:
            module.use_text_weight(self.config.branch_input)
        reports = [report for found in gather(solved) for _, report in sorted(found.items())]
        self.reports += reports
        context.diagnostics.setdefault(self.name, []).extend(reports)  # a resumed run holds its replayed layers' already
        if skipped:
            names = ", ".join(m.name.lower() for m in sorted(skipped))
            warnings.warn(
                f"no second-moment statistics of {names}: their CMC branches are unwhitened (less accurate); "
                "calibrate with InsertObservers(moment_modalities=...) including them",
                CoverageWarning,
                stacklevel=2,
            )
        return gm

    def _compensate(
        self, module: QuantLinear, modality: Modality, row: int, moment: Tensor | None, base: Tensor
    ) -> tuple[tuple[Tensor, Tensor], BranchReport]:
        """The factors of ``module``'s branch for ``row`` (set on ``module``) correcting its text weight ``base``, and
        the branch's report."""
        cfg = self.config
        assert module.scales is not None  # compensated linears
        scale = module.scales[row].detach()
        whitening = (
            Whitening.from_moment(moment, scale, cfg.damping)
            if cfg.whiten and moment is not None
            else Whitening.identity(module.in_features, module.weight.device)
        )
        rank = cfg.rank_for(module.in_features, module.out_features)
        # T·Eᵀ [in, out] (E = target − base), its transpose built in blocks of output rows: a real model's float64
        # [out, in] matrices are large (18,944 × 3,584: 0.5 GiB), so no whole E is held beside it
        target = module.quantized_weight(row).detach() if cfg.target == "quantized" else module.weight.detach()
        whitened_t = torch.empty(module.out_features, module.in_features, dtype=torch.float64, device=target.device)
        for start in range(0, module.out_features, WEIGHT_BLOCK_ROWS):
            rows = slice(start, start + WEIGHT_BLOCK_ROWS)
            error = target[rows].to(torch.float64, copy=True)
            if cfg.target != "quantized":
                error.mul_(scale.double())
            torch.mm(error.sub_(base[rows]), whitening.t.T, out=whitened_t[rows])
        whitened = whitened_t.T
        del target
        total = whitened.norm()
        left, right, sigma = _whitened_factors(whitened, whitening, rank)
        module.set_branch(row, left, right, cfg.factor_bits)
        coded = (left, right) if cfg.factor_bits is None else tuple(f.double() for f in module.branches[row])  # the codes' errors
        residual = whitened.addmm_(whitening.t @ coded[0], coded[1], alpha=-1)  # T·(Eᵀ − L·R), in place
        report = BranchReport(
            module=module.name,
            modality=modality,
            rank=rank,
            relative_error=float(residual.norm() / total.clamp_min(1e-300)),
            effective_rank=_effective_rank(sigma),
            overhead=rank * (module.in_features + module.out_features) / (module.in_features * module.out_features),
        )
        return (left, right), report
