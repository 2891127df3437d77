"""Capture time and peak memory of SmolLM2-135M-Instruct's decoder (real weights).

Run: ``.venv/bin/python benchmarks/capture_smollm2.py``. Prints one table: model load time,
torch.export capture time, resident memory before/after (peak RSS of this process), number of
graph nodes and linears, and the max |logit difference| between graph and eager model on 256
tokens of the evaluation text.
"""

from __future__ import annotations

import resource
import time

import torch

from masq_fx.builtin.smollm2 import load_smollm2
from masq_fx.capture.decoder import capture
from masq_fx.data.text import token_windows
from masq_fx.models import adapter_for


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    torch.set_num_threads(2)
    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    load_s = time.perf_counter() - start
    rss_loaded = _peak_rss_mib()
    captured = capture(model)
    rss_captured = _peak_rss_mib()
    ids = token_windows(tokenizer, "evaluation", window=256, count=1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        diff = (captured(adapter_for(model).decoder_inputs(batch)) - model(**batch).logits).abs().max().item()
    rows = [
        ("model load (GGUF → float Llama)", f"{load_s:.1f} s"),
        ("capture (torch.export, dynamic batch/seq)", f"{captured.capture_seconds:.1f} s"),
        ("peak RSS after load", f"{rss_loaded:.0f} MiB"),
        ("peak RSS after capture", f"{rss_captured:.0f} MiB"),
        ("graph nodes", str(len(captured.graph_module.graph.nodes))),
        ("decoder linears", str(len(captured.decoder_linears()))),
        ("max |graph − eager| logits, 256 tokens", f"{diff:.2e}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'SmolLM2-135M capture':<{width}}  value")
    print(f"{'-' * width}  -----")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
