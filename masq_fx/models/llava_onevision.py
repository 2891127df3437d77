"""LLaVA-OneVision: a SigLIP vision tower (any-resolution tiles) and projector feeding a Qwen2 decoder."""

from __future__ import annotations

from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration

from masq_fx.models.base import ModelAdapter
from masq_fx.models.registry import register_adapter


@register_adapter
class LlavaOnevisionAdapter(ModelAdapter):
    """``LlavaOnevisionForConditionalGeneration``: decoder at ``model.model.language_model``, plain 1-D RoPE.

    An image becomes its base tile's tokens, then its grid tiles' tokens with a learned newline embedding
    after each row (all image tokens, so vision); video frames use the video token (vision too).
    """

    family = "llava-onevision"
    model_classes = (LlavaOnevisionForConditionalGeneration,)

    def language_model(self) -> nn.Module:
        return self.model.get_submodule("model.language_model")
