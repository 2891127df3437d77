"""Memory and time of quantizing real-size decoders layer by layer: SmolLM2-135M and Qwen2.5-VL-3B/7B shapes.

Models: ``smollm2`` (the real SmolLM2-135M-Instruct weights, float32, loaded from GGUF into ordinary
memory) and random-weight models with the published configurations of Qwen2.5-VL-3B and -7B, written
as sharded bfloat16 safetensors folders by ``benchmarks/fixtures/real_models.py`` (``--fixtures``):
transformers maps their weights instead of reading them, and masq_fx gives each layer's pages back
after its turn (:mod:`masq_fx.pages`).

Each (model, recipe, path) runs in a fresh subprocess that loads the model, calibrates on
``--samples`` samples (text windows for SmolLM2; a 448×448 image (256 tokens) plus text for the VL
models, ``--tokens`` tokens each) and applies the recipe, then prints:

- peak RSS of the whole process (``VmHWM``) and the resident memory after loading, and masq_fx's estimate
  of what calibrating and applying the recipe add (:func:`masq_fx.memory.estimate_calibration_memory`, which
  :func:`masq_fx.api.calibrate` checks against the available memory);
- wall time of ``apply`` and its time per decoder layer;
- the target of issue 17: 2 × the largest layer's float weights + the calibration activations + 2 GiB;
- what the whole-graph path held at once (the second moments of every layer): measured for SmolLM2
  (``--path whole`` runs it), its estimate for the others.

Recipes: ``masquant-w4a8`` (MAS learning with clipping, GPTQ, CMC; ``--epochs`` learning epochs) and
``mas-init+cmc`` (no learning: MAS-init scales, CMC with own channels on the rank).

Run: ``.venv/bin/python benchmarks/scale.py --models smollm2,qwen2.5-vl-3b`` (minutes for SmolLM2,
up to an hour for a 3B shape with learning on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

GIB = 1024**3
DEFAULT_FIXTURES = Path.home() / ".cache" / "masq_fx" / "fixtures"


def _status_kib(key: str) -> int:
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key)))


def _recipe(name: str, epochs: int):
    from masq_fx.recipes import PRESETS, preset
    from masq_fx.transforms.cmc import CMCConfig

    if name == "masquant-w4a8":
        recipe = PRESETS[name]
        return replace(recipe, learning=replace(recipe.learning, epochs=epochs))
    if name == "mas-init+cmc":
        return replace(preset("mas-init", 4, 8), cmc=CMCConfig(rank_ratio=0.05, own_channels="rank"))
    raise SystemExit(f"unknown recipe {name!r}")


def _load(model: str, fixtures: Path, samples: int, tokens: int, layers: int | None):
    """(model, processed calibration batches) of ``model``; ``layers``: only the first decoder layers."""
    if model == "smollm2":
        from masq_fx.builtin.smollm2 import load_smollm2
        from masq_fx.data.text import token_windows

        hf, tokenizer = load_smollm2(torch.float32)
        if layers is not None:
            del hf.model.layers[layers:]
            hf.config.num_hidden_layers = layers
        windows = token_windows(tokenizer, "calibration", tokens, samples)
        return hf, [{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in windows]
    import transformers
    from PIL import Image

    from masq_fx.data.processor import load_processor  # without torchvision: no video processor

    folder = fixtures / model
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{folder} has no model: write it with benchmarks/fixtures/real_models.py --models {model}")
    config = transformers.AutoConfig.from_pretrained(folder)
    if layers is not None:  # the other layers' weights stay unread
        config.get_text_config().num_hidden_layers = layers
    cls = getattr(transformers, config.architectures[0])
    hf = cls.from_pretrained(folder, config=config, dtype=torch.bfloat16).eval()
    processor = load_processor(folder)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(samples):
        pixels = torch.randint(0, 256, (448, 448, 3), generator=generator, dtype=torch.uint8).numpy()
        letters = torch.randint(ord("a"), ord("z") + 1, (max(tokens - 256, 16),), generator=generator)
        words = "".join(chr(int(c)) for c in letters)  # the fixtures' byte-level tokenizer: a token per letter
        text = f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{words}<|im_end|>\n"
        batches.append(dict(processor(text=[text], images=[Image.fromarray(pixels)], return_tensors="pt")))
    return hf, batches


def _largest_layer_bytes(captured) -> int:
    sizes: dict[int, int] = {}
    for name, weight in captured.weights.items():
        layer = captured.linear_layers.get(name)
        if layer is not None:
            sizes[layer] = sizes.get(layer, 0) + weight.numel() * weight.element_size()
    return max(sizes.values())


def _all_moments_bytes(captured, recipe) -> int:
    from masq_fx.memory import observed_channels

    return sum(len(recipe.moment_modalities) * c * c * 8 for c in observed_channels(captured))


def run_one(model: str, recipe_name: str, path: str, fixtures: Path, samples: int, tokens: int, epochs: int, layers: int | None) -> dict:
    """Measure one configuration in this process; a JSON-able row."""
    from masq_fx.api import apply, calibrate
    from masq_fx.memory import estimate_calibration_memory
    from masq_fx.pipeline import Pipeline
    from masq_fx.recipes import recipe_steps

    warnings.simplefilter("ignore")
    torch.set_num_threads(torch.get_num_threads())
    hf, batches = _load(model, fixtures, samples, tokens, layers)
    loaded = _status_kib("VmRSS") * 1024
    recipe = _recipe(recipe_name, epochs)
    calibrated = calibrate(hf, batches, [recipe], progress=False)
    estimate = estimate_calibration_memory(hf, calibrated.captured, [recipe], batches)  # what calibrate checked
    activations = sum(s.inputs_embeds.numel() * s.inputs_embeds.element_size() for s in calibrated.samples)
    start = time.perf_counter()
    if path == "sequential":
        apply(calibrated, recipe, progress=False)
    else:
        calibrated = replace(calibrated, moment_modalities=tuple(recipe.moment_modalities))
        Pipeline(recipe_steps(recipe, progress=False)).run(calibrated.context(), progress=False)
    seconds = time.perf_counter() - start
    captured = calibrated.captured
    largest = _largest_layer_bytes(captured)
    return {
        "model": model,
        "recipe": recipe_name + (f" ({epochs} epoch{'s' * (epochs > 1)})" if recipe_name == "masquant-w4a8" else ""),
        "path": path,
        "layers": captured.num_layers,
        "samples": len(batches),
        "tokens": sum(int(s.attention_mask.sum()) for s in calibrated.samples),
        "loaded_gib": loaded / GIB,
        "peak_gib": _status_kib("VmHWM") * 1024 / GIB,
        "estimate_gib": estimate.total / GIB,
        "target_gib": (2 * largest + activations + 2 * GIB) / GIB,
        "all_moments_gib": _all_moments_bytes(captured, recipe) / GIB,
        "seconds": seconds,
        "per_layer": seconds / captured.num_layers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default="smollm2,qwen2.5-vl-3b,qwen2.5-vl-7b")
    parser.add_argument("--recipes", default="mas-init+cmc,masquant-w4a8")
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    parser.add_argument("--samples", type=int, default=8, help="calibration samples (the 7B shape takes half)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per calibration sample")
    parser.add_argument("--epochs", type=int, default=2, help="MAS learning epochs (the 7B shape takes 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, help="only the first decoder layers of each model (their time per layer; the peak leaves out what later layers add)")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "RECIPE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        model, recipe, path = args.one
        print(json.dumps(run_one(model, recipe, path, args.fixtures, args.samples, args.tokens, args.epochs, args.layers)))
        return
    rows = []
    for model in args.models.split(","):
        big = model.endswith("7b")
        for recipe in args.recipes.split(","):
            for path in ("sequential", "whole") if model == "smollm2" else ("sequential",):
                command = [
                    sys.executable, __file__, "--one", model, recipe, path, "--fixtures", str(args.fixtures), "--threads", str(args.threads),
                    "--samples", str(max(1, args.samples // 2) if big else args.samples), "--tokens", str(args.tokens),
                    "--epochs", str(1 if big else args.epochs), *(["--layers", str(args.layers)] if args.layers else []),
                ]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{model} {recipe} {path}: failed\n{done.stderr[-2000:]}", flush=True)
                    continue
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                row = rows[-1]
                print(f"{model} {row['recipe']} {path}: peak {row['peak_gib']:.2f} GiB, {row['seconds']:.0f} s", flush=True)
    header = (
        "| model | recipe | path | layers | samples × tokens | loaded GiB | peak RSS GiB | peak − loaded GiB | masq_fx's estimate of it GiB "
        "| target GiB | all layers' moments GiB | apply s | s / layer |"
    )
    print("\n" + header + "\n|" + "---|" * header.count(" | ") + "---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['recipe']} | {r['path']} | {r['layers']} | {r['samples']} × {r['tokens'] // r['samples']} | "
            f"{r['loaded_gib']:.2f} | {r['peak_gib']:.2f} | {r['peak_gib'] - r['loaded_gib']:.2f} | {r['estimate_gib']:.2f} | "
            f"{r['target_gib']:.2f} | {r['all_moments_gib']:.2f} | "
            f"{r['seconds']:.0f} | {r['per_layer']:.1f} |"
        )


if __name__ == "__main__":
    main()
