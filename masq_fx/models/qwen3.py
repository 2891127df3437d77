"""Qwen3: a decoder-only text model (Qwen2's layout plus RMS norms on queries and keys); every token is text."""

from __future__ import annotations

from torch import nn
from transformers import Qwen3ForCausalLM

from masq_fx.models.base import ModelAdapter
from masq_fx.models.registry import register_adapter


@register_adapter
class Qwen3Adapter(ModelAdapter):
    """``Qwen3ForCausalLM``: decoder at ``model.model``, head ``model.lm_head``, plain 1-D RoPE.

    The per-head ``q_norm``/``k_norm`` sit after ``q_proj``/``k_proj`` and are not quantized. Configs with
    ``use_sliding_window`` (sliding layers from ``max_window_layers`` on) generate through the KV cache too.
    """

    family = "qwen3"
    model_classes = (Qwen3ForCausalLM,)

    def language_model(self) -> nn.Module:
        return self.model.get_submodule("model")
