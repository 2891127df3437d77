"""Decoder-only text models of the Llama family (SmolLM2, Llama, Qwen2): every token is text."""

from __future__ import annotations

from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

from masq_fx.models.base import ModelAdapter
from masq_fx.models.registry import register_adapter


@register_adapter
class LlamaAdapter(ModelAdapter):
    family = "llama"
    model_classes = (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)

    def language_model(self) -> nn.Module:
        return self.model.get_submodule("model")
