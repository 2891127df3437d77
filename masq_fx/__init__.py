"""masq_fx: modality-aware post-training quantization of multimodal LLMs as graph transforms.

The names below are imported on first use, so ``import masq_fx.errors`` (or the command line's
argument parsing) does not pay for torch, transformers and torchao.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from masq_fx.api import Calibrated, QuantizedModel, apply, calibrate, load, quantize
    from masq_fx.capture import CapturedDecoder, capture
    from masq_fx.errors import MasqFxError
    from masq_fx.modality import Modality, ModalityPolicy, ModalityTokens, modality_ids
    from masq_fx.models import DecoderInputs, ModelAdapter, UnsupportedModelError, adapter_for
    from masq_fx.recipes import PRESETS, Recipe

_HOMES = {
    "masq_fx.api": ("Calibrated", "QuantizedModel", "apply", "apply_all", "calibrate", "load", "quantize"),
    "masq_fx.capture": ("CapturedDecoder", "capture"),
    "masq_fx.errors": ("MasqFxError",),
    "masq_fx.modality": ("Modality", "ModalityPolicy", "ModalityTokens", "modality_ids"),
    "masq_fx.models": ("DecoderInputs", "ModelAdapter", "UnsupportedModelError", "adapter_for"),
    "masq_fx.recipes": ("PRESETS", "Recipe"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = [
    "PRESETS",
    "Calibrated",
    "CapturedDecoder",
    "DecoderInputs",
    "MasqFxError",
    "Modality",
    "ModalityPolicy",
    "ModalityTokens",
    "ModelAdapter",
    "QuantizedModel",
    "Recipe",
    "UnsupportedModelError",
    "adapter_for",
    "apply",
    "apply_all",
    "calibrate",
    "capture",
    "load",
    "modality_ids",
    "quantize",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME_OF:
        raise AttributeError(f"module 'masq_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME_OF[name]), name)
    globals()[name] = value
    return value
