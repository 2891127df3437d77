"""Gemma 4: a vision tower and an audio encoder (both optional) feeding a Gemma 4 decoder with per-layer inputs,
shared KV layers and sandwich norms; and the text-only Gemma 4."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn
from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration, PreTrainedModel
from transformers.masking_utils import create_causal_mask

from masq_fx.models.base import ModelAdapter
from masq_fx.models.gemma3 import Gemma3Adapter, image_blocks, within_window
from masq_fx.models.registry import register_adapter

#: why Gemma 4 cannot be rotated
_SANDWICH_NORMS = (
    "Gemma 4 norms each attention and MLP output before the residual add (sandwich norms, with weights) and "
    "scales each layer's output, which a rotation of the residual stream does not pass"
)


class _PerLayerInputs(ModelAdapter):
    """Gemma 4's per-layer inputs (``hidden_size_per_layer_input``, as in Gemma 4 E2B): a second embedding of each
    token, ``num_layers × per_layer`` wide, that every decoder layer gates into its output. Multimodal tokens take
    the padding token's. It travels in ``inputs_embeds`` after the token embeddings, so every graph keeps its four
    inputs; its projection from the token embeddings runs in the graph (float: it is not a layer's linear)."""

    def _per_layer_width(self) -> int:
        config = self.text_config()
        return int(config.hidden_size_per_layer_input or 0) * int(config.num_hidden_layers)

    def embed_width(self) -> int:
        return int(self.text_config().hidden_size) + self._per_layer_width()

    def injected_features(self, caught: Mapping[str, Any], embeds: torch.Tensor) -> torch.Tensor | None:
        per_layer = caught.get("per_layer_inputs")
        if per_layer is None and self._per_layer_width():  # the text-only model computes them in its decoder
            return cast(Any, self.language_model()).get_per_layer_inputs(caught["input_ids"], embeds)
        return per_layer

    def pack(self, embeds: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        if not self._per_layer_width():
            return embeds
        if features is None:
            raise ValueError("Gemma 4's per-layer inputs are missing: embed tokens with ModelAdapter.embed")
        return torch.cat([embeds, features.flatten(-2).to(embeds.dtype)], dim=-1)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = cast(PreTrainedModel, self.model).get_input_embeddings()(input_ids)
        if not self._per_layer_width():
            return embeds
        return self.pack(embeds, cast(Any, self.language_model()).get_per_layer_inputs(input_ids, embeds))

    def run_decoder(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        modality_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        config = self.text_config()
        if self._per_layer_width():
            inputs_embeds, per_layer = inputs_embeds.split([int(config.hidden_size), self._per_layer_width()], dim=-1)
            kwargs["per_layer_inputs"] = per_layer.unflatten(-1, (int(config.num_hidden_layers), -1))
        return super().run_decoder(inputs_embeds, position_ids, attention_mask, modality_ids, **kwargs)


@register_adapter
class Gemma4TextAdapter(_PerLayerInputs):
    """``Gemma4ForCausalLM`` (text only): decoder at ``model.model``; as :class:`Gemma4Adapter` without media."""

    family = "gemma4-text"
    model_classes = (Gemma4ForCausalLM,)
    rotation_refusal = _SANDWICH_NORMS

    def language_model(self) -> nn.Module:
        return self.model.get_submodule("model")


@register_adapter
class Gemma4Adapter(_PerLayerInputs, Gemma3Adapter):
    """``Gemma4ForConditionalGeneration``: decoder at ``model.model.language_model``; image, video and audio placeholders.

    Image and video placeholders are vision tokens and audio placeholders audio tokens (the processor's
    ``mm_token_type_ids``, else the config's token ids); the begin/end markers are text. Layers past
    ``num_kv_shared_layers`` reuse an earlier layer's keys and values (they have no ``k_proj``/``v_proj``), and
    full-attention layers may read their values from the keys (``attention_k_eq_v``: no ``v_proj``); every
    projection a layer has is quantized, its per-layer input gate and projection included. Where the config asks
    for it (``use_bidirectional_attention="vision"``), an image's tokens attend to each other both ways in the
    sliding layers (not in the full ones, unlike Gemma 3): the graph derives each image's block from
    ``modality_ids`` and builds that mask. Sandwich norms and the per-layer output scale: rotations and LaRoSA are
    refused (TEAL works).
    """

    family = "gemma4"
    model_classes = (Gemma4ForConditionalGeneration,)
    rotation_refusal = _SANDWICH_NORMS

    def images_both_ways(self) -> bool:
        return self.text_config().use_bidirectional_attention == "vision"

    def _masks(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor, modality_ids: torch.Tensor, cache: Any) -> dict[str, Any]:
        """The model's masks: causal in full layers; in sliding layers causal or within one image both ways, and
        within the window."""
        config = self.text_config()
        args = dict(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, position_ids=position_ids)
        masks = {"full_attention": create_causal_mask(**args)}
        if "sliding_attention" in config.layer_types:
            sliding = config.layer_types.index("sliding_attention")
            both_ways = create_causal_mask(**args, block_sequence_ids=image_blocks(modality_ids), layer_idx=sliding)
            masks["sliding_attention"] = within_window(both_ways, args, sliding)
        return masks
