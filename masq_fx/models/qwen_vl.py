"""Qwen2-VL and Qwen2.5-VL: a vision tower feeding a Qwen2 decoder with 3-row M-RoPE positions."""

from __future__ import annotations

from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from masq_fx.modality import ModalityTokens
from masq_fx.models.base import ModelAdapter, config_token
from masq_fx.models.registry import register_adapter


class _QwenVLAdapter(ModelAdapter):
    position_rows = 3

    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def modality_tokens(self) -> ModalityTokens:
        cfg = self.model.config
        return ModalityTokens(
            image=config_token(cfg, "image_token_id", "image_token_index"),
            video=config_token(cfg, "video_token_id", "video_token_index"),
        )


@register_adapter
class Qwen2VLAdapter(_QwenVLAdapter):
    family = "qwen2-vl"
    model_classes = (Qwen2VLForConditionalGeneration,)


@register_adapter
class Qwen25VLAdapter(_QwenVLAdapter):
    family = "qwen2.5-vl"
    model_classes = (Qwen2_5_VLForConditionalGeneration,)
