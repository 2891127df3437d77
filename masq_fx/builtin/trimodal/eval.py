"""The tri-modal thinker's scores: exact match per modality and text perplexity, for FP and quantized decoders alike.

Exact match: the reply up to ``<|im_end|>``, stripped, equals the number's digits
(:func:`masq_fx.eval.accuracy.exact_match` with the thinker's processor).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch

from masq_fx.builtin.trimodal.data import ShippedSet
from masq_fx.builtin.trimodal.processing import IM_END, Sample, TrimodalProcessor
from masq_fx.capture import CapturedDecoder
from masq_fx.data.text import token_windows
from masq_fx.eval.accuracy import Accuracy, DecoderFn, exact_match
from masq_fx.eval.perplexity import perplexity
from masq_fx.models import ModelAdapter


def accuracy(
    decoder: DecoderFn,
    adapter: ModelAdapter,
    processor: TrimodalProcessor,
    samples: Sequence[Sample],
    batch_size: int = 16,
    max_new_tokens: int = 4,
    progress: bool = False,
) -> Accuracy:
    """Greedy exact-match accuracy of ``decoder`` on ``samples`` (all with answers)."""
    return exact_match(
        decoder,
        adapter,
        samples,
        processor,
        lambda ids: cast(str, processor.tokenizer.decode(ids, skip_special_tokens=True)),  # one sequence: one str
        stop_id=IM_END,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )


def text_perplexity(captured: CapturedDecoder, adapter: ModelAdapter, processor: TrimodalProcessor, window: int = 512, count: int = 8) -> float:
    """Perplexity on ``count`` windows of the evaluation split of the Python reference (``masq_fx.data.text``)."""
    windows = token_windows(processor.tokenizer, "evaluation", window=window, count=count)
    return perplexity(captured, adapter, windows)


def scores(decoder: DecoderFn, adapter: ModelAdapter, processor: TrimodalProcessor, evaluation: ShippedSet, items: int, windows: torch.Tensor) -> dict[str, float]:
    """Vision and audio exact match on the first ``items`` items of ``evaluation``, and text perplexity on ``windows``."""
    found = {f"{m} exact match": accuracy(decoder, adapter, processor, evaluation.samples(m, items)).value for m in ("vision", "audio")}
    return found | {"text perplexity": perplexity(decoder, adapter, windows)}
