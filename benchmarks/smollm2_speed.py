"""512-token prefill speed of SmolLM2-135M: W8A8 lowered to torchao int8 kernels vs FP32, both compiled.

Protocol:
- model: the real SmolLM2-135M-Instruct weights, decoder captured with torch.export;
- quantized: ``preset(--recipe, 8, 8)`` (SmoothQuant α=0.5 tied and folded into the norms by default,
  or RTN) calibrated on 4 windows of 256 tokens of the calibration split, then
  :func:`masq_fx.backends.lower_to_torchao` (every decoder linear on torchao int8 kernels;
  ``lm_head`` stays float in both graphs);
- both graphs compiled by :func:`masq_fx.backends.compile_graph` (``fullgraph=True``, the same inductor
  options), 2 threads, warm-up, then ``--runs`` interleaved prefills of one 512-token window;
  the figure is the ratio of medians (never compare absolute times across runs);
- sanity: perplexity of FP32, the reference fake-quant graph and the lowered graph on 2 evaluation
  windows of 512 tokens, and the compiled-vs-eager logit difference of each graph.

``lm_head`` (49152 × 576, float in both graphs) is about a fifth of the FP32 FLOPs of a full-sequence
prefill. On a machine shared with other jobs, 2 threads can be slower than 1 (``--threads``); the
ratio of minima is then the steadier figure.

Run: ``.venv/bin/python benchmarks/smollm2_speed.py`` (10-25 minutes on 2 busy cores, mostly compiling).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch._dynamo.utils import counters

from masq_fx.backends import INDUCTOR_OPTIONS, compile_graph, lower_to_torchao
from masq_fx.calibration import observe
from masq_fx.capture import capture
from masq_fx.data.text import token_windows
from masq_fx.eval.perplexity import perplexity
from masq_fx.models import adapter_for
from masq_fx.pipeline import Context, Pipeline
from masq_fx.pretrained import load_smollm2
from masq_fx.recipes import preset, recipe_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=("smoothquant", "rtn"), default="smoothquant")
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_smollm2()
    adapter = adapter_for(model)
    calibration = token_windows(tokenizer, "calibration", 256, 4)
    evaluation = token_windows(tokenizer, "evaluation", args.tokens, 2)
    samples = [adapter.decoder_inputs({"input_ids": r[None], "attention_mask": torch.ones_like(r[None])}) for r in calibration]

    fp = capture(model)
    stats = observe(Context(fp, samples), progress=False).stats
    reference = copy.deepcopy(fp)
    Pipeline(recipe_steps(preset(args.recipe, 8, 8), progress=False)).run(
        Context(reference, samples, stats=stats, provided={"stats"}), progress=False
    )
    lowered = copy.deepcopy(reference)
    report = lower_to_torchao(lowered)
    print(report)

    ppl = {name: perplexity(graph, adapter, evaluation) for name, graph in (("fp32", fp), ("reference", reference), ("lowered", lowered))}

    ids = evaluation[:1]
    inputs = adapter.decoder_inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)}).args()
    compiled = {"fp32": compile_graph(fp), "int8": compile_graph(lowered)}
    start = time.perf_counter()
    # FX graph cache off for the compiling calls: a cache hit skips the passes the counter counts
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        outputs = {name: fn(*inputs) for name, fn in compiled.items()}
    compile_s = time.perf_counter() - start
    with torch.no_grad():
        logits = {name: graph.graph_module(*inputs) for name, graph in (("fp32", fp), ("reference", reference), ("int8", lowered))}
    drift = {name: _relative(outputs[name], logits[name]) for name in compiled}
    for _ in range(2):
        for fn in compiled.values():
            fn(*inputs)

    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(args.runs):
        for name, fn in compiled.items():
            start = time.perf_counter()
            fn(*inputs)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}

    print()
    print(f"SmolLM2-135M-Instruct, {args.tokens}-token prefill, W8A8 {args.recipe} on torchao int8, {args.threads} threads")
    print(f"inductor options {INDUCTOR_OPTIONS}; compile + first calls {compile_s:.0f} s; "
          f"int8 GEMMs rewritten to oneDNN qlinear: {counters['inductor']['qlinear_weight_prepack_matcher_count']} "
          f"of {len(report.lowered)} lowered linears")
    print(f"{'graph':<8} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'compiled vs eager (rel. RMS)':>29}")
    for name, t in times.items():
        print(f"{name:<8} {1e3 * median[name]:>10.1f} {1e3 * min(t):>8.1f} {1e3 * max(t):>8.1f} {drift[name]:>29.2e}")
    print(f"speed-up fp32 / int8 over {args.runs} interleaved runs: ratio of medians {median['fp32'] / median['int8']:.2f}x, "
          f"ratio of minima {min(times['fp32']) / min(times['int8']):.2f}x")
    print(f"perplexity on 2 x {args.tokens} evaluation tokens (eager graphs): fp32 {ppl['fp32']:.3f}, "
          f"reference W8A8 {ppl['reference']:.3f}, lowered W8A8 {ppl['lowered']:.3f}")
    print(f"relative RMS logit differences: lowered vs reference {_relative(logits['int8'], logits['reference']):.2e}, "
          f"reference vs fp32 {_relative(logits['reference'], logits['fp32']):.2e}")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return float((a - b).norm() / b.norm())


if __name__ == "__main__":
    main()
