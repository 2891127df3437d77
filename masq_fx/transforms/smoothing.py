"""SmoothQuant and MAS-initialisation scales, per linear or tied per group, routed by modality.

For every smoothed linear input channel ``j`` and scale row ``r`` (a modality, or all tokens)::

    s_r[j] = clamp( max|X_r[:, j]|^α / max|W[:, j]|^(1-α) , min_scale )

``max|X_r|`` comes from the modality-partitioned observers; ``max|W[:, j]|`` is the weight's
input-channel abs-max over output rows, of this linear alone (``variant="per_linear"``, applied
online like the official MASQuant code, which starts k/v and gate from copies of q's and up's
scales where we start each linear from its own weight) or of all linears reading the same input
(``variant="tied"``, reference SmoothQuant). With ``per_modality=True`` (MAS initialisation) each calibrated modality gets its
own row and a modality the model has but calibration lacked falls back to text's row, with a
warning; with ``per_modality=False`` there is one row from all tokens (SmoothQuant).

Tied groups share one scale ``nn.Parameter``. A tied norm group with a single row is folded
into the norm's γ (``γ / s``; the graph gets a new γ, the HF model keeps its own); otherwise a
:class:`ModalityScale` node right after the shared input divides every token by its row once
for the whole group ("per-modality norm weights"). Which group kinds are smoothed is a config
field: q/k/v and gate/up (``"norm"``) and o_proj (``"attention"``) by default, as the official
code; down_proj (``"activation"``) optional.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from torch import Tensor, fx, nn

from masq_fx.calibration.calibrate import STATS
from masq_fx.calibration.stats import ModalityStats
from masq_fx.capture.dataflow import SmoothingGroup
from masq_fx.capture.decoder import module_nodes
from masq_fx.errors import CoverageWarning
from masq_fx.modality import NUM_MODALITIES, Modality
from masq_fx.nn.quant_linear import QuantLinear
from masq_fx.nn.routing import insert_routers
from masq_fx.pipeline import Capability, Context
from masq_fx.transforms.prepare import QUANT_LINEARS

SCALES = Capability.SCALES


@dataclass(frozen=True)
class SmoothingConfig:
    alpha: float = 0.5
    variant: Literal["per_linear", "tied"] = "per_linear"
    per_modality: bool = True
    kinds: tuple[str, ...] = ("norm", "attention")
    min_scale: float = 1e-5
    fold_into_norm: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")
        if self.variant not in ("per_linear", "tied"):
            raise ValueError(f"variant must be 'per_linear' or 'tied', got {self.variant!r}")
        unknown = set(self.kinds) - {"norm", "attention", "activation"}
        if unknown:
            raise ValueError(f"unknown smoothing site kinds {sorted(unknown)}; use 'norm', 'attention', 'activation'")
        if self.min_scale <= 0:
            raise ValueError(f"min_scale must be positive, got {self.min_scale}")


def scale_rows(
    stats: ModalityStats, model_modalities: tuple[Modality, ...], per_modality: bool
) -> tuple[Tensor, Tensor, list[Modality]] | None:
    """Activation abs-max per scale row ``[rows, C]``, the modality → row map, and absent modalities; ``None``
    when no token reached the site (an MoE expert calibration never routed to: it is not smoothed).

    Row 0 is the fallback of the modalities without tokens: text's, or where the site saw no text (an expert
    only vision tokens reached) all its tokens'.
    """
    present = stats.present()
    if not present:
        return None
    if not per_modality:
        return stats.all_tokens().absmax[None], torch.zeros(NUM_MODALITIES, dtype=torch.long), []
    absent = [m for m in model_modalities if m not in present]
    rows = torch.zeros(NUM_MODALITIES, dtype=torch.long)
    own: list[Modality]
    if Modality.TEXT in present:
        own = [m for m in present if m != Modality.TEXT]
        tables = [stats.of(Modality.TEXT).absmax]
    else:
        own = present if len(present) > 1 else []
        tables = [stats.all_tokens().absmax]
    for index, modality in enumerate(own, start=1):
        rows[modality] = index
    return torch.stack(tables + [stats.of(m).absmax for m in own]), rows, absent


def smoothquant_scales(act_absmax: Tensor, weight_absmax: Tensor, alpha: float, min_scale: float) -> Tensor:
    """``clamp(a^α / w^(1-α), min_scale)`` with both maxima clamped to ``min_scale`` first."""
    a = act_absmax.float().clamp_min(min_scale)
    w = weight_absmax.float().clamp_min(min_scale)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp_min(min_scale)


@dataclass
class SmoothScales:
    """Compute smoothing scales from calibration statistics and install them in the graph."""

    config: SmoothingConfig = field(default_factory=SmoothingConfig)
    name: str = "smooth_scales"
    requires: tuple[Capability, ...] = (QUANT_LINEARS, STATS)
    provides: tuple[Capability, ...] = (SCALES,)
    #: new scales drop what was solved or compensated for the old ones
    invalidates: tuple[Capability, ...] = (Capability.LEARNED_SCALES, Capability.SCALES_PROJECTED, Capability.SOLVED_WEIGHTS, Capability.CMC)

    def __call__(self, gm: fx.GraphModule, context: Context) -> fx.GraphModule:
        nodes = module_nodes(gm)
        missing: set[Modality] = set()
        for group in context.captured.groups():
            if group.kind not in self.config.kinds or not context.in_scope(group.linears[0]):
                continue
            linears = [name for name in group.linears if name in nodes]
            if not linears:
                continue
            stats = context.stats.get(linears[0])
            if stats is None:
                raise ValueError(f"no calibration statistics for {linears[0]}: run Calibrate before SmoothScales")
            found = scale_rows(stats, context.captured.modalities, self.config.per_modality)
            if found is None:  # an expert no calibration token was routed to keeps its weights unscaled
                continue
            act, rows, absent = found
            if not group.routed:  # an expert missing a modality is counted in the run report, not warned of
                missing.update(absent)
            modules = [cast(QuantLinear, gm.get_submodule(str(nodes[n].target))) for n in linears]
            if self.config.variant == "tied" and len(modules) > 1:
                shared = any(other.norm_weight == group.norm_weight and other is not group for other in context.captured.sites)
                self._tie(gm, group, [nodes[n] for n in linears], modules, act, rows, shared)
            else:
                for module in modules:
                    w = module.weight.detach().abs().amax(0)
                    module.set_scales(smoothquant_scales(act, w, self.config.alpha, self.config.min_scale), rows)
        if missing:
            names = ", ".join(m.name.lower() for m in sorted(missing))
            warnings.warn(
                f"calibration has no {names} tokens: those tokens use the text scales (and get no CMC branch); "
                "add calibration samples with them",
                CoverageWarning,
                stacklevel=2,
            )
        gm.recompile()
        return gm

    def _tie(
        self,
        gm: fx.GraphModule,
        group: SmoothingGroup,
        nodes: list[fx.Node],
        modules: list[QuantLinear],
        act: Tensor,
        rows: Tensor,
        shared: bool,
    ) -> None:
        """``shared``: other sites read the group's norm (an MoE block's router and experts beside a shared expert)."""
        w = torch.stack([m.weight.detach().abs().amax(0) for m in modules]).amax(0)
        scales = nn.Parameter(smoothquant_scales(act, w, self.config.alpha, self.config.min_scale), requires_grad=False)
        # an expert's rows share the norm with the router and the other experts: divide them after the gather
        folded = self.config.fold_into_norm and group.kind == "norm" and bool(group.norm_weight) and not group.routed and not shared and scales.shape[0] == 1
        for module in modules:
            module.set_scales(scales, rows)
            module.divide_upstream(folded=folded)
        if folded:
            _fold_into_norm(gm, group, scales[0].detach())
        else:
            insert_routers(gm, nodes, scales, rows)


def _fold_into_norm(gm: fx.GraphModule, group: SmoothingGroup, scale: Tensor) -> None:
    """Give the graph its own ``γ / s`` (and ``β / s``); the HF model's parameters are untouched."""
    for attr in (group.norm_weight, group.norm_bias):
        if attr is None:
            continue
        owner, name = attr.rsplit(".", 1)
        module = gm.get_submodule(owner)
        old = getattr(module, name)
        setattr(module, name, nn.Parameter((old.detach().float() / scale).to(old.dtype), requires_grad=False))
