"""The online Hadamard rotation alone: masq_fx's :class:`~masq_fx.nn.hadamard.Rotation` against the dense matrix
and against the form it replaced (each factor applied between two transposed copies), eager and compiled.

Widths are the down_proj inputs (and residual streams) of SmolLM2-135M (1536, 576), Qwen2.5-VL-3B (11008, 2048)
and Qwen2.5-VL-7B (18944, 3584); a 512-token prefill and a 1-token decode step; median milliseconds over
``--runs`` interleaved calls; the dense product's maximum difference is printed for each form::

    .venv/bin/python benchmarks/online_hadamard.py --threads 2 --runs 21
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from masq_fx.nn.hadamard import Rotation

WIDTHS = (576, 1536, 2048, 11008, 3584, 18944)


def transposed_copies(rotation: Rotation) -> Callable[[Tensor], Tensor]:
    """The previous form: ``x`` viewed as ``[…, s_1, …, s_r]``, each factor applied by moving its axis last and back."""
    sizes, factors = rotation.sizes, rotation.factors()

    def run(x: Tensor) -> Tensor:
        shape = x.shape
        y = (x * rotation.signs).reshape(*shape[:-1], *sizes)
        for axis, factor in enumerate(factors):
            dim = y.dim() - len(sizes) + axis
            y = torch.movedim(torch.movedim(y, dim, -1) @ factor, -1, dim)
        return y.reshape(shape)

    return run


def once_ms(fn: Callable[[Tensor], Tensor], x: Tensor) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        fn(x)
        return 1e3 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--widths", type=int, nargs="*", default=list(WIDTHS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.runs} interleaved calls (ms)\n")
    print("| width | factors | tokens | ours eager | ours compiled | transposed copies eager | compiled | dense eager | compiled | max diff ours / copies |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for width in args.widths:
        rotation = Rotation(width, "hadamard", seed=0)
        dense = rotation.matrix().float()
        forms: dict[str, Callable[[Tensor], Tensor]] = {"ours": rotation, "copies": transposed_copies(rotation), "dense": lambda x, q=dense: x @ q}
        for tokens in (512, 1):
            x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                expected = x @ dense
                diffs = [float((forms[name](x) - expected).abs().max()) for name in ("ours", "copies")]
            runners = {}
            for name, form in forms.items():
                torch._dynamo.reset()
                compiled = torch.compile(form, dynamic=False)
                with torch.no_grad():
                    compiled(x)  # compile before timing
                runners[name] = (form, compiled)
            times: dict[str, list[float]] = {f"{name} {mode}": [] for name in forms for mode in ("eager", "compiled")}
            for _ in range(args.runs):  # interleaved: each round times every form once
                for name, (eager, compiled) in runners.items():
                    times[f"{name} eager"].append(once_ms(eager, x))
                    times[f"{name} compiled"].append(once_ms(compiled, x))
            cells = [f"{statistics.median(times[key]):.3f}" for key in times]
            sizes = " × ".join(map(str, rotation.sizes))
            print(f"| {width} | {sizes} | {tokens} | " + " | ".join(cells) + f" | {diffs[0]:.1e} / {diffs[1]:.1e} |", flush=True)
    print("\nmultiply-adds per token: n·Σ s_i for ours and the transposed copies, n² for the dense matrix")


if __name__ == "__main__":
    main()
