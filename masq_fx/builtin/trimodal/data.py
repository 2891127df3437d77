"""The trimodal task's splits ("what number is this?") and the small shipped sets.

Three splits, disjoint by construction (``tests/test_trimodal.py`` checks it):

* **vision** (numbers 0-99 rendered in 12 DejaVu faces with random size, position jitter around the
  centre, rotation up to 6 degrees, light-on-dark or dark-on-light tints, and pixel noise): the 20
  evaluation numbers (:data:`VISION_EVAL_NUMBERS`) never appear in training or
  calibration images. Every digit still appears in every position in training, so the task is
  reading digits, not memorising 100 pictures.
* **audio** (numbers 0-99 spoken by ``espeak-ng``, 1-2 s at 16 kHz): numbers repeat, but the
  evaluation voices (espeak variants), speeds and pitches are all unseen in training and
  calibration (:data:`AUDIO_VOICES`).
* **text** (the number in words, asked as a question): calibration asks about training numbers,
  evaluation about the vision evaluation numbers.

Item ``i`` of a split is drawn from seed ``SPLIT_SEED_BASE[split] + i`` (bases 10 million apart), so
the seeds of the three splits never meet. Training draws from the ``train`` split; the
``calibration`` and ``evaluation`` sets ship as compressed npz files in ``assets/`` (log-mel
features for audio), so loading them needs no espeak-ng. The image and speech generators live with
the training fixture (``benchmarks/fixtures/trimodal_data.py``); regenerate the sets with
``python benchmarks/fixtures/build_trimodal_data.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from masq_fx.builtin.trimodal.processing import Sample, TrimodalProcessor
from masq_fx.data.samples import Kind
from masq_fx.data.text import token_windows
from masq_fx.errors import InputError, MissingFileError

Split = Literal["train", "calibration", "evaluation"]
SPLITS: tuple[Split, ...] = ("train", "calibration", "evaluation")
SPLIT_SEED_BASE: dict[Split, int] = {"train": 0, "calibration": 10_000_000, "evaluation": 20_000_000}
MAX_ITEMS_PER_SPLIT = 10_000_000

NUMBERS = range(100)
#: vision numbers held out of training and calibration: two units digits per tens digit and vice versa
VISION_EVAL_NUMBERS: tuple[int, ...] = tuple(n for n in NUMBERS if (n // 10 + 3 * (n % 10)) % 5 == 0)
VISION_TRAIN_NUMBERS: tuple[int, ...] = tuple(n for n in NUMBERS if n not in VISION_EVAL_NUMBERS)

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
TEXT_TEMPLATES: tuple[str, ...] = (
    "What number is {words}? Answer with digits.",
    "Write {words} as a number.",
    "How is {words} written in digits?",
)


def number_words(n: int) -> str:
    """English words of ``n`` in 0..99 (``42`` → ``"forty-two"``)."""
    if not 0 <= n < 100:
        raise InputError(f"number must be in 0..99, got {n}")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])


def item_seed(split: Split, index: int) -> int:
    """The seed of item ``index`` of ``split``; the seed ranges of the splits are disjoint."""
    if split not in SPLIT_SEED_BASE:
        raise InputError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 0 <= index < MAX_ITEMS_PER_SPLIT:
        raise InputError(f"item index must be in [0, {MAX_ITEMS_PER_SPLIT}), got {index}")
    return SPLIT_SEED_BASE[split] + index


def _rng(split: Split, index: int) -> np.random.Generator:
    return np.random.default_rng(item_seed(split, index))


# ----------------------------------------------------------------------------------------------- text


@dataclass(frozen=True)
class TextItem:
    number: int
    seed: int
    question: str


def text_item(split: Split, index: int) -> TextItem:
    """A question about a number in words; evaluation asks about the vision evaluation numbers."""
    rng = _rng(split, index)
    numbers = VISION_EVAL_NUMBERS if split == "evaluation" else VISION_TRAIN_NUMBERS
    number = numbers[index % len(numbers)]
    template = TEXT_TEMPLATES[rng.integers(len(TEXT_TEMPLATES))]
    return TextItem(number, item_seed(split, index), template.format(words=number_words(number)))


# ------------------------------------------------------------------------------------- shipped sets

ASSETS = Path(__file__).parent / "assets"
SHIPPED_SPLITS: tuple[Split, ...] = ("calibration", "evaluation")


def _set_path(folder: Path, split: Split) -> Path:
    return folder / f"{split}.npz"


@dataclass(frozen=True)
class ShippedSet:
    """One shipped split, as arrays (see :func:`build_set`)."""

    split: Split
    vision_images: np.ndarray
    vision_numbers: np.ndarray
    vision_seeds: np.ndarray
    audio_features: np.ndarray
    audio_frames: np.ndarray
    audio_numbers: np.ndarray
    audio_seeds: np.ndarray
    audio_voices: np.ndarray

    def samples(self, modality: Kind, limit: int | None = None) -> list[Sample]:
        """The split's questions of ``modality`` with their answers (text questions are generated)."""
        if modality == "vision":
            n = len(self.vision_numbers) if limit is None else min(limit, len(self.vision_numbers))
            return [Sample("vision", str(int(self.vision_numbers[i])), image=self.vision_images[i]) for i in range(n)]
        if modality == "audio":
            n = len(self.audio_numbers) if limit is None else min(limit, len(self.audio_numbers))
            return [
                Sample(
                    "audio",
                    str(int(self.audio_numbers[i])),
                    features=torch.from_numpy(self.audio_features[i, :, : self.audio_frames[i]].astype(np.float32)),
                )
                for i in range(n)
            ]
        if modality == "text":
            n = len(self.vision_numbers) if limit is None else limit
            items = [text_item(self.split, i) for i in range(n)]
            return [Sample("text", str(t.number), text=t.question) for t in items]
        raise InputError(f"unknown modality {modality!r}; expected 'vision', 'audio' or 'text'")


def load_set(split: Split, folder: Path = ASSETS) -> ShippedSet:
    """A shipped split; needs no espeak-ng."""
    path = _set_path(folder, split)
    if not path.is_file():
        raise MissingFileError(f"{path} is missing: run `python benchmarks/fixtures/build_trimodal_data.py`")
    with np.load(path, allow_pickle=False) as data:
        return ShippedSet(split=split, **{k: data[k] for k in data.files})


def mixed_samples(shipped: ShippedSet, per_modality: int, modalities: Sequence[Kind] = ("vision", "audio", "text")) -> list[Sample]:
    """Up to ``per_modality`` samples of each modality, interleaved (a calibration mix)."""
    groups = [shipped.samples(m, per_modality) for m in modalities]
    return [s for row in zip(*groups) for s in row]


def calibration_batches(
    processor: TrimodalProcessor, per_modality: int = 32, batch_size: int = 8, folder: Path = ASSETS, text_windows: int = 0, window: int = 256
) -> list[dict[str, torch.Tensor]]:
    """Processed batches of the shipped calibration split (vision, audio and text interleaved), for ``decoder_inputs``;
    then ``text_windows`` windows of ``window`` tokens of the reference text's calibration split, one a batch (the
    text questions alone are short arithmetic, while text quality is measured on running text)."""
    samples = mixed_samples(load_set("calibration", folder), per_modality)
    batches = [processor(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
    if text_windows:
        rows = token_windows(processor.tokenizer, "calibration", window=window, count=text_windows)
        batches += [{"input_ids": row[None], "attention_mask": torch.ones_like(row[None])} for row in rows]
    return batches
