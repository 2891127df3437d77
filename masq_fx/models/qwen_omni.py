"""Qwen2.5-Omni thinker: vision and audio towers feeding a Qwen2-style decoder with 3-row M-RoPE."""

from __future__ import annotations

from torch import nn
from transformers import Qwen2_5OmniThinkerForConditionalGeneration

from masq_fx.modality import ModalityTokens
from masq_fx.models.base import ModelAdapter, config_token
from masq_fx.models.registry import register_adapter


@register_adapter
class Qwen25OmniThinkerAdapter(ModelAdapter):
    """``Qwen2_5OmniThinkerForConditionalGeneration`` (the text-generating half of Qwen2.5-Omni).

    Decoder at ``model.model.language_model``, head ``model.lm_head``. The thinker computes
    ``[3, batch, seq]`` M-RoPE positions from ``input_ids`` (it scans for the vision-start and
    audio-start markers; its processor returns no ``mm_token_type_ids``), so modality ids come from
    the image/video/audio placeholder ids. The talker and token2wav parts of the full Omni model
    are not handled.
    """

    family = "qwen2.5-omni-thinker"
    model_classes = (Qwen2_5OmniThinkerForConditionalGeneration,)
    position_rows = 3

    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def modality_tokens(self) -> ModalityTokens:
        cfg = self.model.config
        return ModalityTokens(
            image=config_token(cfg, "image_token_id", "image_token_index"),
            video=config_token(cfg, "video_token_id", "video_token_index"),
            audio=config_token(cfg, "audio_token_id", "audio_token_index"),
        )
