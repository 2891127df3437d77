"""Graph transforms: each a small step ``(graph_module, context) -> graph_module``."""

from masq_fx.transforms.prepare import PrepareQuantLinears, quant_linears
from masq_fx.transforms.quantize import QuantizeActivations, QuantizeWeights
from masq_fx.transforms.rotation import Rotate, RotationConfig, rotate
from masq_fx.transforms.smoothing import SmoothingConfig, SmoothScales

__all__ = [
    "PrepareQuantLinears",
    "QuantizeActivations",
    "QuantizeWeights",
    "Rotate",
    "RotationConfig",
    "SmoothScales",
    "SmoothingConfig",
    "quant_linears",
    "rotate",
]
