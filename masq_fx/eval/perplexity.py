"""Perplexity of a captured (float or transformed) decoder on token windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from masq_fx.eval.accuracy import DecoderFn
from masq_fx.models import ModelAdapter


@torch.no_grad()
def perplexity(captured: DecoderFn, adapter: ModelAdapter, windows: torch.Tensor, progress: bool = False) -> float:
    """exp(mean next-token cross-entropy) over ``windows`` ``[count, length]`` of text token ids.

    ``captured``: a :class:`~masq_fx.capture.CapturedDecoder`, or any function of decoder inputs to logits.
    """
    total, count = 0.0, 0
    for row in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
        ids = row[None]
        inputs = adapter.decoder_inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        logits = captured(inputs)
        loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:].to(logits.device), reduction="sum")
        total += float(loss)
        count += ids.shape[1] - 1
    return math.exp(total / count)
