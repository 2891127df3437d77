"""Backends: run a transformed graph on real quantized kernels."""

from masq_fx.backends.int4_cpu import Int4CpuLinear, int4_unsupported_reason
from masq_fx.backends.torchao_int8 import (
    INDUCTOR_OPTIONS,
    CompiledGraph,
    Int8QuantLinear,
    LoweringReport,
    compile_graph,
    lower_to_torchao,
    unsupported_reason,
)

__all__ = [
    "INDUCTOR_OPTIONS",
    "CompiledGraph",
    "Int4CpuLinear",
    "Int8QuantLinear",
    "LoweringReport",
    "compile_graph",
    "int4_unsupported_reason",
    "lower_to_torchao",
    "unsupported_reason",
]
