"""Per-modality accuracy of the built-in tri-modal model under FP, RTN, SmoothQuant, MAS and MAS+CMC.

This is the paper's main claim measured on our model: do per-modality smoothing scales (MAS) and
the cross-modal low-rank compensation (CMC) keep vision and audio accuracy where one shared
smoothing scale (SmoothQuant) loses it? Settings (``--settings``): W4A8 (the paper's), W4A8 with
GPTQ error feedback on the weights, and W8A6 (activation-bound: where smoothing matters most).

Protocol:
- model: the built-in tri-modal thinker (SmolLM2-135M-Instruct, frozen, with trained vision and
  audio towers; ``masq_fx.builtin.trimodal``); only the language decoder's 7 × 30 linears are quantized
  (towers, projectors, embeddings, ``lm_head``, attention matmuls and the KV cache stay float);
- calibration: ``--calib-samples`` samples per modality of the *calibration* split (text, rendered
  numbers, spoken numbers), observed once; every method runs on a fresh copy of that capture;
- evaluation: exact match of the greedy reply on ``--items`` items per modality of the disjoint
  *evaluation* split (numbers and voices unseen in training), text perplexity on
  ``--windows`` 512-token windows of the Python reference's evaluation split, and the SQNR of the
  last decoder layer's output per modality on 4 calibration batches;
- quantization: symmetric per-output-channel weights, dynamic symmetric per-token activations;
  a setting is ``W/A``, optionally ``+gptq`` (GPTQ on the final smoothed weights);
- methods: RTN; SmoothQuant α=0.5 tied (one scale per input, folded into the norm, all tokens);
  MAS-init (per-linear, per-modality SmoothQuant scales, one stored weight per modality); MAS
  (learned per layer, one stored weight per modality: the per-modality weight simulation); MAS+CMC
  (one stored weight, text's, plus whitened rank-ρ branches for vision and audio tokens), at each
  ``--ranks`` ratio, all from the same learned MAS scales; with ``--own-channels``, also MAS+CMC
  whose vision/audio scales keep their own value on only as many channels as the rank
  (``CMCConfig(own_channels="rank")``; text's scale elsewhere). ``--learn-clipping``: MAS also learns
  each weight's per-channel clipping ratio in its per-layer loss. With ``+gptq``, GPTQ solves the
  weights after MAS (and after the own-channel projection of the scales, before CMC). ``mas-tied``
  (not in the default list): MAS learned under CMC's own-channel constraint
  (``MASLearningConfig(own_channels_in_loop=True)``) for the first ``--ranks`` ratio, then that CMC.

Run: ``.venv/bin/python benchmarks/trimodal_methods.py`` (about 45 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
import warnings
from dataclasses import replace

import torch

from masq_fx.api import apply, calibrate
from masq_fx.app.sources import Sizes, load_source
from masq_fx.eval.sqnr import per_modality_layer_sqnr
from masq_fx.modality import Modality
from masq_fx.pipeline import Pipeline
from masq_fx.recipes import preset
from masq_fx.transforms.cmc import CMCConfig, CrossModalCompensation, ProjectScales
from masq_fx.transforms.gptq import GPTQConfig, GPTQWeights

METHODS = {
    "rtn": "RTN",
    "smoothquant": "SmoothQuant (tied)",
    "mas-init": "MAS-init",
    "mas": "MAS (learned)",
    "mas-tied": "MAS tied + CMC",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration samples per modality")
    parser.add_argument("--items", type=int, default=128, help="evaluation items per modality (at most 128)")
    parser.add_argument("--windows", type=int, default=4, help="512-token text perplexity windows")
    parser.add_argument("--settings", default="4/8,4/8+gptq,8/6", help="comma-separated W/A bit pairs, optionally +gptq")
    parser.add_argument("--methods", default="rtn,smoothquant,mas-init,mas", help=f"comma-separated, of: {', '.join(METHODS)}")
    parser.add_argument("--ranks", default="0.05,0.2", help="CMC rank ratios applied after MAS")
    parser.add_argument("--own-channels", action="store_true", help="add MAS+CMC rows with own_channels='rank'")
    parser.add_argument("--learn-clipping", action="store_true", help="MAS also learns per-channel weight clipping")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")

    source = load_source("default", Sizes(calibration=args.calib_samples, evaluation=args.items, eval_windows=args.windows))
    start = time.perf_counter()
    settings = args.settings.split(",")
    moments = tuple(Modality) if any(s.endswith("+gptq") for s in settings) else (Modality.VISION, Modality.AUDIO)
    calibrated = calibrate(source.model, source.calibration, moment_modalities=moments, progress=True)
    base = calibrated.captured
    print(f"calibration pass {time.perf_counter() - start:.0f} s")
    probe = calibrated.samples[:4]

    def score(label: str, bits: str, captured, seconds: float) -> None:
        metrics = source.evaluate(captured)
        layers = per_modality_layer_sqnr(base, captured, probe) if captured is not base else {}
        last = max((layer for layer, _ in layers), default=None)
        sqnr = {m: layers.get((last, m), math.inf) for m in Modality}
        rows.append((label, bits, metrics, sqnr, seconds))
        print(f"{label} {bits}: {metrics} last-layer SQNR {sqnr} ({seconds:.0f} s)", flush=True)

    rows: list = []
    score("FP32", "-", base, 0.0)
    for setting in settings:
        pair, gptq = setting.removesuffix("+gptq"), setting.endswith("+gptq")
        wbits, abits = (int(b) for b in pair.split("/"))
        bits = f"W{wbits}A{abits}" + (" GPTQ" if gptq else "")
        for method in args.methods.split(","):
            label = METHODS[method]
            recipe = preset(method.removesuffix("-tied"), wbits, abits)
            clip = method in ("mas", "mas-tied") and args.learn_clipping
            if clip:
                recipe = replace(recipe, learning=replace(recipe.learning, learn_clipping=True))
                label = "MAS (learned + clipping)"
            if method == "mas-tied":  # the whole recipe: MAS under the constraint, projection, GPTQ, CMC
                ratio = float(args.ranks.split(",")[0])
                learning = replace(recipe.learning, own_channels_in_loop=True)
                recipe = replace(recipe, learning=learning, cmc=CMCConfig(rank_ratio=ratio, own_channels="rank"))
                label = "MAS tied" + (" +clip" if clip else "") + f" + CMC ρ={ratio:g}"
            if method != "mas" and gptq:
                recipe = replace(recipe, gptq=GPTQConfig())
            # MAS is learned once for all its rows; GPTQ (after CMC's scale projection, if any) runs per row
            start = time.perf_counter()
            context = apply(calibrated, recipe, progress=method in ("mas", "mas-tied")).context
            seconds = time.perf_counter() - start
            solve = [GPTQWeights(GPTQConfig(), progress=False)] if gptq and method == "mas" else []
            variants: list[tuple[str, CMCConfig | None]] = [(label, None)]
            if method == "mas":
                for ratio in (float(r) for r in args.ranks.split(",")):
                    for own in ("rank",) * args.own_channels + (None,):
                        name = f"MAS + CMC ρ={ratio:g}" + (" own=rank" if own else "")
                        variants.append((name, CMCConfig(rank_ratio=ratio, own_channels=own)))
            for name, cmc in variants:
                project = [ProjectScales(cmc)] if cmc is not None and cmc.own_channels is not None else []
                steps = [*project, *solve, *([] if cmc is None else [CrossModalCompensation(cmc)])]
                # a real deep copy: ProjectScales rewrites the scale tables in place, which CapturedDecoder.copy() shares
                variant = copy.deepcopy(context) if steps else context
                start = time.perf_counter()
                Pipeline(steps).run(variant, progress=False)
                score(name, bits, variant.captured, seconds + time.perf_counter() - start)

    print()
    print(f"{source.title}; {args.items} evaluation items per modality, {args.windows} × 512 text tokens")
    metrics = list(rows[0][2])
    header = f"{'method':<32} {'setting':<11}" + "".join(f"{m:>22}" for m in metrics)
    header += "".join(f"{'SQNR ' + m.name.lower():>14}" for m in Modality) + f"{'quantize s':>11}"
    print(header)
    for label, bits, values, sqnr, seconds in rows:
        cells = "".join(f"{100 * values[m]:>21.1f}%" if "exact match" in m else f"{values[m]:>22.3f}" for m in metrics)
        cells += "".join(f"{sqnr[m]:>14.1f}" for m in Modality)
        print(f"{label:<32} {bits:<11}{cells}{seconds:>11.0f}")


if __name__ == "__main__":
    main()
