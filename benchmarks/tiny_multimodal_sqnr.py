"""Per-layer, per-modality output SQNR of RTN / SmoothQuant / MAS-init / MAS / MAS+CMC on tiny multimodal models.

MAS rows keep one quantized weight per modality (the official "MAS simulation"); MAS+CMC rows
store one weight (text's) plus whitened low-rank branches of rank ratio ρ for vision and audio.

Tiny Qwen2.5-VL (text + image) and Qwen2.5-Omni thinker (text + image + audio) built from the
real HF classes with random weights: this shows the whole pipeline runs on real modelling code
and where the methods differ per modality; it says nothing about accuracy on real models.
Calibration and evaluation use different random batches (seeds 1.. and 100..).

``--part families``: every tiny family (``TINY_FAMILIES``), the presets ``smoothquant-w8a8``, ``masquant-w8a8``
and ``masquant-w4a8`` (``masquant-w4a8-paper``, unrotated, for families whose residual stream cannot be rotated:
Gemma 3 and 4): the last decoder layer's output SQNR per modality, calibrated on the same batches; for the
mixture-of-experts families, the experts of each MoE layer that calibration tokens of each modality reached.

Run: ``.venv/bin/python benchmarks/tiny_multimodal_sqnr.py [--part methods|families|both] [--families F ...]``
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from dataclasses import replace

import torch

from masq_fx.api import apply, apply_all, calibrate
from masq_fx.app.run_report import in_basis_of
from masq_fx.calibration.coverage import expert_coverage
from masq_fx.eval.sqnr import per_modality_layer_sqnr
from masq_fx.modality import Modality
from masq_fx.models import adapter_for
from masq_fx.models.tiny import TINY_FAMILIES, tiny_model
from masq_fx.recipes import preset
from masq_fx.transforms.cmc import CMCConfig

FAMILIES = ("qwen2.5-vl", "qwen2.5-omni-thinker")
METHODS = (
    ("RTN", "rtn", None),
    ("SmoothQuant", "smoothquant", None),
    ("MAS-init", "mas-init", None),
    ("MAS", "mas", None),
    ("MAS+CMC .05", "mas", CMCConfig(rank_ratio=0.05)),
    ("MAS+CMC .2", "mas", CMCConfig(rank_ratio=0.2)),
    ("MAS+CMC full", "mas", CMCConfig(rank_ratio=1.0)),
)


def _batches(family: str, seeds: range):
    """Batches of one fixed tiny model (seed 0 weights) with inputs drawn from other seeds."""
    model = tiny_model(family, seed=0).model
    return model, [tiny_model(family, seed=s, batch_size=4).batch for s in seeds]


PRESET_NAMES = ("smoothquant-w8a8", "masquant-w8a8", "masquant-w4a8")


def families(names: Sequence[str] = TINY_FAMILIES) -> None:
    """The tiny families ``names``: the last decoder layer's output SQNR per modality under the presets."""
    print("\nevery tiny family (random weights): last decoder layer's output SQNR in dB vs FP, per modality")
    print(f"{'family':<24}{'preset':<22}" + "".join(f"{m.name.lower():>10}" for m in Modality))
    for family in names:
        model, calib_batches = _batches(family, range(1, 5))
        _, eval_batches = _batches(family, range(100, 102))
        adapter = adapter_for(model)
        presets = PRESET_NAMES if adapter.rotation_refusal is None else (*PRESET_NAMES[:-1], "masquant-w4a8-paper")
        evaluation = [adapter.decoder_inputs(b) for b in eval_batches]
        calibrated = calibrate(model, calib_batches, recipes=presets, progress=False)
        last = calibrated.captured.num_layers - 1
        for name, quantized in zip(presets, apply_all(calibrated, presets, progress=False)):
            reference = in_basis_of(calibrated.captured, quantized.decoder)  # masquant-w4a8 is rotated
            sqnr = per_modality_layer_sqnr(reference, quantized.decoder, evaluation)
            cells = "".join(f"{sqnr[last, m]:>10.2f}" if (last, m) in sqnr else f"{'—':>10}" for m in Modality)
            print(f"{family:<24}{name:<22}{cells}")
        for row in expert_coverage(calibrated.captured.sites, calibrated.stats, calibrated.captured.modalities):
            seen = ", ".join(f"{m.name.lower()} {n}" for m, n in row.seen.items())
            print(f"{'':<24}layer {row.layer}: of {row.experts} experts, calibration tokens reached: {seen}; none: {row.unseen}")


def methods() -> None:
    for family in FAMILIES:
        model, calib_batches = _batches(family, range(1, 5))
        _, eval_batches = _batches(family, range(100, 102))
        adapter = adapter_for(model)
        evaluation = [adapter.decoder_inputs(b) for b in eval_batches]
        recipes = {
            (label, wbits, abits): replace(preset(method, wbits, abits), cmc=cmc)
            for wbits, abits in ((8, 8), (4, 8))
            for label, method, cmc in METHODS
        }
        calibrated = calibrate(model, calib_batches, recipes=recipes.values(), progress=False)
        base = calibrated.captured
        modalities = [m for m in Modality if any((s.modality_ids == int(m)).any() for s in evaluation)]
        print(f"\n{family} (tiny, random weights): per-layer output SQNR in dB vs FP, eval tokens per modality")
        header = f"{'method':<13} {'bits':<5} " + " ".join(
            f"{f'L{layer} {m.name.lower()}':>13}" for layer in range(base.num_layers) for m in modalities
        )
        print(header)
        for wbits, abits in ((8, 8), (4, 8)):
            for label, _, _ in METHODS:
                captured = apply(calibrated, recipes[label, wbits, abits], progress=False).decoder
                sqnr = per_modality_layer_sqnr(base, captured, evaluation)
                cells = " ".join(
                    f"{sqnr[(layer, m)]:>13.2f}" for layer in range(base.num_layers) for m in modalities
                )
                print(f"{label:<13} W{wbits}A{abits} {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("methods", "families", "both"), default="both")
    parser.add_argument("--families", nargs="+", choices=TINY_FAMILIES, default=TINY_FAMILIES, help="the families of --part families")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    if args.part in ("methods", "both"):
        methods()
    if args.part in ("families", "both"):
        families(args.families)


if __name__ == "__main__":
    main()
