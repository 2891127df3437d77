"""masq_fx's exportable gated delta rule (Qwen3.5's linear attention: chunks solved in parallel, a scan across them)
against HF's chunked reference kernel, at the widths of ``Qwen3_5TextConfig()``'s defaults (16 key heads, 32 value
heads, 128 wide).

For each call length, one fresh process per kernel runs it on random inputs (batch 1, log decays of a trained
model's order) and prints the median time over ``--runs``, the growth of the peak RSS, and the largest output
difference from HF's chunked kernel (chunks of 64, the reference the captured graph replaces). Both grow linearly
with the tokens; HF's loops over chunks in Python, which torch.export cannot capture with a dynamic length.

Run: ``.venv/bin/python benchmarks/gated_delta_rule.py [--tokens 256 1024 2048 4096] [--runs 5] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch

KERNELS = ("masq_fx", "hf-chunked")


def _inputs(tokens: int) -> tuple[torch.Tensor, ...]:
    from transformers import Qwen3_5TextConfig

    config = Qwen3_5TextConfig()
    keys, values = config.linear_num_key_heads, config.linear_num_value_heads
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, tokens, keys, config.linear_key_head_dim, generator=gen)
    k = torch.randn(1, tokens, keys, config.linear_key_head_dim, generator=gen)
    v = torch.randn(1, tokens, values, config.linear_value_head_dim, generator=gen)
    decay = -torch.rand(1, tokens, values, generator=gen) * 0.1
    beta = torch.rand(1, tokens, values, generator=gen)
    state = torch.zeros(1, values, config.linear_key_head_dim, config.linear_value_head_dim)
    return q, k, v, decay, beta, state


def one(kernel: str, tokens: int, runs: int, threads: int) -> None:
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    from masq_fx.models.linear_attention import gated_delta_rule

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    q, k, v, decay, beta, state = _inputs(tokens)

    def run() -> torch.Tensor:
        if kernel == "masq_fx":
            return gated_delta_rule(q, k, v, decay, beta, state)[0]
        out, _ = torch_chunk_gated_delta_rule(q, k, v, g=decay, beta=beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
        return out

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    with torch.no_grad():
        for _ in range(runs):
            start = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - start)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        reference = torch_chunk_gated_delta_rule(q, k, v, g=decay, beta=beta, initial_state=state, use_qk_l2norm_in_kernel=True)[0]
    print(json.dumps({"ms": 1000 * statistics.median(times), "peak": peak, "diff": float((out - reference).abs().max())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("KERNEL", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one[0], int(args.one[1]), args.runs, args.threads)
        return
    print(f"gated delta rule, Qwen3_5TextConfig() widths, batch 1, {args.threads} threads, median of {args.runs} runs")
    print(f"{'tokens':>7}{'kernel':>12}{'ms':>10}{'peak MiB':>10}{'max diff':>10}{'vs chunked':>12}")
    for tokens in args.tokens:
        results = {}
        for kernel in KERNELS:
            command = [sys.executable, __file__, "--one", kernel, str(tokens), "--runs", str(args.runs), "--threads", str(args.threads)]
            results[kernel] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        for kernel, r in results.items():
            ratio = results["hf-chunked"]["ms"] / r["ms"]
            print(f"{tokens:>7}{kernel:>12}{r['ms']:>10.1f}{r['peak'] / 2**20:>10.0f}{r['diff']:>10.1e}{ratio:>11.2f}x")


if __name__ == "__main__":
    main()
