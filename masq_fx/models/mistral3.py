"""Mistral 3 (Mistral Small 3.1): a Pixtral vision tower, patch merger and projector feeding a Mistral decoder."""

from __future__ import annotations

from torch import nn
from transformers import Mistral3ForConditionalGeneration

from masq_fx.models.base import ModelAdapter
from masq_fx.models.registry import register_adapter


@register_adapter
class Mistral3Adapter(ModelAdapter):
    """``Mistral3ForConditionalGeneration``: decoder at ``model.model.language_model``, plain 1-D RoPE.

    Images of any size become ``(H / patch / merge) × (W / patch / merge)`` image tokens; the processor's
    ``[IMG_BREAK]`` / ``[IMG_END]`` tokens around them are text. Sliding-window configs generate through the
    KV cache as Mistral's do.
    """

    family = "mistral3"
    model_classes = (Mistral3ForConditionalGeneration,)

    def language_model(self) -> nn.Module:
        return self.model.get_submodule("model.language_model")
