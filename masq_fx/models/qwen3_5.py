"""Qwen3.5 (dense and MoE): a Qwen3-VL-style vision tower feeding a hybrid decoder of Gated DeltaNet linear-attention
layers and gated full-attention layers (three linear to one full), with interleaved 3-row M-RoPE; and the text-only
classes of the same decoder."""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from torch import nn
from transformers import Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration, Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration
from transformers.masking_utils import create_causal_mask

from masq_fx.models.base import ModelAdapter
from masq_fx.models.linear_attention import RecurrentLayer, exportable_linear_attention, recurrent_layer
from masq_fx.models.qwen3_vl import Qwen3VLAdapter
from masq_fx.models.registry import register_adapter

_LINEAR = "linear_attention"


class _HybridDecoder(ModelAdapter):
    """The hybrid decoder's linear-attention layers: their exportable forward while a graph is captured, their
    masks and their KV-cache state."""

    def _linear_attention(self) -> dict[int, nn.Module]:
        types = self.text_config().layer_types
        return {i: cast(nn.Module, layer.linear_attn) for i, layer in enumerate(self.layers()) if types[i] == _LINEAR}

    def recurrent_layers(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> dict[int, RecurrentLayer]:
        return {i: recurrent_layer(module, batch_size, dtype, device) for i, module in self._linear_attention().items()}

    def run_decoder(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        modality_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The masks are built here (the model's own linear-attention mask branches on the token count): the
        full-attention layers' causal mask, and the 2-D padding mask for the linear-attention layers."""
        config = self.text_config()
        full = create_causal_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=kwargs.get("cache"), position_ids=None)
        masks = {"full_attention": full, _LINEAR: attention_mask}
        with exportable_linear_attention(list(self._linear_attention().values())):
            return super().run_decoder(inputs_embeds, position_ids, masks, modality_ids, **kwargs)  # type: ignore[arg-type]


@register_adapter
class Qwen3_5Adapter(_HybridDecoder, Qwen3VLAdapter):
    """``Qwen3_5ForConditionalGeneration``: decoder at ``model.model.language_model``, head ``model.lm_head``; Qwen3-VL's
    positions and vision tokens, without DeepStack.

    The linear-attention layers run :mod:`~masq_fx.models.linear_attention`'s exportable forward while
    a graph is captured. All four of their input projections (``in_proj_qkv``, ``in_proj_z`` and the per-head
    ``in_proj_b``/``in_proj_a`` that set each token's write strength and decay) and ``out_proj`` are quantized
    like the attention projections: they read the same norm, so they share its smoothing scales. The
    depthwise causal convolution, the decay parameters and the gated norm stay float. Their cache is a
    convolution window and a float32 recurrent state per layer (:class:`RecurrentLayer`), so
    KV-cache generation holds a fixed-size state for three layers in four.
    """

    family = "qwen3.5"
    model_classes: ClassVar[tuple[type[nn.Module], ...]] = (Qwen3_5ForConditionalGeneration,)  # the MoE adapter below sets its own

    def injection_layers(self) -> tuple[int, ...]:
        return ()


@register_adapter
class Qwen3_5MoeAdapter(Qwen3_5Adapter):
    """``Qwen3_5MoeForConditionalGeneration`` (Qwen3.5-35B-A3B, 397B-A17B): Qwen3.5 whose MLPs route each token to
    its top-k experts beside a shared expert with a sigmoid gate. The experts are unfused and calibrated per
    modality on their routed tokens; the router stays float; the shared expert and its gate are plain linears."""

    family = "qwen3.5-moe"
    model_classes = (Qwen3_5MoeForConditionalGeneration,)


@register_adapter
class Qwen3_5TextAdapter(_HybridDecoder):
    """``Qwen3_5ForCausalLM``: the Qwen3.5 decoder alone (decoder at ``model.model``, head ``model.lm_head``); every
    token is text, its 1-row positions expanded by the model to its M-RoPE rows. Quantized as in :class:`Qwen3_5Adapter`."""

    family = "qwen3.5-text"
    model_classes: ClassVar[tuple[type[nn.Module], ...]] = (Qwen3_5ForCausalLM,)  # the MoE adapter below sets its own

    def language_model(self) -> nn.Module:
        return self.model.get_submodule("model")


@register_adapter
class Qwen3_5MoeTextAdapter(Qwen3_5TextAdapter):
    """``Qwen3_5MoeForCausalLM``: the Qwen3.5-MoE decoder alone, quantized as in :class:`Qwen3_5MoeAdapter`."""

    family = "qwen3.5-moe-text"
    model_classes = (Qwen3_5MoeForCausalLM,)
