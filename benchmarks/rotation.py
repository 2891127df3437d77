"""Rotations at 4 bits: each method with and without the Hadamard rotations, side by side, over calibration seeds.

Two parts (``--parts``), each calibrated ``--seeds`` times on disjoint draws of its calibration split; each
method's mean and sample standard deviation over the seeds are printed, so close methods can be ranked:

- ``smollm2``: SmolLM2-135M-Instruct (real weights), the perplexity protocol of ``smollm2_methods.py``
  (``--windows`` × 512 evaluation tokens; ``--calib-samples`` windows of 256 calibration tokens, seed ``s``
  taking the ``s``-th block of windows of the calibration split);
- ``trimodal``: the built-in tri-modal thinker, vision and audio exact match on ``--items`` evaluation items
  and text perplexity on ``--windows`` × 512 tokens; seed ``s`` draws ``--calib-samples`` calibration samples
  per modality from the shipped calibration split (64 per modality), and with ``--text-windows N`` also the
  ``s``-th block of ``N`` windows of 256 reference-text tokens (the questions' text alone is short arithmetic).

Methods, at W4A8 with GPTQ on the weights (``--methods``): RTN, SmoothQuant (tied), MAS-init, MAS (learned),
the ``masquant-w4a8`` preset (MAS learned with clipping + GPTQ + CMC; tri-modal only, since SmolLM2 has only
text, where CMC has nothing to compensate); and W4A16 (g64, GPTQ: weights alone, the floor activation methods
cannot beat); ``mas-clip`` (not in the default list): MAS learned with
clipping + GPTQ, ``masquant-w4a8`` without CMC; ``w4a4`` (not in the default list): RTN W4A4 with GPTQ, the stretch setting. Each with no rotation and with ``RotationConfig()`` (residual + heads + online down_proj
Hadamard; the rotated recipes calibrate on the rotated float graph, one extra float pass per seed).

Run: ``.venv/bin/python benchmarks/rotation.py`` (about an hour on 2 cores; ``--parts smollm2 --seeds 1`` ~10 min).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings
from dataclasses import replace

import torch

from masq_fx.api import apply_all, calibrate
from masq_fx.builtin.smollm2 import load_smollm2
from masq_fx.data.text import token_windows
from masq_fx.eval.perplexity import perplexity
from masq_fx.models import adapter_for
from masq_fx.recipes import PRESETS, Recipe, preset
from masq_fx.transforms.gptq import GPTQConfig
from masq_fx.transforms.rotation import RotationConfig

METHODS = {
    "rtn": "RTN",
    "smoothquant": "SmoothQuant (tied)",
    "mas-init": "MAS-init",
    "mas": "MAS (learned)",
    "mas-clip": "MAS + learned clipping",
    "masquant-w4a8": "masquant-w4a8 (MAS+clip+CMC)",
    "w4a16": "W4A16 g64 (weights only)",
    "w4a4": "RTN W4A4 (stretch)",
}


def recipes(methods: list[str], text_only: bool) -> list[tuple[str, Recipe]]:
    """(row label, recipe) for each method, without and with rotation; every recipe solves its weights with GPTQ."""
    rows = []
    for method in methods:
        if method == "masquant-w4a8":
            if text_only:
                continue
            recipe = PRESETS["masquant-w4a8"]
        elif method == "w4a16":
            recipe = replace(preset("rtn", 4, 16), gptq=GPTQConfig())
        elif method == "mas-clip":  # masquant-w4a8 without CMC and its own-channel tie: the text-only counterpart
            recipe = preset("mas", 4, 8)
            recipe = replace(recipe, learning=replace(recipe.learning, learn_clipping=True), gptq=GPTQConfig())
        elif method == "w4a4":
            recipe = replace(preset("rtn", 4, 4), gptq=GPTQConfig())
        else:
            recipe = replace(preset(method, 4, 8), gptq=GPTQConfig())
        rows += [(METHODS[method], recipe), (METHODS[method] + " +rot", replace(recipe, rotation=RotationConfig()))]
    return rows


def smollm2_part(args: argparse.Namespace, methods: list[str]) -> tuple[str, dict[str, dict[str, list[float]]]]:
    model, tokenizer = load_smollm2()
    adapter = adapter_for(model)
    evaluation = token_windows(tokenizer, "evaluation", window=512, count=args.windows)
    pool = token_windows(tokenizer, "calibration", window=256, count=args.calib_samples * (args.first_seed + args.seeds))
    rows = recipes(methods, text_only=True)
    results: dict[str, dict[str, list[float]]] = {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        windows = pool[seed * args.calib_samples : (seed + 1) * args.calib_samples]
        batches = [{"input_ids": w[None], "attention_mask": torch.ones_like(w[None])} for w in windows]
        calibrated = calibrate(model, batches, [r for _, r in rows], progress=False)
        if "FP32" not in results:
            results["FP32"] = {"perplexity": [perplexity(calibrated.captured, adapter, evaluation)]}
        start = time.perf_counter()
        quantized = apply_all(calibrated, [r for _, r in rows], progress=True)
        print(f"smollm2 seed {seed}: {len(rows)} recipes applied in {time.perf_counter() - start:.0f} s", flush=True)
        for (label, _), q in zip(rows, quantized):
            ppl = perplexity(q.decoder, adapter, evaluation)
            results.setdefault(label, {}).setdefault("perplexity", []).append(ppl)
            print(f"  {label}: ppl {ppl:.3f}", flush=True)
    title = f"SmolLM2-135M-Instruct, {args.windows} × 512 eval tokens, {args.calib_samples} × 256 calib tokens per seed"
    return title, results


def trimodal_part(args: argparse.Namespace, methods: list[str]) -> tuple[str, dict[str, dict[str, list[float]]]]:
    from masq_fx.builtin.trimodal import load_set, load_trimodal, scores

    model, processor = load_trimodal()
    adapter = adapter_for(model)
    shipped, evaluation = load_set("calibration"), load_set("evaluation")
    windows = token_windows(processor.tokenizer, "evaluation", window=512, count=args.windows)

    def evaluate(decoder) -> dict[str, float]:
        return scores(decoder, adapter, processor, evaluation, args.items, windows)

    rows = recipes(methods, text_only=False)
    results: dict[str, dict[str, list[float]]] = {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        draw = random.Random(seed)
        groups = [draw.sample(shipped.samples(m), args.calib_samples) for m in ("vision", "audio", "text")]
        samples = [s for row in zip(*groups) for s in row]
        batches = [processor(samples[i : i + 8]) for i in range(0, len(samples), 8)]
        if args.text_windows:  # seed s takes the s-th block of reference-text windows of the calibration split
            pool = token_windows(processor.tokenizer, "calibration", window=256, count=args.text_windows * (seed + 1))[seed * args.text_windows :]
            batches += [{"input_ids": w[None], "attention_mask": torch.ones_like(w[None])} for w in pool]
        calibrated = calibrate(model, batches, [r for _, r in rows], progress=False)
        if "FP32" not in results:
            results["FP32"] = {k: [v] for k, v in evaluate(calibrated.captured).items()}
        start = time.perf_counter()
        quantized = apply_all(calibrated, [r for _, r in rows], progress=True)
        print(f"trimodal seed {seed}: {len(rows)} recipes applied in {time.perf_counter() - start:.0f} s", flush=True)
        for (label, _), q in zip(rows, quantized):
            measured = evaluate(q.decoder)
            for metric, value in measured.items():
                results.setdefault(label, {}).setdefault(metric, []).append(value)
            print(f"  {label}: {measured}", flush=True)
    title = f"built-in tri-modal thinker, {args.items} items per modality, {args.windows} × 512 text tokens, {args.calib_samples} calib samples per modality per seed"
    if args.text_windows:
        title += f" + {args.text_windows} × 256 reference-text tokens"
    return title, results


def print_table(title: str, results: dict[str, dict[str, list[float]]], seeds: int) -> None:
    print()
    print(f"{title}; mean ± sd over {seeds} calibration seed(s)")
    metrics = list(results["FP32"])
    print(f"{'method':<40}" + "".join(f"{m:>26}" for m in metrics))
    for label, values in results.items():
        cells = ""
        for metric in metrics:
            xs = values[metric]
            scale, unit = (100, "%") if "exact match" in metric else (1, "")
            sd = statistics.stdev(xs) * scale if len(xs) > 1 else 0.0
            cells += f"{statistics.mean(xs) * scale:>16.2f}{unit} ± {sd:<5.2f}".rjust(26)
        print(f"{label:<40}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="smollm2,trimodal")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed … first-seed + seeds - 1 (split a long run over processes)")
    parser.add_argument("--methods", default="rtn,smoothquant,mas-init,mas,masquant-w4a8,w4a16", help=f"comma-separated, of: {', '.join(METHODS)}")
    parser.add_argument("--calib-samples", type=int, default=16, help="SmolLM2: 256-token windows; tri-modal: samples per modality")
    parser.add_argument("--windows", type=int, default=4, help="512-token evaluation windows")
    parser.add_argument("--text-windows", type=int, default=0, help="tri-modal: 256-token reference-text windows added to each seed's calibration")
    parser.add_argument("--items", type=int, default=64, help="tri-modal evaluation items per modality")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    methods = args.methods.split(",")
    parts = {"smollm2": smollm2_part, "trimodal": trimodal_part}
    tables = [parts[name](args, methods) for name in args.parts.split(",")]
    for title, results in tables:
        print_table(title, results, args.seeds)


if __name__ == "__main__":
    main()
