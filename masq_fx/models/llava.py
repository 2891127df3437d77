"""LLaVA: a CLIP-style vision tower and projector feeding a Llama decoder with plain 1-D RoPE."""

from __future__ import annotations

from torch import nn
from transformers import LlavaForConditionalGeneration

from masq_fx.models.base import ModelAdapter
from masq_fx.models.registry import register_adapter


@register_adapter
class LlavaAdapter(ModelAdapter):
    """``LlavaForConditionalGeneration``: decoder at ``model.model.language_model``, head ``model.lm_head``.

    The decoder receives no position ids from the LLaVA forward (it counts ``0..seq-1`` itself, also
    with left padding), which is what :meth:`ModelAdapter.default_position_ids` gives.
    """

    family = "llava"
    model_classes = (LlavaForConditionalGeneration,)

    def language_model(self) -> nn.Module:
        return self.model.get_submodule("model.language_model")
