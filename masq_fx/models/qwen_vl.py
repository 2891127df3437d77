"""Qwen2-VL and Qwen2.5-VL: a vision tower feeding a Qwen2 decoder with 3-row M-RoPE positions."""

from __future__ import annotations

from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from masq_fx.models.base import ModelAdapter
from masq_fx.models.registry import register_adapter


class _QwenVLAdapter(ModelAdapter):
    position_rows = 3

    def language_model(self) -> nn.Module:
        return self.model.get_submodule("model.language_model")



@register_adapter
class Qwen2VLAdapter(_QwenVLAdapter):
    family = "qwen2-vl"
    model_classes = (Qwen2VLForConditionalGeneration,)


@register_adapter
class Qwen25VLAdapter(_QwenVLAdapter):
    family = "qwen2.5-vl"
    model_classes = (Qwen2_5_VLForConditionalGeneration,)
