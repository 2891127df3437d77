"""Qwen2.5-Omni thinker: vision and audio towers feeding a Qwen2-style decoder with 3-row M-RoPE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers import Qwen2_5OmniThinkerForConditionalGeneration

from masq_fx.models.base import ModelAdapter
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
        return self.model.get_submodule("model.language_model")


def thinker_token_fields(tokens: Mapping[str, int]) -> dict[str, Any]:
    """``Qwen2_5OmniThinkerConfig`` token-id fields from placeholder ids named ``image``, ``video``, ``audio``,
    ``audio_start``/``audio_end`` and ``vision_start``/``vision_end`` (the last two are read by the thinker's
    ``get_rope_index`` but not declared by its config class; real checkpoints set them)."""
    return {
        "image_token_index": tokens["image"],
        "video_token_index": tokens["video"],
        "audio_token_index": tokens["audio"],
        "audio_start_token_id": tokens["audio_start"],
        "audio_end_token_id": tokens["audio_end"],
        "vision_start_token_id": tokens["vision_start"],
        "vision_end_token_id": tokens["vision_end"],
    }
