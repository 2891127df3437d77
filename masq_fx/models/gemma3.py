"""Gemma 3: a SigLIP vision tower and pooling projector feeding a Gemma 3 decoder (sandwich norms, local and global
layers); and the text-only Gemma 3 (1B)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration
from transformers.masking_utils import _preprocess_mask_arguments, create_causal_mask, find_first_full_attention_index

from masq_fx.modality import Modality
from masq_fx.models.base import ModelAdapter
from masq_fx.models.registry import register_adapter


def image_blocks(modality_ids: torch.Tensor) -> torch.Tensor:
    """Each vision token's image index in its row (consecutive vision tokens are one image), -1 elsewhere: the block
    ids of the forward's bidirectional image mask. In integer arithmetic: a shifted boolean tensor makes inductor's
    vectorized CPU code fail to compile (torch 2.13) when the row has a single token (decode)."""
    image = (modality_ids == int(Modality.VISION)).long()
    previous = nn.functional.pad(image, (1, 0))[:, :-1]
    starts = image * (1 - previous)
    return torch.where(image.bool(), starts.cumsum(1) - 1, -1)


#: why neither Gemma 3 can be rotated
_SANDWICH_NORMS = (
    "Gemma 3 norms each attention and MLP output before the residual add (sandwich norms, with weights), "
    "which a rotation of the residual stream does not pass"
)


@register_adapter
class Gemma3TextAdapter(ModelAdapter):
    """``Gemma3ForCausalLM`` (Gemma 3 1B, text only): decoder at ``model.model``; as :class:`Gemma3Adapter` without images."""

    family = "gemma3-text"
    model_classes = (Gemma3ForCausalLM,)
    rotation_refusal = _SANDWICH_NORMS

    def language_model(self) -> nn.Module:
        return self.model.get_submodule("model")


@register_adapter
class Gemma3Adapter(ModelAdapter):
    """``Gemma3ForConditionalGeneration``: decoder at ``model.model.language_model``, plain 1-D RoPE (local layers
    with their own base), token embeddings scaled by √hidden inside the embedding module.

    An image becomes ``mm_tokens_per_image`` (256) image tokens between ``<start_of_image>`` / ``<end_of_image>``
    markers (text). The tokens of one image attend to each other both ways, as the model's forward lets them: the
    graph derives each image's block from ``modality_ids`` (consecutive vision tokens) and builds that mask.
    Every layer norms the attention and MLP outputs before the residual add (sandwich norms), which a
    residual-stream rotation cannot pass: rotations and LaRoSA are refused for this family (TEAL works).
    """

    family = "gemma3"
    model_classes: ClassVar[tuple[type[nn.Module], ...]] = (Gemma3ForConditionalGeneration,)  # Gemma 4's adapter sets its own
    rotation_refusal = _SANDWICH_NORMS

    def language_model(self) -> nn.Module:
        return self.model.get_submodule("model.language_model")

    def run_decoder(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        modality_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        masks: Any = attention_mask
        if modality_ids is not None and self.images_both_ways():  # the layers take the masks built here
            masks = self._masks(inputs_embeds, position_ids, attention_mask, modality_ids, kwargs.get("cache"))
        return super().run_decoder(inputs_embeds, position_ids, masks, **kwargs)

    def images_both_ways(self) -> bool:
        """Whether the tokens of one image attend to each other both ways (Gemma 3: always)."""
        return True

    def _masks(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor, modality_ids: torch.Tensor, cache: Any) -> dict[str, Any]:
        """The full and sliding layers' masks of the model's forward: causal, or within one image both ways; the
        sliding ones also within the window."""
        config = self.text_config()
        args = dict(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, position_ids=position_ids)
        full = create_causal_mask(**args, block_sequence_ids=image_blocks(modality_ids))
        masks = {"full_attention": full}
        if "sliding_attention" in config.layer_types:
            masks["sliding_attention"] = within_window(full, args, find_first_full_attention_index(cache))
        return masks


def within_window(mask: Any, mask_args: dict[str, Any], layer_idx: int) -> Any:
    """``mask`` (of layer ``layer_idx``'s cache, made from ``mask_args``) also within the config's sliding window. Built
    from indices: the forward's own composition expands its sliding mask with ``vmap``, which ``torch.compile``
    cannot trace in an exported graph."""
    sizes: tuple[Any, ...] = _preprocess_mask_arguments(**mask_args, layer_idx=layer_idx)
    q_length, kv_length, q_offset, kv_offset = sizes[-4:]  # symbolic under export
    device = mask_args["inputs_embeds"].device
    queries = torch.arange(q_length, device=device) + q_offset
    keys = torch.arange(kv_length, device=device) + kv_offset
    window = keys[None, :] > queries[:, None] - mask_args["config"].sliding_window
    return mask & window if mask.dtype == torch.bool else mask.masked_fill(~window, torch.finfo(mask.dtype).min)
