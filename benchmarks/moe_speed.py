"""Prefill and decode speed of a mixture-of-experts decoder on torchao int8 kernels (W8A8) vs FP32, all compiled.

Protocol:
- model: ``Qwen3MoeForCausalLM`` with the published Qwen3-30B-A3B text configuration (hidden 2048, 32 query /
  4 KV heads of 128, 128 experts of width 768, top 8, vocabulary 151,936) and random weights, cut to
  ``--layers`` decoder layers (the time per layer is what matters; 48 in the real model), float32;
- the experts are unfused into per-expert linears (``masq_fx.models.experts``): both graphs loop over all
  experts and run each on the tokens routed to it (a data-dependent row count, padded for the int8 GEMM where
  few); the router stays float;
- W8A8: ``smoothquant-w8a8`` calibrated on 4 random 256-token rows, lowered to torchao int8 kernels;
- every graph is the generation graph (batch 1, a static KV cache of ``--tokens`` + 128 slots) compiled by
  :func:`masq_fx.backends.compile_graph`; prefill: ``--tokens`` random tokens; decode: one token;
- ``--threads`` threads, two warm-up calls, then ``--runs`` interleaved calls of both graphs; ratios of medians;
- sanity: the relative error of the lowered graph's prefill logits against FP32, and the experts that the
  calibration tokens reached.

Run: ``.venv/bin/python benchmarks/moe_speed.py`` (about 10 minutes on 2 cores, mostly compiling).
"""

from __future__ import annotations

import argparse

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from masq_fx.api import quantize
from masq_fx.app.bench import BenchConfig, latency_table, measure
from masq_fx.calibration.coverage import expert_coverage
from masq_fx.generation import capture_cached, transplant
from masq_fx.models import adapter_for

#: Qwen3-30B-A3B's published text configuration (config.json of Qwen/Qwen3-30B-A3B)
QWEN3_30B_A3B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    rms_norm_eps=1e-6,
    max_position_embeddings=40960,
    tie_word_embeddings=False,
)
DECODE_SLOTS = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--experts", type=int, default=QWEN3_30B_A3B["num_experts"], help="fewer to compile faster (top 8 stays)")
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = Qwen3MoeConfig(**{**QWEN3_30B_A3B, "num_experts": args.experts, "num_hidden_layers": args.layers})
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).eval()
    adapter = adapter_for(model)
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, config.vocab_size, (1, 256), generator=gen)} for _ in range(4)]
    for batch in batches:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    quantized = quantize(model, "smoothquant-w8a8", batches)
    report = quantized.lower()
    assert quantized.context is not None
    coverage = expert_coverage(quantized.decoder.sites, quantized.context.stats, quantized.decoder.modalities)

    bench = BenchConfig(prompt_tokens=args.tokens, decode_slots=DECODE_SLOTS, warmup=2, runs=args.runs, threads=args.threads)
    graphs = {"fp32": capture_cached(model, batch_size=1, max_cache_len=bench.cache_len)}
    graphs["w8a8"] = capture_cached(model, batch_size=1, max_cache_len=bench.cache_len)
    transplant(quantized.decoder, graphs["w8a8"])
    ids = torch.randint(0, config.vocab_size, (1, args.tokens), generator=gen)
    prompt = adapter.decoder_inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    with torch.no_grad():
        fp_logits = model(input_ids=ids).logits
    error = float((quantized.logits({"input_ids": ids}) - fp_logits).norm() / fp_logits.norm())
    measured = measure(graphs, prompt, bench)

    print()
    print(
        f"Qwen3-30B-A3B widths, {args.layers} layer(s), {args.experts} experts (top {config.num_experts_per_tok}), random weights, "
        f"{args.threads} threads, {args.runs} interleaved runs after 2 warm-ups"
    )
    print(f"lowering: {report}; compile + first prefill/decode: {measured.compile_seconds:.0f} s")
    print(latency_table(measured.timings, args.tokens))
    print(f"W8A8 prefill logits vs FP32: relative error {error:.4f}")
    for row in coverage:
        print(f"layer {row.layer}: {row.experts - row.unseen} of {row.experts} experts received calibration tokens")


if __name__ == "__main__":
    main()
