"""Modalities and the per-token ``modality_ids`` tensor that drives every modality-aware transform.

``modality_ids`` is an explicit input of every captured decoder graph: an integer tensor
``[batch, seq]`` whose values are :class:`Modality` codes. It is computed once at the HF
boundary (prefill) from ``input_ids`` and the model's placeholder token ids, or from the
processor's ``mm_token_type_ids``; decode steps are text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from masq_fx.errors import InputError


class Modality(enum.IntEnum):
    """Code stored in ``modality_ids``. The order is the row order of every per-modality table."""

    TEXT = 0
    VISION = 1
    AUDIO = 2

    @classmethod
    def parse(cls, value: str | int | Modality) -> Modality:
        if isinstance(value, Modality):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[value.upper()]
        except KeyError:
            names = ", ".join(m.name.lower() for m in cls)
            raise InputError(f"unknown modality {value!r}; expected one of: {names}") from None


NUM_MODALITIES = len(Modality)


@dataclass(frozen=True)
class ModalityTokens:
    """Placeholder token ids of one model. ``None`` means the model has no such token."""

    image: int | None = None
    video: int | None = None
    audio: int | None = None


@dataclass(frozen=True)
class ModalityPolicy:
    """How tokens that are not plainly text are counted.

    ``video_as`` defaults to vision (the official MASQuant code counts video tokens as text; we
    do not). Boundary/marker tokens (``<vision_start>``, ``<audio_eos>``, ...) and padding are text.
    """

    video_as: Modality = Modality.VISION

    def __post_init__(self) -> None:
        object.__setattr__(self, "video_as", Modality.parse(self.video_as))


def modality_ids(
    input_ids: torch.Tensor,
    tokens: ModalityTokens,
    policy: ModalityPolicy = ModalityPolicy(),
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Map ``input_ids`` ``[batch, seq]`` to modality codes ``[batch, seq]`` (int64).

    Padding positions (``attention_mask == 0``) are text.
    """
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    ids = torch.full_like(input_ids, int(Modality.TEXT), dtype=torch.long)
    for token, modality in ((tokens.image, Modality.VISION), (tokens.video, policy.video_as), (tokens.audio, Modality.AUDIO)):
        if token is not None:
            ids = torch.where(input_ids == token, int(modality), ids)
    if attention_mask is not None:
        ids = torch.where(attention_mask.bool(), ids, int(Modality.TEXT))
    return ids


# transformers' processors mark tokens with mm_token_type_ids: 0 text, 1 image, 2 video, 3 audio.
_MM_TOKEN_TYPES = {0: Modality.TEXT, 1: Modality.VISION, 3: Modality.AUDIO}


def modality_ids_from_token_types(
    mm_token_type_ids: torch.Tensor, policy: ModalityPolicy = ModalityPolicy()
) -> torch.Tensor:
    """Map a processor's ``mm_token_type_ids`` (0 text, 1 image, 2 video, 3 audio) to modality codes."""
    table = torch.zeros(4, dtype=torch.long, device=mm_token_type_ids.device)
    for token_type, modality in _MM_TOKEN_TYPES.items():
        table[token_type] = int(modality)
    table[2] = int(policy.video_as)
    if mm_token_type_ids.min() < 0 or mm_token_type_ids.max() > 3:
        raise InputError("mm_token_type_ids must hold values in 0..3 (text, image, video, audio)")
    return table[mm_token_type_ids.long()]


def decode_modality_ids(batch: int, steps: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    """Modality ids for decode steps: generated tokens are always text."""
    return torch.full((batch, steps), int(Modality.TEXT), dtype=torch.long, device=device)


def present_modalities(ids: torch.Tensor) -> list[Modality]:
    """The modalities that occur in a ``modality_ids`` tensor, in code order."""
    return [Modality(int(v)) for v in torch.unique(ids).tolist()]
