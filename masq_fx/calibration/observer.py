"""An FX-insertable module that records the per-modality statistics of a linear layer's input."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from masq_fx.calibration.stats import ModalityStats
from masq_fx.errors import InputError
from masq_fx.modality import Modality


class ModalityObserver(nn.Module):
    """Accumulates :class:`ModalityStats` of its input; returns ``None``.

    ``_is_impure`` keeps a ``call_module`` node targeting it alive through
    ``Graph.eliminate_dead_code`` although nothing uses its output.
    """

    _is_impure = True

    def __init__(self, moment_modalities: Iterable[Modality | str | int] = ()) -> None:
        super().__init__()
        self.moment_modalities: tuple[Modality, ...] = tuple(sorted({Modality.parse(m) for m in moment_modalities}))
        self.stats: ModalityStats | None = None

    def forward(self, x: Tensor, modality_ids: Tensor, attention_mask: Tensor | None = None) -> None:
        """Record ``x`` ``[..., C]`` (``[batch, seq, C]``, or the ``[tokens, C]`` routed to an expert); tokens where
        ``attention_mask`` (``x``'s leading shape) is 0 are skipped."""
        if x.dim() < 2:
            raise InputError(f"x must be [batch, seq, channels] or [tokens, channels], got shape {tuple(x.shape)}")
        with torch.no_grad():
            if self.stats is None:
                self.stats = ModalityStats.empty(x.shape[-1], self.moment_modalities, device=x.device)
            valid = None if attention_mask is None else attention_mask != 0
            self.stats.update(x, modality_ids, valid)

    def reset(self) -> None:
        """Forget everything recorded."""
        self.stats = None

    def extra_repr(self) -> str:
        moments = ", ".join(m.name.lower() for m in self.moment_modalities)
        return f"moment_modalities=({moments})"
