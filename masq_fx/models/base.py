"""The adapter interface: what masq_fx needs to know about one family of HF models.

An adapter answers four questions about a model, and nothing else:

* where the language decoder is (a module with ``.layers`` that maps ``inputs_embeds`` to
  hidden states) and which module is the LM head;
* how the decoder's inputs are made: :meth:`ModelAdapter.decoder_inputs` runs the model's own
  forward (so the real vision/audio towers, embedding merge and position-id code run eagerly)
  and catches the arguments that reach the decoder, features added after decoder layers (DeepStack)
  included (:meth:`ModelAdapter.injection_layers`, :meth:`ModelAdapter.run_decoder`);
* the placeholder token ids of each modality (read from the config by default);
* the shape of the decoder's position ids (``[batch, seq]``, or ``[3, batch, seq]`` for M-RoPE).

Detection is by model class (``isinstance``), never by a path or a name substring.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from masq_fx.errors import InputError
from masq_fx.modality import ModalityPolicy, ModalityTokens, modality_ids, modality_ids_from_token_types
from masq_fx.models.device import model_device
from masq_fx.models.experts import unfuse_experts
from masq_fx.models.linear_attention import RecurrentLayer


@dataclass(frozen=True)
class DecoderInputs:
    """The four inputs of a captured decoder graph, in graph order.

    For a model that adds per-token features to the hidden states after some decoder layers (DeepStack:
    :meth:`ModelAdapter.injection_layers`), ``inputs_embeds`` carries them after the token embeddings on
    the last axis (``[batch, seq, hidden * (1 + layers)]``, zeros on the tokens without features).
    """

    inputs_embeds: torch.Tensor  # [batch, seq, ModelAdapter.embed_width()]
    position_ids: torch.Tensor  # [batch, seq] or [3, batch, seq]
    modality_ids: torch.Tensor  # [batch, seq], Modality codes
    attention_mask: torch.Tensor  # [batch, seq], 1 = real token, 0 = padding

    def args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.inputs_embeds, self.position_ids, self.modality_ids, self.attention_mask)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> DecoderInputs:
        """Cast the embeddings to ``dtype`` and move everything to ``device``."""
        return replace(
            self,
            inputs_embeds=self.inputs_embeds.to(device=device, dtype=dtype),
            position_ids=self.position_ids.to(device=device),
            modality_ids=self.modality_ids.to(device=device),
            attention_mask=self.attention_mask.to(device=device),
        )


class _Caught(Exception):
    """Raised by the pre-hook to stop the model's forward once the decoder's inputs are known."""


class ModelAdapter(ABC):
    """Base class of one model family. Subclasses set the class variables and :meth:`language_model`."""

    family: ClassVar[str]
    #: the HF classes this adapter handles, matched with ``isinstance``
    model_classes: ClassVar[tuple[type[nn.Module], ...]]
    #: number of rows of the decoder's position ids: 1 for plain RoPE, 3 for M-RoPE
    position_rows: ClassVar[int] = 1

    #: why the decoder's residual stream cannot be rotated (rotations, LaRoSA), said when one is asked for; ``None``: it can
    rotation_refusal: ClassVar[str | None] = None

    def __init__(self, model: nn.Module) -> None:
        """Adapt ``model``; fused mixture-of-experts tensors are unfused in place into per-expert linears that
        view them (:func:`~masq_fx.models.experts.unfuse_experts`: same outputs, and exportable)."""
        self.model = model
        unfuse_experts(model)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, cls.model_classes)

    @abstractmethod
    def language_model(self) -> nn.Module:
        """The decoder: ``forward(inputs_embeds=, position_ids=, attention_mask=)`` → ``last_hidden_state``."""

    def modality_tokens(self) -> ModalityTokens:
        """Placeholder token ids of the image, video and audio modalities, read from the model config."""
        cfg = self.model.config
        return ModalityTokens(
            image=config_token(cfg, "image_token_id", "image_token_index"),
            video=config_token(cfg, "video_token_id", "video_token_index"),
            audio=config_token(cfg, "audio_token_id", "audio_token_index"),
        )

    def lm_head(self) -> nn.Module:
        return cast(PreTrainedModel, self.model).get_output_embeddings()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Decoder-input embeddings of text tokens (:meth:`embed_width` wide: no injected features)."""
        return self.pack(cast(PreTrainedModel, self.model).get_input_embeddings()(input_ids))

    def injection_layers(self) -> tuple[int, ...]:
        """Decoder layers after whose output the model adds per-token features to the hidden states, in order.

        DeepStack models (Qwen3-VL) add visual features of several vision-tower depths after their first
        decoder layers; the features reach the graph in ``inputs_embeds`` (see :class:`DecoderInputs`) so that
        every graph keeps its four inputs, and :meth:`run_decoder` adds them. None by default.
        """
        return ()

    def embed_width(self) -> int:
        """The last dimension of ``DecoderInputs.inputs_embeds``: the hidden size, once more per injection layer."""
        return int(self.text_config().hidden_size) * (1 + len(self.injection_layers()))

    def injected_features(self, caught: Mapping[str, Any], embeds: torch.Tensor) -> torch.Tensor | None:
        """The features ``[len(injection_layers()), batch, seq, hidden]`` the model's forward passed its decoder.

        ``caught`` holds the decoder's keyword arguments, ``embeds`` its ``inputs_embeds``; ``None`` when the
        forward passed none (a text-only batch). Adapters with :meth:`injection_layers` override it.
        """
        return None

    def pack(self, embeds: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Token ``embeds`` ``[batch, seq, hidden]`` and their injected ``features`` (zeros if ``None``) as ``inputs_embeds``."""
        layers = len(self.injection_layers())
        if not layers:
            return embeds
        if features is None:
            features = embeds.new_zeros(layers, *embeds.shape)
        return torch.cat([embeds, *features.to(embeds.dtype)], dim=-1)

    def run_decoder(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        modality_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The decoder's last hidden state for graph-layout ``inputs_embeds``; ``kwargs`` go to the decoder (cache).
        ``modality_ids`` are for families whose attention depends on them (Gemma 3's bidirectional images).

        Injected features are split off and added to the outputs of :meth:`injection_layers` by forward
        hooks (removed again), as the model's own forward adds them; captures trace through this method.
        """
        decoder = self.language_model()
        layers = self.injection_layers()
        features: list[torch.Tensor] = []
        if layers:
            embeds, *features = inputs_embeds.split(int(self.text_config().hidden_size), dim=-1)
            inputs_embeds = embeds
        hooks = [self.layers()[index].register_forward_hook(_adds(feature)) for index, feature in zip(layers, features)]
        try:
            out = decoder(inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=attention_mask, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        return out.last_hidden_state

    def layers(self) -> nn.ModuleList:
        return cast(nn.ModuleList, self.language_model().layers)

    def text_config(self) -> Any:
        config: Any = self.model.config  # a PretrainedConfig (or a plain config object)
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    def kv_shapes(self) -> tuple[list[int], list[int]]:
        """Each decoder layer's key/value heads and head size (Gemma 4's full-attention layers have their own)."""
        config = self.text_config()
        layers = getattr(config, "per_layer_config", None)
        count = int(config.num_hidden_layers)
        configs = [layers[i] for i in range(count)] if layers is not None else [config] * count
        heads = [int(c.num_key_value_heads) for c in configs]
        sizes = [int(getattr(c, "head_dim", None) or config.hidden_size // config.num_attention_heads) for c in configs]
        return heads, sizes

    def recurrent_layers(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> dict[int, RecurrentLayer]:
        """The KV-cache layers of the decoder's linear-attention layers, by layer index (none: every layer attends)."""
        return {}

    def context_length(self) -> int | None:
        """The longest sequence the decoder's positions are trained for (``None`` when the config does not say)."""
        length = getattr(self.text_config(), "max_position_embeddings", None)
        return int(length) if isinstance(length, int) else None

    def check_length(self, tokens: int, what: str, fix: str) -> None:
        """Refuse ``tokens`` past :meth:`context_length`: positions beyond it give silently wrong outputs."""
        limit = self.context_length()
        if limit is not None and tokens > limit:
            raise InputError(f"{what} is {tokens} tokens, longer than the model's context of {limit} tokens: {fix}")

    def default_position_ids(self, batch: int, seq: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Position ids the decoder would make for itself with no cache."""
        pos = torch.arange(seq, device=device).expand(batch, seq)
        return pos.expand(self.position_rows, batch, seq).clone() if self.position_rows > 1 else pos.clone()

    def decoder_inputs(self, batch: Mapping[str, torch.Tensor], policy: ModalityPolicy = ModalityPolicy()) -> DecoderInputs:
        """Run the model's own forward on a processed ``batch`` up to its decoder and return the decoder's inputs.

        ``batch`` is what the model's processor returns (``input_ids``, ``attention_mask``,
        ``pixel_values``, ``input_features``, ``mm_token_type_ids``, ...), on any device: its tensors are
        moved to the model's. The towers run eagerly.
        """
        if "input_ids" not in batch:
            raise InputError("decoder_inputs needs 'input_ids' in the batch (the processor's output)")
        device = model_device(self.model)
        batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        caught: dict[str, Any] = {}

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            caught.update(kwargs)
            if args:
                caught.setdefault("input_ids", args[0])
            raise _Caught

        handle = self.language_model().register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                self.model(**batch, use_cache=False)
        except _Caught:
            pass
        finally:
            handle.remove()
        if not caught:
            raise RuntimeError(f"{type(self.model).__name__}.forward never called its language decoder")

        input_ids = batch["input_ids"]
        embeds = caught.get("inputs_embeds")
        if embeds is None:
            embeds = cast(PreTrainedModel, self.model).get_input_embeddings()(caught["input_ids"])
        embeds = self.pack(embeds, self.injected_features(caught, embeds))
        bsz, seq = input_ids.shape
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones(bsz, seq, dtype=torch.long, device=input_ids.device)
        positions = caught.get("position_ids")
        if positions is None:
            positions = self.default_position_ids(bsz, seq, input_ids.device)
        elif positions.dim() == 2 and self.position_rows > 1:
            positions = positions.expand(self.position_rows, bsz, seq).clone()
        elif positions.shape[0] == 1 and bsz > 1:  # one row of positions for the whole batch (Gemma 4)
            positions = positions.expand(bsz, seq).clone()
        if positions.is_floating_point():  # Qwen3-Omni computes its M-RoPE positions in float; graphs take integers
            if not bool((positions == positions.round()).all()):
                raise InputError(f"{type(self.model).__name__} made fractional position ids; masq_fx graphs take integer positions")
            positions = positions.long()
        return DecoderInputs(
            inputs_embeds=embeds.detach(),
            position_ids=positions.detach(),
            modality_ids=self.batch_modality_ids(batch, policy),
            attention_mask=attention_mask.long(),
        )

    def batch_modality_ids(self, batch: Mapping[str, torch.Tensor], policy: ModalityPolicy = ModalityPolicy()) -> torch.Tensor:
        """The modality of each token of a processed ``batch`` ``[batch, seq]`` (padding is text)."""
        attention_mask = batch.get("attention_mask")
        if "mm_token_type_ids" not in batch:
            return modality_ids(batch["input_ids"], self.modality_tokens(), policy, attention_mask)
        mods = modality_ids_from_token_types(batch["mm_token_type_ids"], policy)
        return mods if attention_mask is None else torch.where(attention_mask.bool(), mods, 0)


def _adds(feature: torch.Tensor) -> Any:
    """A forward hook adding ``feature`` to a decoder layer's output (a tensor, or a tuple led by one)."""

    def hook(_module: nn.Module, _args: tuple, out: Any) -> Any:
        return out + feature if isinstance(out, torch.Tensor) else (out[0] + feature, *out[1:])

    return hook


def config_token(config: Any, *names: str) -> int | None:
    """The first of ``names`` that ``config`` defines with a non-negative integer value."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= 0:
            return value
    return None
