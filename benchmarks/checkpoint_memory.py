"""Memory a checkpoint's save and load add on top of the quantized model, streamed against held in memory.

A random Llama decoder with Qwen2.5-VL-3B's widths (hidden 2048, MLP 11008, 16 heads, 2 KV heads; ``--layers``
layers, a 1024-token vocabulary) is quantized with ``--recipe``; then, in the same fresh process, one way of
writing (or reading) its tensor file runs while a thread samples the resident memory every millisecond. The
table prints the peak growth over the resident memory just before, next to the size of the tensor file:

* save, streamed: masq_fx's writer, one tensor at a time (:func:`masq_fx.files.write_safetensors`);
* save, in memory: the previous way: every stored tensor copied, the file built as one ``bytes`` object
  (``safetensors.torch.save``), then written;
* load, mapped: ``safetensors.torch.load_file`` (what ``masq_fx.load`` reads a tensor file with);
* load, read: the previous way: the file read into ``bytes``, then ``safetensors.torch.load``.

Both loads then read a byte of every page of every tensor, as installing them in the graph does.

Run: ``.venv/bin/python benchmarks/checkpoint_memory.py [--layers 4] [--recipe rtn-w8a8]``
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

MODES = ("save, streamed", "save, in memory", "load, mapped", "load, read")
PAGE = 4096


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def _peak_growth(run: Callable[[], object]) -> int:
    """The highest resident memory while ``run()`` runs, less the resident memory before it."""
    before, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss()) - before


def one(mode: str, layers: int, recipe_name: str) -> None:
    import safetensors.torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from masq_fx.api import quantize
    from masq_fx.checkpoint import _collect
    from masq_fx.files import write_safetensors
    from masq_fx.recipes import PRESETS

    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2, num_hidden_layers=layers, vocab_size=1024
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 1024, (1, 64))
    quantized = quantize(model, PRESETS[recipe_name], [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], progress=False)
    folder = Path(tempfile.mkdtemp())
    path = folder / "quantized.safetensors"
    write_safetensors(path, _collect(quantized.decoder.graph_module, model).tensors)
    size = path.stat().st_size

    def save_streamed() -> None:
        write_safetensors(folder / "streamed.safetensors", _collect(quantized.decoder.graph_module, model).tensors)

    def save_in_memory() -> None:
        tensors = {name: t.clone() for name, t in _collect(quantized.decoder.graph_module, model).tensors.items()}
        (folder / "in_memory.safetensors").write_bytes(safetensors.torch.save(tensors))

    loaded: list[dict[str, torch.Tensor]] = []

    def touched(tensors: dict[str, torch.Tensor]) -> None:
        """Keep ``tensors`` and read a byte of each of their pages, as installing them in the graph does."""
        loaded.append(tensors)
        for tensor in tensors.values():
            if tensor.numel():
                int(tensor.reshape(-1).view(torch.uint8)[::PAGE].sum())

    runs = {
        "save, streamed": save_streamed,
        "save, in memory": save_in_memory,
        "load, mapped": lambda: touched(safetensors.torch.load_file(str(path))),
        "load, read": lambda: touched(safetensors.torch.load(path.read_bytes())),
    }
    growth = _peak_growth(runs[mode])
    mib = 1 << 20
    print(f"| {mode} | {layers} | {recipe_name} | {size / mib:.0f} | {growth / mib:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--recipe", default="rtn-w8a8")
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one, args.layers, args.recipe)
        return
    print("| way | layers | recipe | tensor file (MiB) | peak growth (MiB) |\n|---|---|---|---|---|", flush=True)
    for mode in MODES:
        subprocess.run([sys.executable, __file__, "--one", mode, "--layers", str(args.layers), "--recipe", args.recipe], check=True)


if __name__ == "__main__":
    main()
