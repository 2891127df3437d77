"""Prefill and decode speed of SmolLM2-135M on torchao int8 kernels (W8A8, W4A8) vs FP32, all compiled.

Protocol:
- model: the real SmolLM2-135M-Instruct weights. Quantized graphs: ``preset(--recipe, bits, 8)``
  (default ``mas-init``: per-linear routed smoothing divided online, the MASQuant runtime structure,
  down_proj included;
  ``smoothquant`` folds one scale into the norms instead) calibrated on 4 windows of 256 tokens of the
  calibration split, lowered with :func:`masq_fx.backends.lower_to_torchao` (every decoder linear on
  the int8 kernel; 4-bit weights as 4-bit codes in int8 storage). ``lm_head`` stays float everywhere.
- every graph is the generation graph (:func:`masq_fx.generation.capture_cached`, batch 1, a static
  KV cache of ``--tokens`` + 128 slots) with the quantized modules transplanted, compiled by
  :func:`masq_fx.backends.compile_graph` (``fullgraph=True``, the same inductor options for all);
- prefill: one ``--tokens``-token window of the evaluation split at cache slot 0; decode: one text
  token at slot ``--tokens`` (the attention reads the whole cache either way);
- ``--threads`` threads, two warm-up calls, then ``--runs`` interleaved calls of every graph
  (:func:`masq_fx.app.bench.measure`); the figures are ratios of medians within this run (never compare
  absolute times across runs);
- memory: resident bytes of the lowered decoder linears, and checkpoint bytes of their weights
  (:func:`masq_fx.checkpoint.linear_bytes`; 4-bit codes packed two per byte) against FP32;
- ``--rotation``: a W4A8 graph with :class:`~masq_fx.transforms.rotation.RotationConfig` too (fused rotations
  are only other weights; the online down_proj Hadamard and the entry rotation run in the compiled graph);
- sanity: perplexity of the FP32, reference fake-quant and lowered prefill graphs on 2 evaluation
  windows, and the first 16 greedy tokens of 3 prompts through the (eager) generation graphs.

Run: ``.venv/bin/python benchmarks/smollm2_speed.py`` (15-30 minutes on 2 cores, mostly compiling).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from masq_fx.api import apply, calibrate
from masq_fx.app.bench import BenchConfig, latency_table, measure, resident_linear_bytes
from masq_fx.backends import INDUCTOR_OPTIONS, lower_to_torchao
from masq_fx.builtin.smollm2 import load_smollm2
from masq_fx.capture.decoder import CapturedDecoder
from masq_fx.checkpoint import LinearBytes, linear_bytes
from masq_fx.data.text import token_windows
from masq_fx.eval.perplexity import perplexity
from masq_fx.generation import capture_cached, generate, transplant
from masq_fx.models import adapter_for
from masq_fx.recipes import preset
from masq_fx.transforms.rotation import RotationConfig

PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Give three tips for staying healthy.",
)
DECODE_SLOTS = 128
GREEDY_TOKENS = 16


def chat_prompts(tokenizer) -> dict[str, Tensor]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in PROMPTS]
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=("rtn", "smoothquant", "mas-init"), default="mas-init")
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rotation", action="store_true", help="also W4A8 with RotationConfig() (its online down_proj Hadamard runs in the graph)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_smollm2()
    adapter = adapter_for(model)
    calibration = token_windows(tokenizer, "calibration", 256, 4)
    evaluation = token_windows(tokenizer, "evaluation", args.tokens, 2)
    batches = [{"input_ids": r[None], "attention_mask": torch.ones_like(r[None])} for r in calibration]
    calibrated = calibrate(model, batches, progress=False)
    fp = calibrated.captured

    prefill_graphs: dict[str, CapturedDecoder] = {"fp32": fp}
    ppl = {"fp32": perplexity(fp, adapter, evaluation)}
    memory: dict[str, tuple[int, int]] = {}
    stored: dict[str, LinearBytes] = {}
    variants = [("w8a8", 8, None), ("w4a8", 4, None)] + [("w4a8+rot", 4, RotationConfig())] * args.rotation
    for name, bits, rotation in variants:
        recipe = replace(preset(args.recipe, bits, 8), rotation=rotation)
        if args.recipe != "rtn":  # down_proj too: without it padded prompts derail (tests/test_smollm2_quantize.py)
            recipe = replace(recipe, smoothing=replace(recipe.smoothing, kinds=("norm", "attention", "activation")))
        quantized = apply(calibrated, recipe, progress=False)
        reference = quantized.decoder
        with tempfile.TemporaryDirectory() as folder:
            stored[name] = linear_bytes(quantized.save(Path(folder) / name), bits)
        lowered = reference.copy()  # lower_to_torchao rewrites a graph in place: the reference stays for perplexity
        report = lower_to_torchao(lowered)
        ppl[f"{name} reference"] = perplexity(reference, adapter, evaluation)
        ppl[f"{name} lowered"] = perplexity(lowered, adapter, evaluation)
        memory[name] = resident_linear_bytes(lowered.graph_module)
        print(f"{name}: {report}")
        prefill_graphs[name] = lowered

    config = BenchConfig(prompt_tokens=args.tokens, decode_slots=DECODE_SLOTS, warmup=2, runs=args.runs, threads=args.threads)
    cached = {}
    for name, graph in prefill_graphs.items():
        cached[name] = capture_cached(model, batch_size=1, max_cache_len=config.cache_len)
        if name != "fp32":
            transplant(graph, cached[name])
    ids = evaluation[:1]
    prompt = adapter.decoder_inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    measured = measure(cached, prompt, config)

    chats = chat_prompts(tokenizer)
    greedy = {}
    for name in ("fp32", "w8a8", "w4a8"):
        batch_graph = capture_cached(model, batch_size=len(PROMPTS), max_cache_len=chats["input_ids"].shape[1] + GREEDY_TOKENS)
        if name != "fp32":
            transplant(prefill_graphs[name], batch_graph)
        greedy[name] = generate(batch_graph, adapter.decoder_inputs(chats), GREEDY_TOKENS)  # eager: compiling costs minutes

    print()
    print(f"SmolLM2-135M-Instruct, recipe {args.recipe}, {args.threads} threads, {args.runs} interleaved runs after 2 warm-ups")
    print(f"inductor options {INDUCTOR_OPTIONS}; compile + first prefill/decode of 3 graphs: {measured.compile_seconds:.0f} s")
    print("int8 GEMMs rewritten to oneDNN qlinear by inductor (prefill + decode graphs): "
          + ", ".join(f"{name} {t.fused_qlinear}" for name, t in measured.timings.items() if name != "fp32") + " (of 2 x 210)")
    print(latency_table(measured.timings, args.tokens))
    print()
    for name, (held, fp32_bytes) in memory.items():
        print(f"{name}: decoder linear weights resident {held / 2**20:.1f} MiB = {held / fp32_bytes:.3f}x of FP32 {fp32_bytes / 2**20:.1f} MiB; "
              f"in the checkpoint {stored[name].weight_bytes / 2**20:.1f} MiB = {stored[name].weight_ratio:.4f}x "
              f"({stored[name].total_ratio:.4f}x with smoothing tables)")
    print(f"perplexity on 2 x {args.tokens} evaluation tokens: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    for name in ("w8a8", "w4a8"):
        same = [bool(torch.equal(greedy[name][i], greedy["fp32"][i])) for i in range(len(PROMPTS))]
        print(f"first {GREEDY_TOKENS} greedy tokens equal to FP32 ({name}): {sum(same)}/{len(PROMPTS)} prompts")
    for i, text in enumerate(PROMPTS):
        print(f"  {text!r}\n    fp32: {tokenizer.decode(greedy['fp32'][i])!r}\n    w8a8: {tokenizer.decode(greedy['w8a8'][i])!r}")


if __name__ == "__main__":
    main()
