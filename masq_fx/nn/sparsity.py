"""The modules of a sparsified graph: activation sparsifiers, changes of basis, and the sparse-input linear kernel.

* :class:`TopK` keeps the ``keep`` largest-magnitude entries of every token (the same count for every token, so
  the work skipped is fixed); :class:`Threshold` zeroes the entries below a calibrated magnitude (TEAL: the
  count varies per token).
* :class:`BasisChange` multiplies by a fixed matrix (``x ↦ x·A``): LaRoSA's residual adapters ``Q_lᵀ Q_{l+1}``;
  :class:`BlockBases` rotates each hidden-width block of the decoder input by its own basis (the graph entry).
* :class:`SparseInputLinear` is a linear whose input goes through a sparsifier first. For one token (decode) it
  reads only the kept rows of its transposed weight: ``y = Σ_k x[i_k] · Wᵀ[i_k]``, one ``embedding_bag`` (a
  fused gather and weighted sum) split in ``bags`` parts so that every thread has rows to add; for several
  tokens, whose kept entries differ, it multiplies the sparse input densely.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import guard_or_false


def top_k(x: Tensor, keep: int) -> Tensor:
    """``x`` with all but the ``keep`` largest-magnitude entries of its last dimension set to zero."""
    index = x.abs().topk(keep, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter(-1, index, x.gather(-1, index))


class TopK(nn.Module):
    """Keep the ``keep`` largest-magnitude of the ``width`` entries of each token, zero the others."""

    def __init__(self, width: int, keep: int) -> None:
        super().__init__()
        if not 0 < keep <= width:
            raise ValueError(f"keep must be in 1..{width}, got {keep}")
        self.width = width
        self.keep = keep

    def forward(self, x: Tensor) -> Tensor:
        return top_k(x, self.keep)

    def kept(self, flat: Tensor) -> Tensor:
        """Indices of the entries of one token ``flat`` ``[width]`` that :meth:`forward` keeps."""
        return flat.abs().topk(self.keep, sorted=False).indices

    def extra_repr(self) -> str:
        return f"keep={self.keep}/{self.width}"


class Threshold(nn.Module):
    """Zero the entries whose magnitude is below ``threshold`` (a calibrated scalar)."""

    threshold: Tensor

    def __init__(self, threshold: float | Tensor) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32).reshape(()))

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x.abs() < self.threshold.to(x.dtype), torch.zeros_like(x), x)

    def kept(self, flat: Tensor) -> Tensor:
        """Indices of the entries of one token ``flat`` that :meth:`forward` keeps (a data-dependent count)."""
        return torch.nonzero(flat.abs() >= self.threshold.to(flat.dtype)).reshape(-1)

    def extra_repr(self) -> str:
        return f"threshold={float(self.threshold):.4g}"


class BasisChange(nn.Module):
    """``x ↦ x · matrix`` over the last dimension."""

    matrix: Tensor

    def __init__(self, matrix: Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.matrix.to(x.dtype)


class BlockBases(nn.Module):
    """``x`` ``[..., blocks · width]``: block ``b`` is multiplied by ``bases[b]`` ``[width, width]``."""

    bases: Tensor

    def __init__(self, bases: Tensor) -> None:
        super().__init__()
        self.register_buffer("bases", bases)

    def forward(self, x: Tensor) -> Tensor:
        blocks, width, _ = self.bases.shape
        y = torch.einsum("...bi,bij->...bj", x.reshape(*x.shape[:-1], blocks, width), self.bases.to(x.dtype))
        return y.reshape(x.shape)


class SparseInputLinear(nn.Module):
    """``F.linear(sparsifier(x), weight, bias)``, reading only the kept weight rows for a single token.

    ``sparsifier`` is a :class:`TopK` or a :class:`Threshold`. The weight is held transposed (``[in, out]``,
    contiguous: a kept input channel is one contiguous row). A threshold's kept count depends on the data: compile
    such a graph with dynamic output shapes (:func:`~masq_fx.backends.compile_graph` does).
    """

    weight_t: Tensor

    def __init__(self, weight: Tensor, bias: Tensor | None, sparsifier: TopK | Threshold, bags: int) -> None:
        super().__init__()
        self.sparsifier = sparsifier
        self.bags = max(1, bags)
        self.weight_t = nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if guard_or_false(x.shape[:-1].numel() == 1):  # an MoE expert's unbacked row count in a compiled graph: dense
            flat = x.reshape(-1)
            index = self.sparsifier.kept(flat)
            offsets = torch.arange(self.bags, device=x.device) * (index.shape[0] // self.bags)
            y = F.embedding_bag(index, self.weight_t, offsets, mode="sum", per_sample_weights=flat[index]).sum(0)
            y = y.reshape(*x.shape[:-1], -1)
        else:
            y = self.sparsifier(x) @ self.weight_t
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        width, out = self.weight_t.shape
        return f"in={width}, out={out}, bags={self.bags}"
