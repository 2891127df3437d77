"""FP accuracy of the built-in trimodal model per modality, and its text perplexity, on the evaluation split.

Everything runs through the *captured* decoder graph (``masq_fx.capture.decoder.capture``), as a quantized
graph would: the towers run eagerly via the adapter's ``decoder_inputs``, greedy decoding re-runs the
prefix per token. Vision: held-out numbers; audio: unseen espeak-ng voices (exact match of the
reply). Text: perplexity on 512-token windows of the evaluation split of the Python reference
(``masq_fx.data.text``); the language model is SmolLM2 unchanged.

Run: ``.venv/bin/python benchmarks/trimodal_fp.py`` (about 3-6 minutes on 2 shared cores)
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from masq_fx.builtin.trimodal import accuracy, load_set, load_trimodal, text_perplexity
from masq_fx.capture.decoder import capture
from masq_fx.models import adapter_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=128, help="evaluation items per modality (at most 128)")
    parser.add_argument("--windows", type=int, default=8, help="512-token perplexity windows")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    model, processor = load_trimodal()
    adapter = adapter_for(model)
    captured = capture(model)
    evaluation = load_set("evaluation")
    print(f"model: {type(model).__name__} (SmolLM2-135M-Instruct + trained towers), adapter {adapter.family}")
    print(f"captured decoder in {captured.capture_seconds:.1f} s\n")
    print(f"{'modality':10s} {'accuracy':>22s} {'seconds':>8s}")
    for modality in ("vision", "audio"):
        start = time.perf_counter()
        acc = accuracy(captured, adapter, processor, evaluation.samples(modality, args.items))
        print(f"{modality:10s} {str(acc):>22s} {time.perf_counter() - start:8.1f}")
    start = time.perf_counter()
    ppl = text_perplexity(captured, adapter, processor, window=512, count=args.windows)
    print(f"{'text ppl':10s} {ppl:22.2f} {time.perf_counter() - start:8.1f}")


if __name__ == "__main__":
    main()
