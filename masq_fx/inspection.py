"""``masq-fx inspect``: the per-modality activation report of a model, on built-in or local models."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from masq_fx.calibration import observe
from masq_fx.capture import capture
from masq_fx.models import DecoderInputs
from masq_fx.pipeline import Context
from masq_fx.report import activation_report, format_report

def inspect_model(
    model: nn.Module, samples: Sequence[DecoderInputs], title: str, top_k: int = 4, progress: bool = True
) -> str:
    """Capture, observe ``samples`` and format the per-modality activation report."""
    context = observe(Context(capture(model), samples), progress=progress)
    return format_report(activation_report(context.stats, top_k=top_k), title)
