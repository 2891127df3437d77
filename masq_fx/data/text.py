"""Real English text available offline: the Python language reference shipped with every CPython.

``pydoc_data.topics.topics`` holds 79 documents. They are split by key into disjoint
calibration and evaluation sets (every ``eval_every``-th key, in sorted order, is evaluation), so
no document is ever used for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pydoc_data.topics import topics
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from masq_fx.errors import InputError

Split = Literal["calibration", "evaluation"]


@dataclass(frozen=True)
class TextSplit:
    """Which pydoc topics form the evaluation split: every ``eval_every``-th key in sorted order."""

    eval_every: int = 4

    def keys(self, split: Split) -> list[str]:
        keys = sorted(topics)
        if split == "evaluation":
            return [k for i, k in enumerate(keys) if i % self.eval_every == 0]
        if split == "calibration":
            return [k for i, k in enumerate(keys) if i % self.eval_every != 0]
        raise InputError(f"unknown split {split!r}; expected 'calibration' or 'evaluation'")

    def text(self, split: Split) -> str:
        return "\n\n".join(topics[k] for k in self.keys(split))


def token_windows(
    tokenizer: PreTrainedTokenizerBase,
    split: Split,
    window: int,
    count: int,
    text_split: TextSplit = TextSplit(),
) -> torch.Tensor:
    """``count`` non-overlapping windows of ``window`` tokens from ``split``, as ``[count, window]`` ids."""
    ids = tokenizer(text_split.text(split), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    available = ids.numel() // window
    if count > available:
        raise InputError(
            f"the {split} split has {ids.numel()} tokens: {available} windows of {window}, not {count}; "
            "lower the window length or the window count"
        )
    return ids[: count * window].view(count, window)
