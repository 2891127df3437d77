"""``masq-fx inspect``: the per-modality activation report of a model, on built-in or local models."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from masq_fx.calibration import observe
from masq_fx.capture import capture
from masq_fx.data.text import token_windows
from masq_fx.models import DecoderInputs, adapter_for
from masq_fx.pipeline import Context
from masq_fx.report import activation_report, format_report

TINY_PREFIX = "tiny:"


def _text_samples(model: nn.Module, tokenizer, samples: int, seq_len: int) -> list[DecoderInputs]:
    adapter = adapter_for(model)
    windows = token_windows(tokenizer, "calibration", window=seq_len, count=samples)
    return [
        adapter.decoder_inputs({"input_ids": row[None], "attention_mask": torch.ones_like(row[None])})
        for row in windows
    ]


def load_for_inspection(name: str, samples: int, seq_len: int) -> tuple[nn.Module, list[DecoderInputs], str]:
    """(model, calibration decoder inputs, title) for a model name accepted by ``masq-fx inspect``."""
    if samples < 1:
        raise ValueError(f"--samples must be at least 1, got {samples}")
    if name == "smollm2":
        from masq_fx.pretrained import load_smollm2

        model, tokenizer = load_smollm2()
        title = f"SmolLM2-135M-Instruct (real weights), {samples} × {seq_len} tokens of Python reference text"
        return model, _text_samples(model, tokenizer, samples, seq_len), title
    if name.startswith(TINY_PREFIX):
        from masq_fx.models.tiny import tiny_model

        tiny = tiny_model(name[len(TINY_PREFIX):], seed=0, batch_size=max(2, samples))
        adapter = adapter_for(tiny.model)
        title = f"tiny random {tiny.family} (random weights: shows the mechanics, not real outliers)"
        return tiny.model, [adapter.decoder_inputs(tiny.batch)], title
    folder = Path(name)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"model {name!r} is neither 'default', 'smollm2', 'tiny:FAMILY' nor a local model folder"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    title = f"{folder.name}, {samples} × {seq_len} tokens of Python reference text"
    return model, _text_samples(model, tokenizer, samples, seq_len), title


def inspect_model(
    model: nn.Module, samples: Sequence[DecoderInputs], title: str, top_k: int = 4, progress: bool = True
) -> str:
    """Capture, observe ``samples`` and format the per-modality activation report."""
    context = observe(Context(capture(model), samples), progress=progress)
    return format_report(activation_report(context.stats, top_k=top_k), title)
