"""masq_fx: modality-aware post-training quantization of multimodal LLMs as graph transforms."""

from masq_fx.api import PRESETS, QuantizedModel, load, quantize
from masq_fx.capture.decoder import CapturedDecoder, capture
from masq_fx.modality import Modality, ModalityPolicy, ModalityTokens, modality_ids
from masq_fx.models import DecoderInputs, ModelAdapter, UnsupportedModelError, adapter_for

__all__ = [
    "PRESETS",
    "QuantizedModel",
    "load",
    "quantize",
    "CapturedDecoder",
    "DecoderInputs",
    "Modality",
    "ModalityPolicy",
    "ModalityTokens",
    "ModelAdapter",
    "UnsupportedModelError",
    "adapter_for",
    "capture",
    "modality_ids",
]
