"""Weight and activation quantizer settings for the QuantLinears of a prepared graph."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import fx

from masq_fx.errors import InputError
from masq_fx.nn.quant_linear import QuantLinear
from masq_fx.pipeline import Capability, Context
from masq_fx.quantizers import ActQuantConfig, WeightQuantConfig, calibrate_static_scale
from masq_fx.transforms.prepare import QUANT_LINEARS, quant_linears

WEIGHT_QUANT = Capability.WEIGHT_QUANT
ACT_QUANT = Capability.ACT_QUANT


@dataclass(frozen=True)
class ModuleFilter:
    """Module-name regexes: a linear is selected if it matches ``include`` and no ``exclude``."""

    include: tuple[str, ...] = (r".*",)
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as error:
                raise InputError(f"modules: {pattern!r} is not a valid regular expression ({error}); e.g. 'layers\\.[0-9]+\\.mlp\\..*'") from None

    def __call__(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.include) and not any(re.fullmatch(p, name) for p in self.exclude)

    def require_match(self, names: Sequence[str]) -> None:
        """Refuse a filter that selects none of ``names`` (it would quantize nothing)."""
        if names and not any(self(name) for name in names):
            examples = ", ".join(names[:3])
            raise InputError(
                f"modules: include {list(self.include)} / exclude {list(self.exclude)} select none of the {len(names)} decoder "
                f"linears (e.g. {examples}); patterns must match whole names, e.g. 'layers\\..*\\.mlp\\..*'"
            )


@dataclass
class QuantizeWeights:
    """Fake-quantize the (smoothed) weights of the selected QuantLinears."""

    config: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    modules: ModuleFilter = field(default_factory=ModuleFilter)
    name: str = "quantize_weights"
    requires: tuple[Capability, ...] = (QUANT_LINEARS,)
    provides: tuple[Capability, ...] = (WEIGHT_QUANT,)

    def __call__(self, gm: fx.GraphModule, context: Context) -> fx.GraphModule:
        for module in quant_linears(gm):
            if self.modules(module.name) and context.in_scope(module.name):
                module.set_quantizers(weight=self.config)
        return gm


@dataclass
class QuantizeActivations:
    """Fake-quantize the (smoothed) inputs of the selected QuantLinears."""

    config: ActQuantConfig = field(default_factory=ActQuantConfig)
    modules: ModuleFilter = field(default_factory=ModuleFilter)
    name: str = "quantize_activations"
    requires: tuple[Capability, ...] = (QUANT_LINEARS,)
    provides: tuple[Capability, ...] = (ACT_QUANT,)

    def __call__(self, gm: fx.GraphModule, context: Context) -> fx.GraphModule:
        static = self.config.granularity == "per_tensor"
        if static and not context.stats:
            raise ValueError("static per-tensor activation scales need calibration statistics: run Calibrate first")
        for module in quant_linears(gm):
            if self.modules(module.name) and context.in_scope(module.name):
                scale = calibrate_static_scale(_smoothed_absmax(module, context), self.config) if static else None
                module.set_quantizers(activation=self.config, static_scale=scale)
        return gm


def _smoothed_absmax(module: QuantLinear, context: Context) -> torch.Tensor:
    """Largest |x ⊘ s[m]| over calibration tokens: exact from per-channel abs-maxima since s > 0."""
    stats = context.stats.get(module.name)
    if stats is None:
        raise ValueError(f"no calibration statistics for {module.name}: run Calibrate before QuantizeActivations")
    absmax = stats.absmax
    if module.scales is not None:
        absmax = absmax / module.scales.detach()[module.row_of_modality]
    return absmax.max()
