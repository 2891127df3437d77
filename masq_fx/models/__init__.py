"""Model adapters, one module per architecture family. Importing this package registers them all."""

from masq_fx.models import (  # noqa: F401  (registration)
    gemma3,
    gemma4,
    idefics3,
    internvl,
    llama,
    llava,
    llava_onevision,
    mistral3,
    qwen3,
    qwen3_5,
    qwen3_vl,
    qwen_audio,
    qwen_omni,
    qwen_vl,
    voxtral,
)
from masq_fx.models.base import DecoderInputs, ModelAdapter
from masq_fx.models.device import default_device, model_device, place, resolve_device
from masq_fx.models.registry import UnsupportedModelError, adapter_for, register_adapter, rotatable_families, supported_families

__all__ = [
    "DecoderInputs",
    "ModelAdapter",
    "UnsupportedModelError",
    "adapter_for",
    "default_device",
    "model_device",
    "place",
    "register_adapter",
    "resolve_device",
    "rotatable_families",
    "supported_families",
]
