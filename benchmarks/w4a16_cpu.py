"""W4A16 on PyTorch's int4 weight-only CPU kernel: SmolLM2-135M prefill and decode speed against FP32 and W8A8.

Protocol:
- model: the real SmolLM2-135M-Instruct weights. Quantized graphs: ``preset(--recipe, 8, 8)`` lowered
  to torchao int8 (W8A8) and ``preset(--recipe, 4, 16)`` (symmetric, groups of 64) on the reference
  (fake-quant) path and lowered to the int4 CPU kernel (:mod:`masq_fx.backends.int4_cpu`, bfloat16
  activations in the kernel), calibrated on 2 windows of 128 tokens; ``lm_head`` stays float everywhere;
- every graph is the generation graph (:func:`masq_fx.generation.capture_cached`, batch 1, a static KV
  cache of ``--tokens`` + 64 slots) with the quantized modules transplanted, compiled by
  :func:`masq_fx.backends.compile_graph`; prefill: one ``--tokens``-token evaluation window at slot 0;
  decode: one text token at slot ``--tokens``;
- ``--threads`` threads, 2 warm-up rounds, then ``--runs`` rounds in which the graphs alternate
  (:func:`masq_fx.app.bench.interleaved_medians`, prefill rounds first); the figures are ratios of medians
  within this run;
- sanity: perplexity of FP32 and both W4A16 graphs (eager) on one evaluation window, and how far the
  kernel's logits are from the reference's against how far the reference's are from FP32;
- the kernel alone: one 576 → 1536 linear (SmolLM2's up_proj), 1 and ``--tokens`` rows, float32 GEMM
  against the int4 kernel with bfloat16 and with float32 activations (the latter a scalar loop).

Run: ``.venv/bin/python benchmarks/w4a16_cpu.py``. Compiling is most of the time (two compilations, prefill and
decode, per graph): 11 to 20 minutes in all on a shared 2-core machine, 2 to 5 minutes per graph;
``--skip-reference`` leaves out the reference graph's.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from masq_fx.api import apply, calibrate
from masq_fx.app.bench import BenchConfig, GraphTiming, interleaved_medians, intra_op_threads, latency_table, step_inputs
from masq_fx.backends import INDUCTOR_OPTIONS, Int4CpuLinear, Int8QuantLinear, compile_graph, lower_to_torchao
from masq_fx.builtin.smollm2 import load_smollm2
from masq_fx.capture.decoder import CapturedDecoder
from masq_fx.data.text import token_windows
from masq_fx.eval.perplexity import perplexity
from masq_fx.generation import capture_cached, transplant
from masq_fx.models import adapter_for
from masq_fx.recipes import preset

DECODE_SLOTS = 64


def kernel_times(tokens: int, runs: int) -> str:
    """Median microseconds of one up_proj-shaped linear: float32 GEMM vs the int4 kernel in bfloat16 and float32."""
    gen = torch.Generator().manual_seed(0)
    n, k, group = 1536, 576, 64
    weight = torch.randn(n, k, generator=gen)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen), 1)
    table = torch.rand(k // group, n, 2, generator=gen)
    lines = [f"{'rows':>5} {'fp32 GEMM us':>13} {'int4 bf16 us':>13} {'int4 fp32 us':>13}"]
    for rows in (1, tokens):
        x = torch.randn(rows, k, generator=gen)
        xb, tb = x.bfloat16(), table.bfloat16()
        int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        calls: dict[str, Callable[[], object]] = {
            "fp32": functools.partial(F.linear, x, weight),
            "bf16": functools.partial(int4_mm, xb, packed, group, tb),
            "int4 fp32": functools.partial(int4_mm, x, packed, group, table),
        }
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(runs if rows == 1 else max(3, runs // 5)):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
        med = {name: 1e6 * statistics.median(t) for name, t in times.items()}
        lines.append(f"{rows:>5} {med['fp32']:>13.1f} {med['bf16']:>13.1f} {med['int4 fp32']:>13.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=("rtn", "mas-init"), default="rtn")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-reference", action="store_true", help="do not compile and time the W4A16 reference graph (a quarter of the compiling)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    model, tokenizer = load_smollm2()
    adapter = adapter_for(model)
    calibration = token_windows(tokenizer, "calibration", 128, 2)
    evaluation = token_windows(tokenizer, "evaluation", args.tokens, 1)
    batches = [{"input_ids": r[None], "attention_mask": torch.ones_like(r[None])} for r in calibration]
    calibrated = calibrate(model, batches, progress=False)

    w8a8 = apply(calibrated, preset(args.recipe, 8, 8), progress=False).decoder
    w4a16 = apply(calibrated, preset(args.recipe, 4, 16), progress=False).decoder
    int4 = w4a16.copy()  # lower_to_torchao rewrites in place: the reference stays
    int8_report, int4_report = lower_to_torchao(w8a8), lower_to_torchao(int4)
    if int8_report.unlowered or int4_report.unlowered:
        raise SystemExit(f"every decoder linear must be lowered:\n{int8_report}\n{int4_report}")
    assert sum(isinstance(m, Int8QuantLinear) for m in w8a8.graph_module.modules()) == len(int8_report.lowered)
    assert sum(isinstance(m, Int4CpuLinear) for m in int4.graph_module.modules()) == len(int4_report.int4)
    graphs: dict[str, CapturedDecoder | None] = {"fp32": None, "w8a8 int8": w8a8, "w4a16 ref": w4a16, "w4a16 int4": int4}
    timed = [name for name in graphs if not (args.skip_reference and name == "w4a16 ref")]

    with torch.no_grad():
        ppl = {name: perplexity(calibrated.captured if g is None else g, adapter, evaluation) for name, g in graphs.items() if name != "w8a8 int8"}
        inputs = adapter.decoder_inputs({"input_ids": evaluation[:1], "attention_mask": torch.ones_like(evaluation[:1])})
        fp, ref, kernel = calibrated.captured(inputs), w4a16(inputs), int4(inputs)
    deviation = float((kernel - ref).norm() / (ref - fp).norm())

    config = BenchConfig(prompt_tokens=args.tokens, decode_slots=DECODE_SLOTS, warmup=2, runs=args.runs, threads=args.threads)
    cached = {}
    for name in timed:
        cached[name] = capture_cached(model, batch_size=1, max_cache_len=config.cache_len)
        graph = graphs[name]
        if graph is not None:
            transplant(graph, cached[name])
    prefill, decode = step_inputs(inputs, config.cache_len)
    compile_seconds: dict[str, float] = {}
    with intra_op_threads(args.threads):
        compiled = {}
        for name, generation in cached.items():  # compiled at the first prefill and the first decode call
            start = time.perf_counter()
            compiled[name] = compile_graph(generation.graph_module)
            compiled[name](*prefill)
            compiled[name](*decode)
            compile_seconds[name] = time.perf_counter() - start
        medians = {
            phase: interleaved_medians({n: functools.partial(fn, *step) for n, fn in compiled.items()}, args.runs, 2, phase, progress=False)
            for phase, step in (("prefill", prefill), ("decode", decode))
        }
    timings = {name: GraphTiming(medians["prefill"][name], medians["decode"][name], 0) for name in cached}
    held = {m.name: m.weight_bytes for m in int4.graph_module.modules() if isinstance(m, Int4CpuLinear)}
    fp32_bytes = sum(4 * m.in_features * m.out_features for m in int4.graph_module.modules() if isinstance(m, Int4CpuLinear))

    print()
    print(
        f"SmolLM2-135M-Instruct, recipe {args.recipe}, torch {torch.__version__}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, {args.runs} interleaved runs after 2 warm-ups"
    )
    print(f"{len(int8_report.lowered)} linears on torchao int8 (w8a8), {len(int4_report.int4)} on the int4 CPU kernel (w4a16, bfloat16 activations)")
    print(f"inductor options {INDUCTOR_OPTIONS}; compile + first prefill/decode: " + ", ".join(f"{n} {t:.0f} s" for n, t in compile_seconds.items()))
    print(latency_table(timings, args.tokens))
    print(
        f"w4a16 int4 decoder linear weights resident {sum(held.values()) / 2**20:.1f} MiB = {sum(held.values()) / fp32_bytes:.3f}x "
        f"of FP32 {fp32_bytes / 2**20:.1f} MiB"
    )
    print(f"perplexity on 1 x {args.tokens} evaluation tokens (eager): " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    print(f"|logits(int4) - logits(ref)| / |logits(ref) - logits(fp32)| = {deviation:.4f}")
    print()
    print(f"the kernel alone, one 576 -> 1536 linear (group 64), medians of interleaved calls, {args.threads} threads:")
    print(kernel_times(args.tokens, 50))
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
