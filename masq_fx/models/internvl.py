"""InternVL (2.5 / 3): an InternViT vision tower and pixel-shuffle projector feeding a Qwen2 or Llama decoder."""

from __future__ import annotations

from torch import nn
from transformers import InternVLForConditionalGeneration

from masq_fx.models.base import ModelAdapter
from masq_fx.models.registry import register_adapter


@register_adapter
class InternVLAdapter(ModelAdapter):
    """``InternVLForConditionalGeneration``: decoder at ``model.model.language_model``, plain 1-D RoPE.

    Each image tile becomes ``(image_size / patch)² · downsample_ratio²`` image tokens; video frames use the
    same image token and count as vision.
    """

    family = "internvl"
    model_classes = (InternVLForConditionalGeneration,)

    def language_model(self) -> nn.Module:
        return self.model.get_submodule("model.language_model")
