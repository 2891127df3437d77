"""Activation sparsity: dense vs TEAL vs LaRoSA at 25/40/50%, quality over calibration seeds and compiled speed.

Parts (``--parts``):

- ``quality``: SmolLM2-135M-Instruct (real weights), perplexity on ``--windows`` × 512 evaluation tokens; each
  seed ``s`` calibrates on the ``s``-th block of ``--calib-samples`` 512-token windows of the calibration split.
  Methods (:class:`~masq_fx.transforms.sparsity.SparsityConfig`): TEAL (uniform levels, thresholds), LaRoSA
  (one PCA basis per layer, block inputs at 0.8·s and o_proj/down_proj inputs at 1.2·s, the official allocation)
  and LaRoSA per block (a basis per attention and MLP block: twice the residual adapters). The level is the
  model-level target: the fraction of the decoder linears' weight rows skipped per token. Mean ± sd over seeds,
  and the achieved model-level sparsity on the evaluation windows.
- ``speed``: the same models at each level (seed 0), as batch-1 KV-cache generation graphs with the sparse-input
  kernel (:func:`masq_fx.backends.sparse.lower_sparse`), compiled (``fullgraph``), timed interleaved with the
  dense graph (:func:`masq_fx.app.bench.measure`): prefill of ``--tokens`` tokens and one decode step; ratios of
  medians within the run. ``--int8``: also W8A8 (RTN) on the int8 kernels, dense and on the LaRoSA 40% graph.
- ``trimodal``: the built-in tri-modal thinker at ``--trimodal-level``: vision and audio exact match on
  ``--items`` items and text perplexity, dense vs TEAL vs LaRoSA (covariance of all tokens, and the mean of the
  per-modality covariances), over ``--seeds`` draws of ``--trimodal-samples`` calibration samples per modality.

Run: ``.venv/bin/python benchmarks/sparsity.py`` (about 50 minutes on 2 cores: the speed part compiles 10 graphs).
"""

from __future__ import annotations

import argparse
import random
import statistics
import warnings
from dataclasses import replace

import torch

from masq_fx.api import apply, calibrate, calibration_inputs
from masq_fx.app.bench import BenchConfig, latency_table, measure
from masq_fx.backends.sparse import lower_sparse
from masq_fx.builtin.smollm2 import load_smollm2
from masq_fx.capture.decoder import CapturedDecoder, capture
from masq_fx.data.text import token_windows
from masq_fx.eval.perplexity import perplexity
from masq_fx.generation import capture_cached, transplant
from masq_fx.models import DecoderInputs, adapter_for
from masq_fx.recipes import preset
from masq_fx.transforms.sparsity import SparsityConfig, achieved_sparsity, model_sparsity, sparsify


def methods(level: float) -> dict[str, SparsityConfig]:
    return {
        f"TEAL {level:.0%}": SparsityConfig("teal", level),
        f"LaRoSA {level:.0%}": SparsityConfig("larosa", level),
        f"LaRoSA/block {level:.0%}": SparsityConfig("larosa", level, granularity="block"),
    }


def windows_as_inputs(model, windows: torch.Tensor) -> list[DecoderInputs]:
    return calibration_inputs(model, [{"input_ids": w[None], "attention_mask": torch.ones_like(w[None])} for w in windows])


def summary(values: list[float], scale: float = 1.0) -> str:
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{statistics.mean(values) * scale:.3f} ± {sd:.3f}"


def quality_part(args: argparse.Namespace, model, tokenizer, captured: CapturedDecoder) -> None:
    adapter = adapter_for(model)
    evaluation = token_windows(tokenizer, "evaluation", window=512, count=args.windows)
    probe = windows_as_inputs(model, evaluation)
    pool = token_windows(tokenizer, "calibration", window=512, count=args.calib_samples * args.seeds)
    dense = perplexity(captured, adapter, evaluation)
    rows: dict[str, dict[str, list[float]]] = {}
    for seed in range(args.seeds):
        samples = windows_as_inputs(model, pool[seed * args.calib_samples : (seed + 1) * args.calib_samples])
        for level in args.levels:
            for label, config in methods(level).items():
                sparse = sparsify(captured, config, samples, progress=False)
                ppl = perplexity(sparse, adapter, evaluation)
                achieved = model_sparsity(achieved_sparsity(sparse, probe, progress=False), {n: w.numel() for n, w in sparse.weights.items()})
                row = rows.setdefault(label, {"ppl": [], "achieved": []})
                row["ppl"].append(ppl)
                row["achieved"].append(sum(achieved.values()) / len(achieved))
                print(f"  seed {seed} {label}: ppl {ppl:.3f} (+{ppl / dense - 1:.1%}), achieved {row['achieved'][-1]:.3f}", flush=True)
    print()
    print(f"SmolLM2-135M-Instruct, {args.windows} x 512 eval tokens, {args.calib_samples} x 512 calib tokens per seed; mean ± sd over {args.seeds} seed(s)")
    print(f"{'method':<22}{'perplexity':>20}{'vs dense':>10}{'achieved sparsity':>20}")
    print(f"{'dense':<22}{dense:>20.3f}{'':>10}{0.0:>20.3f}")
    for label, row in rows.items():
        print(f"{label:<22}{summary(row['ppl']):>20}{statistics.mean(row['ppl']) / dense - 1:>+10.1%}{summary(row['achieved']):>20}")


def speed_part(args: argparse.Namespace, model, tokenizer, captured: CapturedDecoder) -> None:
    adapter = adapter_for(model)
    samples = windows_as_inputs(model, token_windows(tokenizer, "calibration", window=512, count=args.calib_samples))
    config = BenchConfig(prompt_tokens=args.tokens, decode_slots=128, warmup=2, runs=args.runs, threads=args.threads)
    graphs = {"dense": capture_cached(model, batch_size=1, max_cache_len=config.cache_len)}
    for level in args.levels:
        for label, sparsity in methods(level).items():
            cached = capture_cached(model, batch_size=1, max_cache_len=config.cache_len)
            transplant(sparsify(captured, sparsity, samples, progress=False), cached)
            lower_sparse(cached.graph_module, bags=args.threads)
            graphs[label] = cached
    if args.int8:  # the int8 backend: dense W8A8, and W8A8 on the LaRoSA graph (its int8 GEMM reads the sparse input densely)
        windows = token_windows(tokenizer, "calibration", window=512, count=args.calib_samples)
        calibrated = calibrate(model, [{"input_ids": w[None], "attention_mask": torch.ones_like(w[None])} for w in windows], progress=False)
        for label, recipe in (("W8A8 int8", preset("rtn", 8, 8)), ("W8A8 + LaRoSA 40%", replace(preset("rtn", 8, 8), sparsity=SparsityConfig("larosa", 0.4)))):
            quantized = apply(calibrated, recipe, progress=False)
            quantized.lower()
            graphs[label] = quantized.generation_graph(1, config.cache_len)
    ids = token_windows(tokenizer, "evaluation", window=args.tokens, count=1)
    prompt = adapter.decoder_inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    measured = measure(graphs, prompt, config)
    print()
    print(f"SmolLM2-135M-Instruct FP32, batch 1, {args.threads} threads, {args.runs} interleaved runs; compile + first calls {measured.compile_seconds:.0f} s")
    print(latency_table(measured.timings, args.tokens, baseline="dense"))


def trimodal_part(args: argparse.Namespace) -> None:
    from masq_fx.builtin.trimodal import load_set, load_trimodal, scores

    model, processor = load_trimodal()
    adapter = adapter_for(model)
    captured = capture(model)
    shipped, evaluation = load_set("calibration"), load_set("evaluation")
    windows = token_windows(processor.tokenizer, "evaluation", window=512, count=args.windows)

    def evaluate(decoder) -> dict[str, float]:
        return scores(decoder, adapter, processor, evaluation, args.items, windows)

    level = args.trimodal_level
    configs = {
        f"TEAL {level:.0%}": SparsityConfig("teal", level),
        f"LaRoSA {level:.0%}": SparsityConfig("larosa", level),
        f"LaRoSA {level:.0%} modality cov.": SparsityConfig("larosa", level, covariance="modalities"),
    }
    results: dict[str, dict[str, list[float]]] = {"dense": {k: [v] for k, v in evaluate(captured).items()}}
    for seed in range(args.seeds):
        draw = random.Random(seed)
        groups = [draw.sample(shipped.samples(m), args.trimodal_samples) for m in ("vision", "audio", "text")]
        batches = [processor(list(row)) for row in zip(*groups)]
        samples = calibration_inputs(model, batches)
        for label, config in configs.items():
            measured = evaluate(sparsify(captured, config, samples, progress=False))
            for metric, value in measured.items():
                results.setdefault(label, {}).setdefault(metric, []).append(value)
            print(f"  seed {seed} {label}: {measured}", flush=True)
    print()
    print(f"built-in tri-modal thinker, {args.items} items per modality, {args.windows} x 512 text tokens, "
          f"{args.trimodal_samples} calib samples per modality; mean ± sd over {args.seeds} seed(s)")
    metrics = list(results["dense"])
    print(f"{'method':<30}" + "".join(f"{m:>24}" for m in metrics))
    for label, values in results.items():
        print(f"{label:<30}" + "".join(f"{summary(values[m], 100 if 'match' in m else 1):>24}" for m in metrics))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="quality,speed,trimodal")
    parser.add_argument("--levels", type=lambda text: [float(x) for x in text.split(",")], default=[0.25, 0.4, 0.5], help="model-level sparsities")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--calib-samples", type=int, default=16, help="SmolLM2 calibration windows of 512 tokens per seed")
    parser.add_argument("--windows", type=int, default=4, help="512-token evaluation windows")
    parser.add_argument("--tokens", type=int, default=512, help="prompt tokens of the speed part")
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--int8", action="store_true", help="speed: also W8A8 on the int8 kernels, dense and on the LaRoSA 40%% graph")
    parser.add_argument("--trimodal-level", type=float, default=0.4)
    parser.add_argument("--trimodal-samples", type=int, default=16, help="tri-modal calibration samples per modality per seed")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    parts = args.parts.split(",")
    if {"quality", "speed"} & set(parts):
        model, tokenizer = load_smollm2()
        captured = capture(model)
        if "quality" in parts:
            quality_part(args, model, tokenizer, captured)
        if "speed" in parts:
            speed_part(args, model, tokenizer, captured)
    if "trimodal" in parts:
        trimodal_part(args)


if __name__ == "__main__":
    main()
