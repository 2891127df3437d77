"""Data-parallel calibration: 1 process × T threads against N processes × T/N threads (torchrun, gloo or NCCL).

SmolLM2-135M-Instruct (real weights) quantized with ``masquant-w4a8`` (rotation, MAS learning with clipping,
GPTQ, CMC) on ``--samples`` calibration windows of ``--tokens`` tokens. MAS learning averages the gradients of
``--step-samples`` samples per step in every configuration (one per rank with 2 ranks and the default 2), so
all configurations do the same math and their perplexities agree within float rounding. Each configuration
runs in fresh processes (``python -m torch.distributed.run --standalone --nproc-per-node N`` for N > 1) and
prints, from rank 0: the wall time of ``apply_all`` (the layer-by-layer quantization), the time this rank spent
in collectives (waiting for the slowest rank included) and the bytes it reduced, and the perplexity of the
result on ``--windows`` × 512 evaluation tokens. Ratios are against the single process of the same run.

On a machine with several GPUs, ``--device cuda`` runs the same with NCCL, one GPU per rank.

Run: ``.venv/bin/python benchmarks/distributed.py`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from dataclasses import replace

import torch


def run_rank(args: argparse.Namespace) -> None:
    """One rank (or the single process): quantize, and print a JSON row from rank 0."""
    from masq_fx import distributed
    from masq_fx.api import apply_all, calibrate
    from masq_fx.builtin.smollm2 import load_smollm2
    from masq_fx.data.text import token_windows
    from masq_fx.eval.perplexity import perplexity
    from masq_fx.models import adapter_for
    from masq_fx.recipes import PRESETS

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if distributed.launched():
        device = distributed.local_device(device)
        distributed.join(device)
    try:
        model, tokenizer = load_smollm2(torch.float32)
        windows = token_windows(tokenizer, "calibration", window=args.tokens, count=args.samples)
        batches = [{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in windows]
        recipe = PRESETS["masquant-w4a8"]
        recipe = replace(recipe, learning=replace(recipe.learning, epochs=args.epochs, step_samples=args.step_samples))
        calibrated = calibrate(model, batches, [recipe], progress=False, device=device)
        began = time.perf_counter()
        (quantized,) = apply_all(calibrated, [recipe], progress=False)
        seconds = time.perf_counter() - began
        if distributed.is_leader():
            evaluation = token_windows(tokenizer, "evaluation", window=512, count=args.windows)
            ppl = perplexity(quantized.decoder, adapter_for(model), evaluation.to(device))
            row = {"apply_s": seconds, "comm_s": distributed.traffic.seconds, "comm_mb": distributed.traffic.bytes / 2**20, "ppl": ppl}
            print("ROW " + json.dumps(row), flush=True)
    finally:
        distributed.leave()


def launch(args: argparse.Namespace, processes: int) -> dict:
    """Run one configuration in fresh processes; rank 0's row."""
    own = [
        "--rank-run", "--threads", str(max(1, args.total_threads // processes)), "--samples", str(args.samples),
        "--tokens", str(args.tokens), "--epochs", str(args.epochs), "--step-samples", str(args.step_samples),
        "--windows", str(args.windows), "--device", args.device,
    ]
    if processes == 1:
        command = [sys.executable, __file__, *own]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", __file__, *own]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    row = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("ROW ")).removeprefix("ROW "))
    return row | {"wall_s": time.perf_counter() - began}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts to compare")
    parser.add_argument("--total-threads", type=int, default=2, help="threads of the whole machine, split over the processes")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--step-samples", type=int, default=2, help="samples per MAS step (a multiple of every process count)")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_run:
        run_rank(args)
        return
    counts = [int(p) for p in args.processes.split(",")]
    print(
        f"SmolLM2-135M masquant-w4a8, {args.samples} × {args.tokens} calibration tokens, {args.epochs} MAS epochs, "
        f"{args.step_samples} samples per MAS step, {args.total_threads} threads in all, device {args.device}"
    )
    rows = {n: launch(args, n) for n in counts}
    base = rows[counts[0]]["apply_s"]
    print(f"{'processes × threads':<22}{'apply s':>10}{'speed-up':>10}{'in collectives s':>18}{'reduced MiB':>13}{'process wall s':>16}{'perplexity':>12}")
    for n, row in rows.items():
        label = f"{n} × {max(1, args.total_threads // n)}"
        print(
            f"{label:<22}{row['apply_s']:>10.1f}{base / row['apply_s']:>9.2f}×{row['comm_s']:>18.1f}{row['comm_mb']:>13.1f}"
            f"{row['wall_s']:>16.1f}{row['ppl']:>12.3f}"
        )


if __name__ == "__main__":
    main()
