"""Masked vs index-based CMC branches: which layout of the low-rank branch compute is faster on CPU.

The CMC branch ``x̃·L_m·R_m`` applies to the tokens of modality ``m`` only. Without data-dependent
shapes there are two ways to compute it (issue: "masked compute, or per-modality index tensors passed
in as graph inputs; measure which is faster"):

* ``masked`` (what :class:`~masq_fx.backends.Int8QuantLinear` runs): the branches of all modalities
  stacked into one pair of factors, ``h = (x̃·L) ⊙ mask`` with each token keeping only its own
  modality's rank columns, then ``h·R``: every token goes through the ``R = Σ r_m`` rank columns;
* ``indexed``: per modality, ``idx_m`` (the positions of its tokens, a graph input) gathers its rows,
  ``(x̃[idx_m]·L_m)·R_m`` is added back with ``index_add``: only the modality's tokens are computed,
  at the price of a gather and a scatter. Compiled with dynamic shapes (the token counts vary per
  prompt), as a deployment would have to.

Protocol: float32 factors on SmolLM2-135M's linear shapes (576→576 q/o, 576→1536 gate/up,
1536→576 down), ``--tokens`` tokens of which ``--media`` are vision and audio in equal parts, in
spans; branch rank ``⌊ρ·min(d_in, d_out)⌋`` for each of vision and audio; each layout compiled with
``torch.compile(fullgraph=True)``; ``--runs`` interleaved calls after warm-up; medians, one thread
count (``--threads``). The table gives each layout's time per call and the ratio indexed/masked.
Both layouts are checked to give the same output (float rounding).

Run: ``.venv/bin/python benchmarks/cmc_branch_layout.py`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import functools
import math

import torch
from torch import Tensor

from masq_fx.app.bench import interleaved_medians, intra_op_threads

SHAPES = {"q/o 576→576": (576, 576), "gate/up 576→1536": (576, 1536), "down 1536→576": (1536, 576)}


def masked(x: Tensor, rows: Tensor, left: Tensor, right: Tensor, owner: Tensor) -> Tensor:
    """Stacked branches, each token keeping its own modality's rank columns."""
    return ((x @ left) * (rows[:, None] == owner)) @ right


def indexed(x: Tensor, vision: Tensor, audio: Tensor, lv: Tensor, rv: Tensor, la: Tensor, ra: Tensor) -> Tensor:
    """Per-modality gather, low-rank product and scatter-add."""
    y = x.new_zeros(x.shape[0], rv.shape[1])
    y = y.index_add(0, vision, (x[vision] @ lv) @ rv)
    return y.index_add(0, audio, (x[audio] @ la) @ ra)


def token_rows(tokens: int, media: float, span: int = 64) -> Tensor:
    """Modality row per token: text, then alternating vision (1) and audio (2) spans, ``media`` of them non-text."""
    rows = torch.zeros(tokens, dtype=torch.long)
    media_tokens = int(tokens * media)
    gap = max(1, (tokens - media_tokens) // max(1, math.ceil(media_tokens / span)))
    position, placed, modality = gap, 0, 1
    while placed < media_tokens and position < tokens:
        n = min(span, media_tokens - placed, tokens - position)
        rows[position : position + n] = modality
        placed, position, modality = placed + n, position + n + gap, 3 - modality
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--media", type=float, default=0.45)
    parser.add_argument("--ratios", default="0.05,0.2")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = token_rows(args.tokens, args.media)
    vision, audio = (rows == 1).nonzero().flatten(), (rows == 2).nonzero().flatten()
    masked_fn = torch.compile(masked, fullgraph=True)
    indexed_fn = torch.compile(indexed, fullgraph=True, dynamic=True)
    table = []
    with intra_op_threads(args.threads), torch.no_grad():
        for ratio in (float(r) for r in args.ratios.split(",")):
            for name, (d_in, d_out) in SHAPES.items():
                rank = max(1, math.floor(ratio * min(d_in, d_out)))
                x = torch.randn(args.tokens, d_in, generator=gen)
                lv, la = (torch.randn(d_in, rank, generator=gen) / d_in**0.5 for _ in range(2))
                rv, ra = (torch.randn(rank, d_out, generator=gen) / rank**0.5 for _ in range(2))
                left, right = torch.cat([lv, la], 1), torch.cat([rv, ra], 0)
                owner = torch.cat([torch.full((rank,), 1), torch.full((rank,), 2)])
                calls = {
                    "masked": functools.partial(masked_fn, x, rows, left, right, owner),
                    "indexed": functools.partial(indexed_fn, x, vision, audio, lv, rv, la, ra),
                }
                a, b = calls["masked"](), calls["indexed"]()
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
                medians = interleaved_medians(calls, runs=args.runs, warmup=5, progress=False)
                table.append((ratio, name, rank, medians["masked"], medians["indexed"]))
                print(f"ρ {ratio:g} {name}: masked {medians['masked'] * 1e6:.0f} µs, indexed {medians['indexed'] * 1e6:.0f} µs", flush=True)

    media = float((rows != 0).float().mean())
    print()
    print(f"{args.tokens} tokens ({media:.0%} vision + audio), float32 branches, {args.threads} threads, "
          f"median of {args.runs} interleaved calls")
    print(f"{'ρ':>5} {'linear':<18} {'rank':>5} {'masked µs':>10} {'indexed µs':>11} {'indexed/masked':>15}")
    for ratio, name, rank, m, i in table:
        print(f"{ratio:>5g} {name:<18} {rank:>5} {m * 1e6:>10.0f} {i * 1e6:>11.0f} {i / m:>15.2f}")


if __name__ == "__main__":
    main()
