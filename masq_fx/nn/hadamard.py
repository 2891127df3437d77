"""Orthogonal rotations of a width ``n``, stored as Kronecker factors and applied fast.

A :class:`Rotation` computes ``x · Q`` over the last dimension with ``Q = diag(signs) · (F_1 ⊗ … ⊗ F_r)``:
random signs and small orthogonal factors. Applied factor by factor on ``x`` viewed as ``[…, s_1, …, s_r]``,
it costs ``n · Σ s_i`` multiply-adds per token instead of ``n²``, which is what makes an online rotation
(inside the compiled graph, on every token) cheap; each factor is a GEMM on a view of ``x``, never a transposed
copy (``benchmarks/online_hadamard.py``). :meth:`Rotation.matrix` is the dense ``Q`` that offline
rotations fold into weights.

``kind="hadamard"``: the factors are Hadamard matrices (scaled to be orthogonal): powers of two by
Sylvester's construction, split in two factors of about ``√n``; the rest of ``n`` by Paley's constructions
(order ``q + 1`` for a prime ``q ≡ 3 mod 4``, ``2(q + 1)`` for a prime ``q ≡ 1 mod 4``), e.g.
1536 = 12 · 128, 3584 = 28 · 128, 18944 = 148 · 128. A width with no such factor (11008 = 43 · 256)
(or only a large one: 11008 = 43 · 256 has Paley order 5504 = 43 · 128) takes a seeded random orthogonal
matrix for its odd part. ``kind="orthogonal"``: one dense random
orthogonal matrix (QR of a Gaussian one), for comparison.
"""

from __future__ import annotations

import math
from functools import reduce
from typing import Literal

import torch
from torch import Tensor, nn

RotationKind = Literal["hadamard", "orthogonal"]
#: the largest Paley factor used; beyond it the odd part of the width gets a random orthogonal factor
MAX_PALEY = 256


def sylvester(n: int) -> Tensor:
    """The ±1 Hadamard matrix of order ``n`` (a power of two) by Sylvester's construction, float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> Tensor:
    """``Q[i, j] = χ(j − i)`` for the quadratic character χ of the prime field ``q``."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    index = torch.arange(q)
    return chi[(index[None, :] - index[:, None]) % q]


def paley(n: int) -> Tensor | None:
    """A ±1 Hadamard matrix of order ``n`` by Paley's first or second construction, or ``None`` if neither applies."""
    q = n - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: I + S, S skew, the core bordered by ones
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return s + torch.eye(n, dtype=torch.float64)
    q = n // 2 - 1
    if n % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II: the symmetric conference matrix, doubled
        c = torch.zeros(n // 2, n // 2, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        plus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        minus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, plus) + torch.kron(torch.eye(n // 2, dtype=torch.float64), minus)
    return None


def random_orthogonal(n: int, generator: torch.Generator) -> Tensor:
    """A random orthogonal ``n × n`` matrix (QR of a Gaussian one, signs fixed so it is Haar-distributed), float64."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :]).contiguous()


def hadamard_factors(n: int, generator: torch.Generator) -> list[Tensor]:
    """Orthogonal factors whose Kronecker product is a Hadamard matrix of order ``n`` (scaled by ``1/√n``);
    the odd part of a width with no constructible factor gets a random orthogonal matrix instead."""
    power = n & -n  # the largest power of two dividing n
    odd = n // power
    factors: list[Tensor] = []
    if odd > 1:  # the smallest Paley order odd · 2^j that divides n (up to MAX_PALEY: an online factor costs its order)
        orders = [odd << j for j in range(power.bit_length()) if odd << j <= MAX_PALEY]
        block = next((h for order in orders if (h := paley(order)) is not None), None)
        if block is None:
            factors.append(random_orthogonal(odd, generator))
        else:
            factors.append(block / math.sqrt(block.shape[0]))
            power //= block.shape[0] // odd
    if power > 1:
        half = 1 << (power.bit_length() // 2)  # Sylvester(power) = Sylvester(half) ⊗ Sylvester(power / half)
        factors.extend(sylvester(size) / math.sqrt(size) for size in (half, power // half) if size > 1)
    return factors or [torch.ones(1, 1, dtype=torch.float64)]


class Rotation(nn.Module):
    """``x ↦ x · Q`` over the last dimension (a multiple of :attr:`width`: each block of ``width`` is rotated).

    ``Q = diag(signs) · (F_1 ⊗ … ⊗ F_r)``, held as float32 buffers ``signs`` and ``factor_<i>``; :meth:`forward`
    computes in the input's dtype.
    """

    signs: Tensor

    def __init__(self, width: int, kind: RotationKind, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        if kind == "hadamard":
            factors = hadamard_factors(width, generator)
        elif kind == "orthogonal":
            factors = [random_orthogonal(width, generator)]
        else:
            raise ValueError(f"unknown rotation kind {kind!r}; use 'hadamard' or 'orthogonal'")
        self.width = width
        self.sizes = tuple(int(f.shape[0]) for f in factors)
        self.register_buffer("signs", torch.randint(0, 2, (width,), generator=generator).float() * 2 - 1)
        for index, factor in enumerate(factors):
            self.register_buffer(f"factor_{index}", factor.float())

    def factors(self) -> list[Tensor]:
        return [getattr(self, f"factor_{index}") for index in range(len(self.sizes))]

    def matrix(self) -> Tensor:
        """The dense ``Q`` ``[width, width]``, float64."""
        dense = reduce(torch.kron, [f.double() for f in self.factors()])
        return self.signs.double()[:, None] * dense

    def forward(self, x: Tensor) -> Tensor:
        shape, sizes = x.shape, self.sizes
        rows = math.prod(shape[:-1]) * (shape[-1] // self.width)  # explicit, so that no rows (an expert no token reached) reshape too
        y = x.reshape(rows, self.width) * self.signs.to(x.dtype)
        for axis, factor in enumerate(self.factors()):
            # on the [rows, s_1, …, s_r] view each factor acts on its own axis, with no transposed copies: the last
            # as one GEMM, an inner one as a batch of small ones (F_iᵀ · Y over the axes after it)
            before, size, after = math.prod(sizes[:axis]), sizes[axis], math.prod(sizes[axis + 1 :])
            f = factor.to(x.dtype)
            y = y.reshape(rows * before, size) @ f if after == 1 else f.t() @ y.reshape(rows * before, size, after)
        return y.reshape(shape)
