"""Qwen3 (dense and MoE): decoder-only text models (Qwen2's layout plus RMS norms on queries and keys); every token is text."""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

from masq_fx.models.base import ModelAdapter
from masq_fx.models.registry import register_adapter


@register_adapter
class Qwen3Adapter(ModelAdapter):
    """``Qwen3ForCausalLM``: decoder at ``model.model``, head ``model.lm_head``, plain 1-D RoPE.

    The per-head ``q_norm``/``k_norm`` sit after ``q_proj``/``k_proj`` and are not quantized. Configs with
    ``use_sliding_window`` (sliding layers from ``max_window_layers`` on) generate through the KV cache too.
    """

    family = "qwen3"
    model_classes: ClassVar[tuple[type[nn.Module], ...]] = (Qwen3ForCausalLM,)  # the MoE adapter below sets its own

    def language_model(self) -> nn.Module:
        return self.model.get_submodule("model")


@register_adapter
class Qwen3MoeAdapter(Qwen3Adapter):
    """``Qwen3MoeForCausalLM``: Qwen3's layout with sparse MoE blocks (a top-k router and fused experts).

    The experts are unfused into per-expert linears (:mod:`masq_fx.models.experts`), each quantized and
    calibrated on the tokens routed to it; the router (``mlp.gate``) stays float. Layers in
    ``mlp_only_layers`` keep a dense MLP.
    """

    family = "qwen3-moe"
    model_classes = (Qwen3MoeForCausalLM,)
