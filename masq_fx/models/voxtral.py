"""Voxtral: a Whisper-style audio encoder and projector feeding a Llama (or Mistral) decoder."""

from __future__ import annotations

from torch import nn
from transformers import VoxtralForConditionalGeneration

from masq_fx.models.base import ModelAdapter
from masq_fx.models.registry import register_adapter


@register_adapter
class VoxtralAdapter(ModelAdapter):
    """``VoxtralForConditionalGeneration``: decoder at ``model.model.language_model``, plain 1-D RoPE.

    Audio comes in 30 s chunks of mel frames (``max_source_positions × 2`` frames each); the encoder's
    outputs are grouped four frames to a token, so a chunk becomes ``max_source_positions / 4`` audio
    tokens (375 for the published config), each an ``audio_token_id`` placeholder. Text-to-speech-free:
    the model reads audio and writes text.
    """

    family = "voxtral"
    model_classes = (VoxtralForConditionalGeneration,)

    def language_model(self) -> nn.Module:
        return self.model.get_submodule("model.language_model")
