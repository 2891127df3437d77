"""Streaming per-channel statistics of a linear layer's input activations, partitioned by modality.

Rows of every ``[M, ...]`` table follow :class:`~masq_fx.modality.Modality` codes
(``M = NUM_MODALITIES``). A row of a modality that has seen no tokens holds the identity of its
reduction: ``absmax`` 0, ``min`` +inf, ``max`` -inf, ``count`` 0, moment zeros.

Second moments ``Σ xᵀx`` (``[C, C]`` float64) are large, so they are kept only for the modalities
asked for, as a dict ``Modality -> Tensor``; a modality absent from the dict has no moment.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import reduce

import torch
from torch import Tensor

from masq_fx.errors import InputError
from masq_fx.modality import NUM_MODALITIES, Modality

_MOMENT_PREFIX = "moment."


@dataclass(frozen=True, eq=False)
class ChannelStats:
    """Per-channel statistics of one set of tokens (one modality, or all of them).

    ``moment`` is ``Σ xᵀx`` ``[C, C]`` float64, or ``None`` when it was not tracked.
    """

    absmax: Tensor
    min: Tensor
    max: Tensor
    count: int
    moment: Tensor | None


@dataclass(eq=False)
class ModalityStats:
    """Per-modality, per-channel statistics of the input activations of one site.

    ``absmax``, ``min``, ``max``: ``[M, C]`` float32; ``count``: ``[M]`` int64 (tokens seen);
    ``moments``: ``{modality: Σ xᵀx [C, C] float64}`` for the tracked modalities only.
    """

    absmax: Tensor
    min: Tensor
    max: Tensor
    count: Tensor
    moments: dict[Modality, Tensor]

    def __post_init__(self) -> None:
        channels = self.absmax.shape[-1] if self.absmax.dim() == 2 else -1
        for name in ("absmax", "min", "max"):
            table = getattr(self, name)
            if table.shape != (NUM_MODALITIES, channels) or table.dtype != torch.float32:
                raise InputError(
                    f"{name} must be float32 [{NUM_MODALITIES}, channels] with the shape of absmax, "
                    f"got {table.dtype} {tuple(table.shape)}"
                )
        if self.count.shape != (NUM_MODALITIES,) or self.count.dtype != torch.int64:
            raise InputError(
                f"count must be int64 [{NUM_MODALITIES}], got {self.count.dtype} {tuple(self.count.shape)}"
            )
        parsed = ((Modality.parse(m), t) for m, t in self.moments.items())
        self.moments = dict(sorted(parsed, key=lambda item: item[0]))
        for modality, moment in self.moments.items():
            if moment.shape != (channels, channels) or moment.dtype != torch.float64:
                raise InputError(
                    f"moment of {modality.name.lower()} must be float64 [{channels}, {channels}], "
                    f"got {moment.dtype} {tuple(moment.shape)}"
                )

    @classmethod
    def empty(
        cls,
        channels: int,
        moment_modalities: Iterable[Modality | str | int] = (),
        device: torch.device | str = "cpu",
    ) -> ModalityStats:
        """Statistics of no tokens over ``channels`` channels, tracking moments of ``moment_modalities``."""
        if channels <= 0:
            raise InputError(f"channels must be positive, got {channels}")
        shape = (NUM_MODALITIES, channels)
        return cls(
            absmax=torch.zeros(shape, dtype=torch.float32, device=device),
            min=torch.full(shape, float("inf"), dtype=torch.float32, device=device),
            max=torch.full(shape, float("-inf"), dtype=torch.float32, device=device),
            count=torch.zeros(NUM_MODALITIES, dtype=torch.int64, device=device),
            moments={
                Modality.parse(m): torch.zeros(channels, channels, dtype=torch.float64, device=device)
                for m in moment_modalities
            },
        )

    @property
    def channels(self) -> int:
        return self.absmax.shape[1]

    @property
    def moment_modalities(self) -> tuple[Modality, ...]:
        return tuple(self.moments)

    @torch.no_grad()
    def update(self, x: Tensor, modality_ids: Tensor, valid: Tensor | None = None) -> None:
        """Accumulate the tokens of ``x`` ``[..., C]`` in place.

        ``modality_ids`` (integer) and ``valid`` (bool; ``False`` tokens, e.g. padding, are skipped)
        have the leading shape of ``x``. Only the ids of valid tokens must be modality codes.
        ``x`` may have any float dtype or device; it is reduced in float32 (float64 for moments)
        on the device of these statistics.
        """
        if x.dim() < 1 or x.shape[-1] != self.channels:
            raise InputError(f"expected {self.channels} channels in the last dim of x, got shape {tuple(x.shape)}")
        if modality_ids.shape != x.shape[:-1]:
            raise InputError(
                f"modality_ids shape {tuple(modality_ids.shape)} must equal x's leading shape {tuple(x.shape[:-1])}"
            )
        if modality_ids.dtype.is_floating_point or modality_ids.dtype.is_complex or modality_ids.dtype == torch.bool:
            raise TypeError(f"modality_ids must be an integer tensor, got {modality_ids.dtype}")
        device = self.absmax.device
        tokens = x.detach().reshape(-1, self.channels).to(device=device, dtype=torch.float32)
        ids = modality_ids.reshape(-1).to(device=device, dtype=torch.int64)
        if valid is not None:
            if valid.shape != x.shape[:-1]:
                raise InputError(f"valid shape {tuple(valid.shape)} must equal x's leading shape {tuple(x.shape[:-1])}")
            keep = valid.reshape(-1).to(device=device, dtype=torch.bool)
            tokens, ids = tokens[keep], ids[keep]
        if ids.numel() == 0:
            return
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= NUM_MODALITIES:
            raise InputError(f"modality ids must lie in [0, {NUM_MODALITIES}), got values in [{low}, {high}]")

        # one masked reduction per modality: scatter_reduce_ with amax/amin is ~100x slower on CPU
        for modality in torch.unique(ids).tolist():
            selected = tokens[ids == modality]
            torch.maximum(self.absmax[modality], selected.abs().amax(0), out=self.absmax[modality])
            torch.minimum(self.min[modality], selected.amin(0), out=self.min[modality])
            torch.maximum(self.max[modality], selected.amax(0), out=self.max[modality])
            self.count[modality] += selected.shape[0]
            moment = self.moments.get(Modality(modality))
            if moment is not None:
                selected = selected.double()
                moment.addmm_(selected.T, selected)

    def merge(self, other: ModalityStats) -> ModalityStats:
        """Statistics of the union of both token sets (a new object; commutative and associative)."""
        if other.channels != self.channels:
            raise InputError(f"cannot merge statistics of {self.channels} and {other.channels} channels")
        if other.moment_modalities != self.moment_modalities:
            raise InputError(
                f"cannot merge statistics tracking moments of {_names(self.moment_modalities)} "
                f"and {_names(other.moment_modalities)}"
            )
        return ModalityStats(
            absmax=torch.maximum(self.absmax, other.absmax),
            min=torch.minimum(self.min, other.min),
            max=torch.maximum(self.max, other.max),
            count=self.count + other.count,
            moments={m: self.moments[m] + other.moments[m] for m in self.moments},
        )

    @staticmethod
    def merge_all(stats: Iterable[ModalityStats]) -> ModalityStats:
        """Merge one or more statistics."""
        stats = list(stats)
        if not stats:
            raise InputError("merge_all needs at least one ModalityStats")
        return reduce(ModalityStats.merge, stats)

    def of(self, modality: Modality | str | int) -> ChannelStats:
        """Statistics of one modality's tokens (views, not copies)."""
        m = Modality.parse(modality)
        return ChannelStats(
            absmax=self.absmax[m],
            min=self.min[m],
            max=self.max[m],
            count=int(self.count[m]),
            moment=self.moments.get(m),
        )

    def without_moments(self) -> ModalityStats:
        """These statistics without their second moments (what a layer-sequential run keeps of a finished layer)."""
        return ModalityStats(self.absmax, self.min, self.max, self.count, {})

    def all_tokens(self) -> ChannelStats:
        """Statistics of all tokens, whatever their modality.

        ``moment`` is the sum over modalities when moments are tracked for every present modality
        (and at least one), else ``None``.
        """
        tracked = bool(self.moments) and set(self.present()) <= set(self.moments)
        return ChannelStats(
            absmax=self.absmax.amax(0),
            min=self.min.amin(0),
            max=self.max.amax(0),
            count=int(self.count.sum()),
            moment=torch.stack(list(self.moments.values())).sum(0) if tracked else None,
        )

    def present(self) -> list[Modality]:
        """Modalities with at least one token, in code order."""
        return [Modality(i) for i in torch.nonzero(self.count).flatten().tolist()]

    def state_dict(self) -> dict[str, Tensor]:
        """Flat ``name -> tensor`` mapping (safetensors-compatible); moments are ``moment.<modality>``."""
        state = {"absmax": self.absmax, "min": self.min, "max": self.max, "count": self.count}
        state.update({f"{_MOMENT_PREFIX}{m.name.lower()}": t for m, t in self.moments.items()})
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> ModalityStats:
        """Inverse of :meth:`state_dict`."""
        tables = {"absmax", "min", "max", "count"}
        missing = tables - state.keys()
        unknown = {k for k in state.keys() - tables if not k.startswith(_MOMENT_PREFIX)}
        if missing or unknown:
            raise InputError(f"bad ModalityStats state: missing {sorted(missing)}, unknown {sorted(unknown)}")
        return cls(
            absmax=state["absmax"],
            min=state["min"],
            max=state["max"],
            count=state["count"],
            moments={
                Modality.parse(k.removeprefix(_MOMENT_PREFIX)): t
                for k, t in state.items()
                if k.startswith(_MOMENT_PREFIX)
            },
        )


def _names(modalities: tuple[Modality, ...]) -> str:
    return "(" + ", ".join(m.name.lower() for m in modalities) + ")" if modalities else "no modality"
