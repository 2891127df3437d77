"""Idefics3 and SmolVLM: a SigLIP vision tower and pixel-shuffle connector feeding a Llama decoder."""

from __future__ import annotations

from torch import nn
from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration

from masq_fx.models.base import ModelAdapter
from masq_fx.models.registry import register_adapter


@register_adapter
class Idefics3Adapter(ModelAdapter):
    """``Idefics3ForConditionalGeneration`` and ``SmolVLMForConditionalGeneration``: decoder at
    ``model.model.text_model``, plain 1-D RoPE.

    Each image (or image split) becomes ``(image_size / patch)² / scale_factor²`` image tokens; the
    processor's ``<fake_token_around_image>`` and ``<row_x_col_y>`` markers are text.
    """

    family = "idefics3"
    model_classes = (Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration)

    def language_model(self) -> nn.Module:
        return self.model.get_submodule("model.text_model")
