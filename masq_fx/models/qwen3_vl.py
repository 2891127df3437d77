"""Qwen3-VL (dense and MoE) and the Qwen3-Omni-MoE thinker: a vision tower feeding a Qwen3 decoder with interleaved 3-row M-RoPE and DeepStack."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import Qwen3OmniMoeThinkerForConditionalGeneration, Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

from masq_fx.models.base import ModelAdapter
from masq_fx.models.registry import register_adapter


@register_adapter
class Qwen3VLAdapter(ModelAdapter):
    """``Qwen3VLForConditionalGeneration``: decoder at ``model.model.language_model``, head ``model.lm_head``.

    Positions are ``[3, batch, seq]`` (temporal, height, width; the decoder's rotary embedding
    interleaves the three rows' frequencies itself). Image and video placeholders are vision tokens
    (the processor's ``mm_token_type_ids``, else the config's ``image_token_id``/``video_token_id``);
    the vision-start/end markers are text.

    DeepStack: the vision tower's intermediate features (one set per ``vision_config.deepstack_visual_indexes``
    entry) are added to the hidden states of the visual tokens after decoder layers ``0 … k-1``. They
    travel in ``inputs_embeds`` after the token embeddings (:class:`~masq_fx.models.DecoderInputs`,
    zeros on other tokens and on decoded tokens) and are added back by :meth:`ModelAdapter.run_decoder`.
    """

    family = "qwen3-vl"
    model_classes: ClassVar[tuple[type[nn.Module], ...]] = (Qwen3VLForConditionalGeneration,)  # the MoE adapter below sets its own
    position_rows = 3

    def language_model(self) -> nn.Module:
        return self.model.get_submodule("model.language_model")

    def injection_layers(self) -> tuple[int, ...]:
        config: Any = self.model.config
        return tuple(range(len(config.vision_config.deepstack_visual_indexes)))

    def injected_features(self, caught: Mapping[str, Any], embeds: torch.Tensor) -> torch.Tensor | None:
        """The decoder's ``deepstack_visual_embeds`` (``[visual tokens, hidden]`` each) scattered onto ``visual_pos_masks``."""
        mask, features = caught.get("visual_pos_masks"), caught.get("deepstack_visual_embeds")
        if mask is None or features is None:
            return None
        dense = embeds.new_zeros(len(features), *embeds.shape)
        for layer, feature in enumerate(features):
            dense[layer][mask] = feature.to(embeds.dtype)
        return dense


@register_adapter
class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """``Qwen3VLMoeForConditionalGeneration``: Qwen3-VL with sparse MoE decoder blocks (Qwen3-VL-30B-A3B, 235B-A22B).

    The experts are unfused into per-expert linears (:mod:`masq_fx.models.experts`): each is calibrated per
    modality on the tokens routed to it, so an expert that no vision token reached falls back to its text
    statistics; the router (``mlp.gate``) stays float.
    """

    family = "qwen3-vl-moe"
    model_classes = (Qwen3VLMoeForConditionalGeneration,)


@register_adapter
class Qwen3OmniMoeThinkerAdapter(Qwen3VLAdapter):
    """``Qwen3OmniMoeThinkerForConditionalGeneration`` (the text-generating half of Qwen3-Omni-30B-A3B): Qwen3-VL's
    vision tower with DeepStack, an audio encoder, and a sparse MoE decoder with interleaved 3-row M-RoPE.

    Tri-modal: image and video placeholders are vision tokens, audio placeholders audio tokens (the config's
    ``image_token_id``/``video_token_id``/``audio_token_id``); the start/end markers are text. The experts are
    unfused and calibrated per modality on their routed tokens, as for ``qwen3-vl-moe``. The talker and
    code2wav parts of the full Omni model are not handled.
    """

    family = "qwen3-omni-moe-thinker"
    model_classes = (Qwen3OmniMoeThinkerForConditionalGeneration,)
