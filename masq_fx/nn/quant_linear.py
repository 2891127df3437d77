"""The reference (fake-quant) linear that replaces each decoder projection in a transformed graph.

For a token ``x`` of modality ``m`` it computes, exactly as the MASQuant specification::

    y = Q_a(x ⊘ s[m]) · Q_w(W · diag(s[m]))ᵀ + b

``s`` is a table of smoothing scales with one row per *distinct* scale set and
``row_of_modality`` maps each :class:`~masq_fx.modality.Modality` to its row (a modality without
its own row uses text's). With one row this is plain SmoothQuant; with ``s ≡ 1`` and no
quantizers it is the float linear. ``weight_rows`` chooses the stored weights:

* ``"per_row"``: every row has its own quantized weight ``Q_w(W·diag(s[r]))`` (MAS simulation);
  the output of a token is taken from its row's GEMM (masked sum, no data-dependent shapes);
* ``"text"``: one stored weight ``Q_w(W·diag(s[text]))`` for all tokens. A token whose row ``r``
  differs from text's is then wrong unless compensated: cross-modal compensation adds the
  low-rank branch ``(x ⊘ s[r]) · L_r · R_r`` (:meth:`set_branch`) to that row's tokens, computed
  for every token and masked (no data-dependent shapes).

A branch's factors are float32, or b-bit integer codes (``set_branch(..., bits=b)``): ``L`` symmetric
per rank column, ``R`` symmetric per output channel (torchao's full grid, :func:`quantize_weight`),
and the branch then computes what the int8 kernels compute::

    h = Q_8(x̃) · Q_b(L)      masked to the tokens of row r
    y_branch = H_8(h) · Q_b(R)

``x̃ = x ⊘ s[r]`` (``branch_input="smoothed"``) or its fake-quantized version; ``Q_8`` is the
dynamic per-token 8-bit quantizer of the main GEMM's activations (:data:`BRANCH_ACT`); ``H_8``
(:func:`fake_quant_hidden`) quantizes per token to 8 bits with torchao's ``SYMMETRIC_NO_CLIPPING_ERR``
scale, so that each token's extreme value lands exactly on a code (``Q_8`` puts it on a rounding tie,
±127.5, which the float rounding of ``h``, computed differently here and by the kernels, would break
either way).

``divide_input=False`` means an upstream node already divided the input by ``s[m]`` (a smoothing
folded into a norm, or shared by a group of linears); the module then only scales the weight.
The float weight and bias are shared with the HF model and never modified.

The non-tensor settings are one frozen :class:`QuantLinearState` (:attr:`QuantLinear.state`),
changed only through the module's methods (:meth:`~QuantLinear.set_quantizers`,
:meth:`~QuantLinear.divide_upstream`, :meth:`~QuantLinear.use_text_weight`). The quantized weights
are cached for the forward and the cache is always that of the current state: the methods drop it,
and it is keyed on the version counters of the weight, scale and clipping tensors, so an in-place
update (MAS's optimizer, CMC's projection) makes the forward rebuild it. It is not used while a
gradient must reach the scales or clipping ratios, nor within :meth:`~QuantLinear.quantizers_off`, nor
kept with ``keep_cache = False`` (:func:`keep_weight_caches`; for models whose float32 weights would
not fit in memory: each forward then computes the weights it needs and lets them go).

Numerics, whatever the model's dtype (float32, bfloat16): the module computes in float32 (the
smoothing, the quantizers' scales and rounding, the GEMMs, the CMC branches and the bias) and
returns the input's dtype, so a bfloat16 graph stays bfloat16 between linears. ``x ⊘ s`` and the
dequantized weights ``q·scale`` are in general not representable in bfloat16; computed in float32
they are exactly what the integer backend computes. Scale tables (MAS's learnable float32 master
copies) and branch factors are float32.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Final, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from masq_fx.modality import NUM_MODALITIES, Modality
from masq_fx.quantizers import (
    EPS,
    ActQuantConfig,
    QuantizedWeight,
    WeightQuantConfig,
    fake_quant_act,
    fake_quant_weight,
    quantize_weight,
)

WeightRows = Literal["per_row", "text"]
BranchInput = Literal["smoothed", "quantized"]

#: how quantized CMC branches quantize their input: as the main GEMM's, 8-bit symmetric dynamic per
#: token on the full grid (torchao's int8 kernels)
BRANCH_ACT = ActQuantConfig()


def fake_quant_hidden(h: Tensor) -> Tensor:
    """Quantize-dequantize ``h`` per token (last dim) to int8 ``[-128, 127]`` with the scale
    ``max(-min(h, 0) / 128, max(h, 0) / 127)`` (at least float32 eps), bit for bit torchao's dynamic
    ``SYMMETRIC_NO_CLIPPING_ERR`` activation quantization (plain rounding, no straight-through gradient)."""
    h = h.float()
    low = torch.clamp(h.amin(-1, keepdim=True), max=0.0) / -128.0
    high = torch.clamp(h.amax(-1, keepdim=True), min=0.0) / 127.0
    scale = torch.clamp(torch.where(low > high, low, high), min=EPS)
    return torch.clamp(torch.round(h * (1.0 / scale)), -128, 127) * scale


def row_scales(scales: Tensor, row_of_modality: Tensor, modality_ids: Tensor) -> Tensor:
    """Each token's scale row, ``scales[row_of_modality[modality_ids]]``, selected with ``torch.where``.

    The same values as the indexed gather, but a deterministic gradient: the gather's backward
    (``index_put_(accumulate=True)``) adds float32 gradients with atomics across CPU threads, in an
    order that changes from run to run, so learned scales (and checkpoints) would not reproduce.
    """
    rows = row_of_modality[modality_ids].unsqueeze(-1)
    selected = scales[0]
    for row in range(1, scales.shape[0]):
        selected = torch.where(rows == row, scales[row], selected)
    return selected


def branch_factor_config(bits: int) -> WeightQuantConfig:
    """Quantizer of the CMC factors with ``bits``-bit codes: symmetric, per output channel of ``Lᵀ`` and ``Rᵀ``."""
    return WeightQuantConfig(bits=bits)


def _format(bits: int | None) -> str:
    return "float" if bits is None else f"{bits}-bit"


#: output rows of a weight quantized at a time where no gradient is wanted (same values, bounded temporaries)
WEIGHT_BLOCK_ROWS = 1024


@dataclass(frozen=True)
class QuantLinearState:
    """The non-tensor settings of a :class:`QuantLinear`: what a checkpoint records besides its tensors."""

    #: weight quantizer (``None``: float weights)
    weight_quant: WeightQuantConfig | None = None
    #: activation quantizer (``None``: float activations)
    act_quant: ActQuantConfig | None = None
    #: calibrated float32 scale of static per-tensor activations (exactly when ``act_quant`` is per tensor)
    act_static_scale: float | None = None
    #: the stored weights: one per scale row (MAS simulation), or text's only (CMC)
    weight_rows: WeightRows = "per_row"
    #: the CMC branches read the smoothed float input, or its fake-quantized version
    branch_input: BranchInput = "smoothed"
    #: ``False``: an upstream router or norm already divided the input by the scales
    divide_input: bool = True
    #: the scales were folded into an upstream norm: fixed, not learnable
    scales_folded: bool = False

    def __post_init__(self) -> None:
        if self.weight_rows not in ("per_row", "text"):
            raise ValueError(f"weight_rows must be 'per_row' or 'text', got {self.weight_rows!r}")
        if self.branch_input not in ("smoothed", "quantized"):
            raise ValueError(f"branch_input must be 'smoothed' or 'quantized', got {self.branch_input!r}")
        static = self.act_quant is not None and self.act_quant.granularity == "per_tensor"
        if static != (self.act_static_scale is not None):
            raise ValueError(
                "act_static_scale is needed exactly with per-tensor activations "
                f"(act_quant={self.act_quant}, act_static_scale={self.act_static_scale})"
            )
        if self.act_static_scale is not None and not (isinstance(self.act_static_scale, float) and 0 < self.act_static_scale < float("inf")):
            raise ValueError(f"act_static_scale must be a positive finite float, got {self.act_static_scale!r}")
        if self.scales_folded and self.divide_input:
            raise ValueError("scales folded into an upstream norm are divided there: divide_input must be False")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (:meth:`from_dict` inverts it exactly)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantLinearState:
        """Inverse of :meth:`to_dict`; every field must be given, no other."""
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ValueError(f"QuantLinearState fields {sorted(names)} expected, got {sorted(data)}")
        weight, act = data["weight_quant"], data["act_quant"]
        return cls(
            **{
                **data,
                "weight_quant": None if weight is None else WeightQuantConfig(**weight),
                "act_quant": None if act is None else ActQuantConfig(**act),
            }
        )


class _Unchanged:
    def __repr__(self) -> str:
        return "unchanged"


#: :meth:`QuantLinear.set_quantizers` argument default: keep the current setting
UNCHANGED: Final = _Unchanged()


@contextmanager
def quantizers_off(root: nn.Module | None) -> Iterator[None]:
    """:meth:`QuantLinear.quantizers_off` for every QuantLinear in ``root`` (a graph, a layer; ``None``: none)."""
    with ExitStack() as stack:
        for module in () if root is None else root.modules():
            if isinstance(module, QuantLinear):
                stack.enter_context(module.quantizers_off())
        yield


def keep_weight_caches(root: nn.Module, keep: bool) -> None:
    """Set :attr:`QuantLinear.keep_cache` of every QuantLinear in ``root`` (dropping their caches when not kept)."""
    for module in root.modules():
        if isinstance(module, QuantLinear):
            module.keep_cache = keep
            if not keep:
                module.release()


def cached_weight_bytes(root: nn.Module) -> int:
    """Bytes the float32 weight caches of every weight-quantized QuantLinear in ``root`` take once built."""
    return sum(
        4 * len(m.stored_rows()) * m.out_features * m.in_features for m in root.modules() if isinstance(m, QuantLinear) and m.weight_quant is not None
    )


class QuantLinear(nn.Module):
    """Modality-routed, smoothed, fake-quantized linear: ``forward(x, modality_ids) -> y``."""

    row_of_modality: Tensor  # buffer [NUM_MODALITIES]: modality id → scale row

    def __init__(self, weight: Tensor, bias: Tensor | None, name: str) -> None:
        super().__init__()
        self.name = name
        self.weight = weight
        self.bias = bias
        self.scales: nn.Parameter | None = None
        self.register_buffer("row_of_modality", torch.zeros(NUM_MODALITIES, dtype=torch.long, device=weight.device))
        self._state = QuantLinearState()
        #: False (within :meth:`quantizers_off`): the smoothed float linear
        self._quantizers_on = True
        #: ``[rows, out, in]`` weights of :meth:`_weights` and the tensor versions they were built from
        self._cache: Tensor | None = None
        self._cache_key: tuple | None = None
        #: False: no cache is kept; the forward computes the weights each call (same values, bounded memory)
        self.keep_cache = True
        #: learned weight clipping: ratios ``[rows, out, n_groups]`` in (0, 1] that shrink the range of
        #: each weight row's output channels (groups); ``None``: full range (or the clip search)
        self.clip_ratios: nn.Parameter | None = None
        #: scale row (0 if unsmoothed) → integer weight solved by a weight transform (GPTQ) or loaded
        #: from a checkpoint; they replace ``Q_w(W·diag(s[r]))`` until the scales change
        self._solved: dict[int, QuantizedWeight] | None = None
        #: scale row → (L [in, rank], R [rank, out]) of the cross-modal compensation branch, float32
        #: (the dequantized codes of a quantized branch)
        self.branches: dict[int, tuple[Tensor, Tensor]] = {}
        #: scale row → integer codes (Lᵀ [rank, in], Rᵀ [out, rank]) of quantized branches; empty: float factors
        self.branch_codes: dict[int, tuple[QuantizedWeight, QuantizedWeight]] = {}

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def state(self) -> QuantLinearState:
        """The non-tensor settings (read-only; the methods below change them)."""
        return self._state

    # read-only views of the state's fields
    @property
    def weight_quant(self) -> WeightQuantConfig | None:
        return self._state.weight_quant

    @property
    def act_quant(self) -> ActQuantConfig | None:
        return self._state.act_quant

    @property
    def act_static_scale(self) -> float | None:
        return self._state.act_static_scale

    @property
    def weight_rows(self) -> WeightRows:
        return self._state.weight_rows

    @property
    def branch_input(self) -> BranchInput:
        return self._state.branch_input

    @property
    def divide_input(self) -> bool:
        return self._state.divide_input

    @property
    def scales_folded(self) -> bool:
        return self._state.scales_folded

    @property
    def quantizers_enabled(self) -> bool:
        """``False`` within :meth:`quantizers_off`."""
        return self._quantizers_on

    def set_quantizers(
        self,
        *,
        weight: WeightQuantConfig | None | _Unchanged = UNCHANGED,
        activation: ActQuantConfig | None | _Unchanged = UNCHANGED,
        static_scale: float | Tensor | None | _Unchanged = UNCHANGED,
    ) -> None:
        """Install quantizers (``None``: none); an argument left out keeps its setting, except that a new
        ``activation`` clears the static scale unless ``static_scale`` (the calibrated scale of per-tensor
        activations, kept as the float32 value the forward uses) is given with it.

        A different weight quantizer drops the solved weights and learned clipping ratios of the old one.
        """
        changes: dict[str, Any] = {}
        if not isinstance(weight, _Unchanged):
            changes["weight_quant"] = weight
        if not isinstance(activation, _Unchanged):
            changes["act_quant"], changes["act_static_scale"] = activation, None
        if not isinstance(static_scale, _Unchanged):
            changes["act_static_scale"] = None if static_scale is None else float(torch.as_tensor(static_scale, dtype=torch.float32))
        try:
            state = replace(self._state, **changes)
        except ValueError as error:
            raise ValueError(f"{self.name}: {error}") from None
        if state.weight_quant != self._state.weight_quant:
            self._solved = None
            self.clip_ratios = None
            self._drop_cache()
        self._state = state

    def divide_upstream(self, folded: bool = False) -> None:
        """An upstream node divides the input by the scales (the module only scales its weight): a router
        sharing the table, or with ``folded`` the norm the (then fixed, not learnable) scales were folded into."""
        if self.scales is None:
            raise ValueError(f"{self.name}: no scales to divide upstream; set_scales() first")
        self._state = replace(self._state, divide_input=False, scales_folded=folded)

    def use_text_weight(self, branch_input: BranchInput = "smoothed") -> None:
        """Store text's quantized weight only (``weight_rows="text"``, the CMC base); the compensation
        branches (:meth:`set_branch`) read ``branch_input``."""
        try:
            state = replace(self._state, weight_rows="text", branch_input=branch_input)
        except ValueError as error:
            raise ValueError(f"{self.name}: {error}") from None
        self._state = state
        self._drop_cache()

    def load_state(self, state: QuantLinearState) -> None:
        """Replace the whole state (replay onto a fresh module, before :meth:`set_solved` and the branches)."""
        if not state.divide_input and self.scales is None:
            raise ValueError(f"{self.name}: divide_input=False needs scales; set_scales() first")
        if state.weight_quant != self._state.weight_quant:
            self._solved = None
            self.clip_ratios = None
        self._state = state
        self._drop_cache()

    @contextmanager
    def quantizers_off(self) -> Iterator[None]:
        """Within the block the module computes the smoothed float linear (MAS learning's target)."""
        previous, self._quantizers_on = self._quantizers_on, False
        try:
            yield
        finally:
            self._quantizers_on = previous

    def set_scales(self, scales: Tensor | nn.Parameter | None, row_of_modality: Tensor | None = None) -> None:
        """Install a ``[rows, in_features]`` scale table (shared ``nn.Parameter`` objects stay shared).

        Solved weights, learned clipping and compensation branches depend on the scales and are dropped.
        """
        if scales is not None:
            if scales.dim() != 2 or scales.shape[1] != self.in_features:
                raise ValueError(
                    f"{self.name}: scales must be [rows, {self.in_features}], got {tuple(scales.shape)}"
                )
            if not isinstance(scales, nn.Parameter):
                scales = nn.Parameter(scales.detach().float().clone(), requires_grad=False)
        self.scales = scales
        rows = torch.zeros(NUM_MODALITIES, dtype=torch.long) if row_of_modality is None else row_of_modality.long()
        if scales is not None and int(rows.max()) >= scales.shape[0]:
            raise ValueError(f"{self.name}: row_of_modality points past the {scales.shape[0]} scale rows")
        self.row_of_modality = rows.to(self.weight.device)
        self._solved = None
        self.clip_ratios = None
        self.branches = {}
        self.branch_codes = {}
        self._drop_cache()

    def set_solved(self, weights: Mapping[int, QuantizedWeight]) -> None:
        """Install integer weights computed elsewhere, by scale row (0 if unsmoothed).

        Every row :meth:`stored_rows` names must be given (GPTQ solves all rows; a checkpoint of a
        compensated linear stores only the text row).
        """
        rows = 1 if self.scales is None else self.scales.shape[0]
        missing = set(self.stored_rows()) - set(weights)
        extra = [r for r in weights if not 0 <= r < rows]
        if missing or extra:
            raise ValueError(
                f"{self.name}: solved weights needed for scale rows {sorted(self.stored_rows())} of {rows}, "
                f"got rows {sorted(weights)}"
            )
        for row, weight in weights.items():
            if tuple(weight.qdata.shape) != (self.out_features, self.in_features):
                raise ValueError(
                    f"{self.name}: solved weight of row {row} must be [{self.out_features}, {self.in_features}], "
                    f"got {tuple(weight.qdata.shape)}"
                )
        self._solved = dict(weights)
        self._drop_cache()

    def stored_rows(self) -> list[int]:
        """Scale rows whose quantized weight the forward uses, in its order (``[0]`` if unsmoothed)."""
        if self.scales is None:
            return [0]
        if self.weight_rows == "text":
            return [int(self.row_of_modality[Modality.TEXT])]
        return list(range(self.scales.shape[0]))

    def quantized_weight(self, row: int | None) -> Tensor:
        """The stored quantized weight of scale row ``row`` (``None``: unsmoothed)."""
        if self._solved is not None:
            return self._solved_row(row).dequantize()
        return self._scaled_weight(row)

    def weight_codes(self, row: int | None) -> QuantizedWeight:
        """Integer form (codes, scales, zero points) of :meth:`quantized_weight` ``(row)``."""
        if self.weight_quant is None:
            raise ValueError(f"{self.name}: no weight quantizer, so no integer weights")
        if self._solved is not None:
            return self._solved_row(row)
        return quantize_weight(self._smoothed_weight(row), self.weight_quant, self.clip_ratio(row))

    def _solved_row(self, row: int | None) -> QuantizedWeight:
        assert self._solved is not None
        solved = self._solved.get(row or 0)
        if solved is None:
            raise ValueError(f"{self.name}: no quantized weight of scale row {row} is stored (rows {sorted(self._solved)})")
        return solved

    def learn_clipping(self) -> nn.Parameter:
        """Make each weight row's clipping ratios learnable (as OmniQuant's learnable weight clipping).

        The ratio of an output channel (group) multiplies its range before the quantization scale
        is taken; it starts at 1 (the plain quantizer). An existing table is reused.
        """
        if self.weight_quant is None:
            raise ValueError(f"{self.name}: no weight quantizer, so no clipping to learn")
        if self._solved is not None:
            raise ValueError(f"{self.name}: weights already solved (GPTQ or loaded); learn clipping before solving")
        if self.clip_ratios is None:
            rows = 1 if self.scales is None else self.scales.shape[0]
            groups = 1 if self.weight_quant.group_size is None else self.in_features // self.weight_quant.group_size
            self.clip_ratios = nn.Parameter(torch.ones(rows, self.out_features, groups, device=self.weight.device))
        self._drop_cache()
        return self.clip_ratios

    def clip_ratio(self, row: int | None) -> Tensor | None:
        """Learned clipping ratios ``[out, n_groups]`` of scale row ``row`` (``None``: none learned)."""
        return None if self.clip_ratios is None else self.clip_ratios[row or 0]

    def freeze(self) -> None:
        """Build the cache of the quantized weights now (the forward builds it when first due)."""
        previous, self._quantizers_on = self._quantizers_on, True  # the cache holds the quantized weights
        try:
            with torch.no_grad():
                self._cache = self._weights().detach()
        finally:
            self._quantizers_on = previous
        self._cache_key = self._tensor_versions()

    def release(self) -> None:
        """Drop the cache of the quantized weights (rebuilt when next due): a layer-sequential run keeps only the
        compact state of the layers it has done."""
        self._drop_cache()

    def _drop_cache(self) -> None:
        self._cache = self._cache_key = None

    def _tensor_versions(self) -> tuple:
        return tuple(None if t is None else (id(t), t._version) for t in (self.weight, self.scales, self.clip_ratios))

    @torch.compiler.assume_constant_result
    def _use_cache(self) -> bool:
        """Whether the forward takes the cached weights, (re)building a missing or stale cache of a
        weight-quantized module: not within :meth:`quantizers_off`, nor while a gradient must reach the
        scales or clipping ratios. A compiled graph takes the answer at tracing as a constant."""
        if not self._quantizers_on:
            return False
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (self.scales, self.clip_ratios)):
            return False
        if not self.keep_cache:
            self._drop_cache()
            return False
        if self._cache is None or self._cache_key != self._tensor_versions():
            if self.weight_quant is None:
                self._drop_cache()
                return False
            self.freeze()
        return True

    @property
    def has_solved_weights(self) -> bool:
        """Integer weights were solved (GPTQ) or loaded for the current scales."""
        return self._solved is not None

    @property
    def cached_weights(self) -> Tensor | None:
        """The ``[rows, out, in]`` weights the forward reuses (built when due; ``None``: computed per call)."""
        with torch.no_grad():
            return self._cache if self._use_cache() else None

    def _gradient_wanted(self) -> bool:
        """Whether a gradient must reach the weight, the scales or the clipping ratios (MAS learning)."""
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (self.weight, self.scales, self.clip_ratios))

    def _smoothed_weight(self, row: int | None, rows: slice = slice(None)) -> Tensor:
        """``W·diag(s[row])`` (of the output ``rows``), float32."""
        weight = self.weight[rows].float()
        if self.scales is not None and row is not None:
            weight = weight * self.scales[row]
        return weight

    def _scaled_weight(self, row: int | None) -> Tensor:
        """The smoothed weight, quantize-dequantized with quantizers on."""
        if self.weight_quant is None or not self._quantizers_on:
            return self._smoothed_weight(row)
        ratio = self.clip_ratio(row)
        if self._gradient_wanted():
            return fake_quant_weight(self._smoothed_weight(row), self.weight_quant, ratio)
        # no gradient: output rows are quantized independently, so blocks of them bound the temporaries (a 7B
        # gate_proj's are a few times its 272 MiB) to a block's, with the same values
        weight = torch.empty(self.out_features, self.in_features, device=self.weight.device)
        for start in range(0, self.out_features, WEIGHT_BLOCK_ROWS):
            rows = slice(start, start + WEIGHT_BLOCK_ROWS)
            weight[rows] = fake_quant_weight(self._smoothed_weight(row, rows), self.weight_quant, None if ratio is None else ratio[rows])
        return weight

    @property
    def branch_bits(self) -> int | None:
        """Bits of the quantized branch factors (``None``: float factors, or no branches)."""
        codes = next(iter(self.branch_codes.values()), None)
        return None if codes is None else codes[0].config.bits

    def set_branch(self, row: int, left: Tensor, right: Tensor, bits: int | None = None) -> None:
        """Add the compensation branch ``x ⊘ s[row] · left · right`` for the tokens of ``row``.

        ``bits``: store the factors as ``bits``-bit codes (``left`` per rank column, ``right`` per
        output channel) and compute the branch as the int8 kernels do; ``None`` keeps them float32.
        """
        if left.shape[0] != self.in_features or right.shape[1] != self.out_features or left.shape[1] != right.shape[0]:
            raise ValueError(
                f"{self.name}: branch factors must be [{self.in_features}, r] and [r, {self.out_features}], "
                f"got {tuple(left.shape)} and {tuple(right.shape)}"
            )
        if bits is not None:
            config = branch_factor_config(bits)
            left_t, right_t = left.detach().float().T.contiguous(), right.detach().float().T.contiguous()
            self.set_branch_codes(row, quantize_weight(left_t, config), quantize_weight(right_t, config))
            return
        self._check_branch_format(row, None)
        self.branch_codes.pop(row, None)
        self.branches[row] = (left.detach().float().contiguous(), right.detach().float().contiguous())

    def set_branch_codes(self, row: int, left_t: QuantizedWeight, right_t: QuantizedWeight) -> None:
        """Add a quantized branch from integer codes: ``left_t`` = Lᵀ ``[r, in]``, ``right_t`` = Rᵀ ``[out, r]``,
        each symmetric per output channel (as :meth:`set_branch` with ``bits`` makes them)."""
        rank = left_t.qdata.shape[0]
        if tuple(left_t.qdata.shape) != (rank, self.in_features) or tuple(right_t.qdata.shape) != (self.out_features, rank):
            raise ValueError(
                f"{self.name}: quantized branch factors must be Lᵀ [r, {self.in_features}] and Rᵀ [{self.out_features}, r], "
                f"got {tuple(left_t.qdata.shape)} and {tuple(right_t.qdata.shape)}"
            )
        bits = left_t.config.bits
        if left_t.config != branch_factor_config(bits) or right_t.config != branch_factor_config(bits):
            raise ValueError(
                f"{self.name}: quantized branch factors must both be {branch_factor_config(bits)}, "
                f"got {left_t.config} and {right_t.config}"
            )
        self._check_branch_format(row, bits)
        self.branch_codes[row] = (left_t, right_t)
        self.branches[row] = (left_t.dequantize().float().T.contiguous(), right_t.dequantize().float().T.contiguous())

    def _check_branch_format(self, row: int, bits: int | None) -> None:
        others = sorted(r for r in self.branches if r != row)
        if not others:
            return
        current = next((codes[0].config.bits for r, codes in self.branch_codes.items() if r != row), None)
        if current != bits:
            raise ValueError(
                f"{self.name}: the branches of a linear share one format; rows {others} have {_format(current)} "
                f"factors, row {row} would have {_format(bits)}: call set_scales() to drop them first"
            )

    def _weights(self) -> Tensor:
        """``[rows, out, in]`` effective weights: those of :meth:`stored_rows`.

        With quantizers off the result is always per row: the smoothed float linear.
        """
        if not self._quantizers_on:
            rows = [None] if self.scales is None else range(self.scales.shape[0])
            return torch.stack([self._scaled_weight(r) for r in rows])
        if self._gradient_wanted():
            # learning: the quantizer's temporaries (about 8 weight-sized tensors a row) are recomputed for the backward
            # pass rather than kept from the forward, as a 7B layer's would be ~20 GiB; same values and gradients
            return torch.stack([checkpoint(self.quantized_weight, r, use_reentrant=False) for r in self.stored_rows()])
        return torch.stack([self.quantized_weight(r) for r in self.stored_rows()])

    def smooth_input(self, x: Tensor, modality_ids: Tensor) -> Tensor:
        """``x ⊘ s[m]`` per token (a gather of the token's scale row), in float32."""
        x = x.float()
        if self.scales is None or not self.divide_input:
            return x
        return x / row_scales(self.scales, self.row_of_modality, modality_ids)

    def forward(self, x: Tensor, modality_ids: Tensor) -> Tensor:
        dtype = x.dtype
        xs = self.smooth_input(x, modality_ids)
        xq = xs
        if self.act_quant is not None and self._quantizers_on:
            xq = fake_quant_act(xs, self.act_quant, self.act_static_scale)
        weights = cast(Tensor, self._cache) if self._use_cache() else self._weights()  # _use_cache: a cache is built
        token_rows = self.row_of_modality[modality_ids].unsqueeze(-1)
        y = F.linear(xq, weights[0])
        for row in range(1, weights.shape[0]):
            y = torch.where(token_rows == row, F.linear(xq, weights[row]), y)
        if self._quantizers_on and self.branches:
            source = xq if self.branch_input == "quantized" else xs
            if self.branch_codes:
                source = fake_quant_act(source, BRANCH_ACT)
            for row, (left, right) in self.branches.items():
                hidden = torch.where(token_rows == row, source @ left, 0.0)
                if self.branch_codes:
                    hidden = fake_quant_hidden(hidden)
                y = y + hidden @ right
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dtype)

    def extra_repr(self) -> str:
        rows = 0 if self.scales is None else self.scales.shape[0]
        ranks = {row: left.shape[1] for row, (left, _) in self.branches.items()}
        return (
            f"{self.name}, in={self.in_features}, out={self.out_features}, scale_rows={rows}, "
            f"weight_rows={self.weight_rows}, divide_input={self.divide_input}, "
            f"w={self.weight_quant}, a={self.act_quant}, branch_ranks={ranks}, branch_bits={self.branch_bits}"
        )
