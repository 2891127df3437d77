"""Qwen2-Audio: a Whisper-style audio encoder feeding a Qwen2 decoder with plain 1-D RoPE."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers import Qwen2AudioForConditionalGeneration

from masq_fx.errors import InputError
from masq_fx.modality import ModalityPolicy
from masq_fx.models.base import DecoderInputs, ModelAdapter
from masq_fx.models.registry import register_adapter


@register_adapter
class Qwen2AudioAdapter(ModelAdapter):
    """``Qwen2AudioForConditionalGeneration``: decoder at ``model.model.language_model``, head ``model.lm_head``.

    The decoder gets no position ids (it counts ``0..seq-1``, also with left padding).
    """

    family = "qwen2-audio"
    model_classes = (Qwen2AudioForConditionalGeneration,)

    def language_model(self) -> nn.Module:
        return self.model.get_submodule("model.language_model")


    def decoder_inputs(self, batch: Mapping[str, torch.Tensor], policy: ModalityPolicy = ModalityPolicy()) -> DecoderInputs:
        """As :meth:`ModelAdapter.decoder_inputs`, refusing the legacy one-``<|AUDIO|>``-per-clip layout.

        Given a batch whose audio placeholders are not expanded (no two consecutive audio tokens),
        Qwen2-Audio re-lays the sequence out itself (its "legacy processing"), so the decoder's inputs
        no longer line up with ``input_ids``/``attention_mask``. Current processors expand them.
        """
        inputs = super().decoder_inputs(batch, policy)
        if inputs.inputs_embeds.shape[1] != batch["input_ids"].shape[1]:
            raise InputError(
                "Qwen2-Audio expanded the audio placeholders itself (legacy one-token-per-clip input): the "
                f"decoder got {inputs.inputs_embeds.shape[1]} positions for {batch['input_ids'].shape[1]} input ids. "
                "Process the batch with a current Qwen2AudioProcessor, which repeats <|AUDIO|> once per audio frame."
            )
        return inputs
