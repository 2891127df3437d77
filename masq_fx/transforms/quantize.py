"""Weight and activation quantizer settings for the QuantLinears of a prepared graph."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx

from masq_fx.nn.quant_linear import QuantLinear
from masq_fx.pipeline import Context
from masq_fx.quantizers import ActQuantConfig, WeightQuantConfig, calibrate_static_scale
from masq_fx.transforms.prepare import QUANT_LINEARS, quant_linears

WEIGHT_QUANT = "weight_quant"
ACT_QUANT = "act_quant"


@dataclass(frozen=True)
class ModuleFilter:
    """Module-name regexes: a linear is selected if it matches ``include`` and no ``exclude``."""

    include: tuple[str, ...] = (r".*",)
    exclude: tuple[str, ...] = ()

    def __call__(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.include) and not any(re.fullmatch(p, name) for p in self.exclude)


@dataclass
class QuantizeWeights:
    """Fake-quantize the (smoothed) weights of the selected QuantLinears."""

    config: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    modules: ModuleFilter = field(default_factory=ModuleFilter)
    name: str = "quantize_weights"
    requires: tuple[str, ...] = (QUANT_LINEARS,)
    provides: tuple[str, ...] = (WEIGHT_QUANT,)

    def __call__(self, gm: fx.GraphModule, context: Context) -> fx.GraphModule:
        for module in quant_linears(gm):
            if self.modules(module.name):
                module.weight_quant = self.config
                module.freeze()
        return gm


@dataclass
class QuantizeActivations:
    """Fake-quantize the (smoothed) inputs of the selected QuantLinears."""

    config: ActQuantConfig = field(default_factory=ActQuantConfig)
    modules: ModuleFilter = field(default_factory=ModuleFilter)
    name: str = "quantize_activations"
    requires: tuple[str, ...] = (QUANT_LINEARS,)
    provides: tuple[str, ...] = (ACT_QUANT,)

    def __call__(self, gm: fx.GraphModule, context: Context) -> fx.GraphModule:
        static = self.config.granularity == "per_tensor"
        if static and not context.stats:
            raise ValueError("static per-tensor activation scales need calibration statistics: run Calibrate first")
        for module in quant_linears(gm):
            if self.modules(module.name):
                module.act_quant = self.config
                if static:
                    module.act_static_scale = calibrate_static_scale(_smoothed_absmax(module, context), self.config)
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
