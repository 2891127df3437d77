"""Perplexity of SmolLM2-135M-Instruct under FP, RTN, SmoothQuant, MAS-init and MAS (reference numerics).

Evaluation protocol:
- model: the real SmolLM2-135M-Instruct weights (offline GGUF, rebuilt as a float Llama);
- evaluation: non-overlapping 512-token windows (``--eval-windows``, default 16) of the
  *evaluation* split of ``pydoc_data.topics`` (every 4th document key in sorted order);
- calibration: ``--calib-samples`` (default 32) windows of 256 tokens of the disjoint
  *calibration* split (the other documents);
- quantization: symmetric per-output-channel weights, dynamic symmetric per-token activations,
  on all 7 × 30 decoder linears; ``lm_head``, embeddings, norms, attention matmuls and the
  KV cache stay in float;
- methods (``--methods``), each on a fresh copy of one calibrated capture: RTN; SmoothQuant α=0.5
  tied (one scale per input, folded into the norm) and per-linear (online); MAS-init (per-linear,
  per-modality SmoothQuant); MAS (learned: AdamW lr 5e-2, 2 epochs, per layer); optional weight-side
  variants with GPTQ error feedback, a weight-MSE clipping search, or clipping ratios learned in
  MAS's per-layer loss (``mas-lwc``).
SmolLM2 is text only, so MAS-init equals per-linear SmoothQuant here; MAS differs by learning.

Run: ``.venv/bin/python benchmarks/smollm2_methods.py`` (about 15-20 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from masq_fx.api import apply, calibrate
from masq_fx.builtin.smollm2 import load_smollm2
from masq_fx.data.text import token_windows
from masq_fx.eval.perplexity import perplexity
from masq_fx.modality import Modality
from masq_fx.models import adapter_for
from masq_fx.recipes import preset
from masq_fx.transforms import quant_linears
from masq_fx.transforms.gptq import GPTQConfig

METHODS = {
    "rtn": ("RTN", "rtn", None, {}),
    "sq": ("SmoothQuant (tied, folded)", "smoothquant", None, {}),
    "sq-linear": ("SmoothQuant (per-linear)", "smoothquant", "per_linear", {}),
    "mas-init": ("MAS-init", "mas-init", None, {}),
    "mas": ("MAS (learned)", "mas", None, {}),
    "rtn-gptq": ("RTN + GPTQ", "rtn", None, {"gptq": GPTQConfig()}),
    "sq-gptq": ("SmoothQuant (tied) + GPTQ", "smoothquant", None, {"gptq": GPTQConfig()}),
    "mas-gptq": ("MAS (learned) + GPTQ", "mas", None, {"gptq": GPTQConfig()}),
    "mas-clip": ("MAS (learned) + clip search", "mas", None, {"clip_search": True}),
    "mas-lwc": ("MAS (learned) + learned clipping", "mas", None, {"learn_clipping": True}),
    "mas-lwc-gptq": ("MAS + learned clipping + GPTQ", "mas", None, {"learn_clipping": True, "gptq": GPTQConfig()}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--bits", default="8/8,4/8", help="comma-separated W/A bit pairs")
    parser.add_argument("--methods", default="rtn,sq,sq-linear,mas-init,mas", help=f"comma-separated, of: {', '.join(METHODS)}")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)

    model, tokenizer = load_smollm2()
    adapter = adapter_for(model)
    evaluation = token_windows(tokenizer, "evaluation", window=512, count=args.eval_windows)
    calibration = token_windows(tokenizer, "calibration", window=256, count=args.calib_samples)
    batches = [{"input_ids": r[None], "attention_mask": torch.ones_like(r[None])} for r in calibration]

    methods = [METHODS[name] for name in args.methods.split(",")]
    needs_moments = any("gptq" in extra for *_, extra in methods)
    start = time.perf_counter()
    moments = tuple(Modality) if needs_moments else ()
    calibrated = calibrate(model, batches, moment_modalities=moments, progress=True)
    base = calibrated.captured
    calib_s = time.perf_counter() - start
    fp = perplexity(base, adapter, evaluation, progress=True)
    rows = [("FP32", "-", fp, 0.0, 0, False)]
    for bits in args.bits.split(","):
        wbits, abits = (int(b) for b in bits.split("/"))
        for label, method, variant, extra in methods:
            recipe = preset(method, wbits, abits, variant)
            if extra.get("clip_search"):
                recipe = replace(recipe, weight=replace(recipe.weight, clip_search=True))
            if extra.get("learn_clipping"):
                recipe = replace(recipe, learning=replace(recipe.learning, learn_clipping=True))
            if "gptq" in extra:
                recipe = replace(recipe, gptq=extra["gptq"])
            start = time.perf_counter()
            captured = apply(calibrated, recipe).decoder
            seconds = time.perf_counter() - start
            quantized = [m.name for m in quant_linears(captured.graph_module) if m.weight_quant is not None]
            head = "lm_head" in quantized
            ppl = perplexity(captured, adapter, evaluation, progress=True)
            rows.append((label, f"W{wbits}A{abits}", ppl, seconds, len(quantized) - head, head))
            print(f"{label} W{wbits}A{abits}: ppl {ppl:.3f} ({seconds:.0f} s)", flush=True)

    print()
    print(f"SmolLM2-135M-Instruct, {args.eval_windows} × 512 eval tokens, {args.calib_samples} × 256 calib tokens "
          f"(calibration pass {calib_s:.0f} s)")
    print(f"{'method':<34} {'bits':<6} {'ppl':>8} {'Δ vs FP':>9} {'quantize s':>11} {'decoder linears':>16} {'lm_head':>8}")
    for label, bits, ppl, seconds, linears, head in rows:
        delta = "" if label == "FP32" else f"{100 * (ppl / fp - 1):+.1f}%"
        print(f"{label:<34} {bits:<6} {ppl:>8.3f} {delta:>9} {seconds:>11.0f} {linears:>16} {'yes' if head else 'no':>8}")


if __name__ == "__main__":
    main()
