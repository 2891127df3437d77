"""The memory estimate ``calibrate`` checks, against the measured peak, on SmolLM2-135M (real weights).

For each sequence length and recipe, a fresh process calibrates on one window of that many tokens of the
calibration split and applies the recipe to decoder layers 0-1 (a module filter; MAS learning 1 epoch), then
prints the growth of its peak RSS over the peak before calibrating next to masq_fx's estimate and its terms.
The attention tensors grow with seq², so two lengths separate them from what does not grow.

Run: ``.venv/bin/python benchmarks/memory_estimate.py [--tokens 2048 4096] [--recipes smoothquant-w8a8 masquant-w4a8]``
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import warnings
from dataclasses import replace

import torch


def one(tokens: int, recipe_name: str) -> None:
    from masq_fx.api import apply, calibrate
    from masq_fx.builtin.smollm2 import load_smollm2
    from masq_fx.capture.decoder import capture
    from masq_fx.data.text import token_windows
    from masq_fx.memory import estimate_calibration_memory
    from masq_fx.recipes import PRESETS
    from masq_fx.transforms.quantize import ModuleFilter

    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    model, tokenizer = load_smollm2()
    batches = [{"input_ids": w[None], "attention_mask": torch.ones_like(w[None])} for w in token_windows(tokenizer, "calibration", window=tokens, count=1)]
    recipe = replace(PRESETS[recipe_name], modules=ModuleFilter(include=(r"layers\.[0-1]\..*",)))
    if recipe.method == "mas":
        recipe = replace(recipe, learning=replace(recipe.learning, epochs=1))
    estimate = estimate_calibration_memory(model, capture(model), [recipe], batches)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    apply(calibrate(model, batches, [recipe], progress=False), recipe, progress=False)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    gib = 1 << 30
    print(f"{recipe_name:<20}{tokens:>8}{grown / gib:>12.2f}{estimate.total / gib:>12.2f}   {estimate.parts()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--recipes", nargs="+", default=["smoothquant-w8a8", "masquant-w4a8"])
    parser.add_argument("--one", nargs=2, metavar=("TOKENS", "RECIPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(int(args.one[0]), args.one[1])
        return
    print(f"{'recipe':<20}{'tokens':>8}{'peak GiB':>12}{'estimate':>12}   terms")
    for recipe in args.recipes:
        for tokens in args.tokens:
            subprocess.run([sys.executable, __file__, "--one", str(tokens), recipe], check=True)


if __name__ == "__main__":
    main()
