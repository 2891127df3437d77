"""The CMC branches of a lowered linear, as both kernel backends lay them out."""

from __future__ import annotations

import torch
from torch import Tensor

from masq_fx.capture.positions import POSITION_MODALITIES
from masq_fx.modality import Modality


def stacked_branches(branches: dict[int, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """CMC branches as one pair of factors: ``left [in, R]``, ``right [R, out]`` and the scale row of each
    of the ``R`` rank columns (``R`` = the ranks summed)."""
    rows = sorted(branches)
    left = torch.cat([branches[r][0].detach().float() for r in rows], dim=1)
    right = torch.cat([branches[r][1].detach().float() for r in rows], dim=0)
    owner = torch.cat([torch.full((branches[r][0].shape[1],), r, device=left.device) for r in rows])
    return left, right, owner


def branch_layout(
    ranks: dict[int, int], row_of_modality: Tensor
) -> tuple[dict[int, tuple[int, int]], tuple[tuple[int, int], ...]]:
    """(scale row → its columns ``[start, stop)`` of the stacked factors, (index into the positions inputs,
    scale row) of each modality whose tokens take a branch). The second is empty (masked only) if text's
    row has a branch, as text tokens have no positions input."""
    spans: dict[int, tuple[int, int]] = {}
    start = 0
    for row, rank in ranks.items():
        spans[row] = (start, start + rank)
        start += rank
    rows = [int(r) for r in row_of_modality]
    if rows[Modality.TEXT] in spans:
        return spans, ()
    return spans, tuple((i, rows[m]) for i, m in enumerate(POSITION_MODALITIES) if rows[m] in spans)
