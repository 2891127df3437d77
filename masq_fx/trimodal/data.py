"""Seeded generators of the trimodal task ("what number is this?") and the small shipped sets.

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
features for audio), so loading them needs no espeak-ng. Regenerate them with
``python benchmarks/fixtures/build_trimodal_data.py``.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from masq_fx.trimodal.processing import AudioSpec, ImageSpec, Modality, Sample, TrimodalProcessor, log_mel

Split = Literal["train", "calibration", "evaluation"]
SPLITS: tuple[Split, ...] = ("train", "calibration", "evaluation")
SPLIT_SEED_BASE: dict[Split, int] = {"train": 0, "calibration": 10_000_000, "evaluation": 20_000_000}
MAX_ITEMS_PER_SPLIT = 10_000_000

NUMBERS = range(100)
#: vision numbers held out of training and calibration: two units digits per tens digit and vice versa
VISION_EVAL_NUMBERS: tuple[int, ...] = tuple(n for n in NUMBERS if (n // 10 + 3 * (n % 10)) % 5 == 0)
VISION_TRAIN_NUMBERS: tuple[int, ...] = tuple(n for n in NUMBERS if n not in VISION_EVAL_NUMBERS)

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
#: DejaVu faces used for rendering (regular, bold, oblique, condensed, mono, serif)
FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansCondensed.ttf",
    "DejaVuSansCondensed-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerifCondensed.ttf",
)


@dataclass(frozen=True)
class VoiceSettings:
    """The espeak-ng settings one split may draw from."""

    accents: tuple[str, ...]
    variants: tuple[str, ...]
    speeds: tuple[int, ...]  # words per minute
    pitches: tuple[int, ...]  # 0..99


_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
_TRAIN_VOICES = VoiceSettings(
    accents=_ACCENTS,
    variants=(
        "m1", "m2", "m3", "m5", "m6", "m8", "f1", "f2", "f4", "klatt", "klatt2", "klatt4", "klatt6", "Andy", "Annie",
        "adam", "anika", "david", "edward", "john", "linda", "paul", "steph", "robert", "aunty", "benjamin", "caleb",
        "grandma", "norbert", "travis",
    ),
    speeds=(125, 140, 155, 170, 185),
    pitches=(25, 35, 45, 55, 65, 75),
)
#: espeak-ng settings per split: evaluation variants, speeds and pitches never occur in the other splits
AUDIO_VOICES: dict[Split, VoiceSettings] = {
    "train": _TRAIN_VOICES,
    "calibration": _TRAIN_VOICES,
    "evaluation": VoiceSettings(
        accents=_ACCENTS,
        variants=("m4", "m7", "f3", "f5", "klatt3", "klatt5", "Alex", "max", "ed", "belinda", "zac", "quincy"),
        speeds=(132, 147, 162, 177),
        pitches=(30, 40, 50, 60, 70),
    ),
}

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
        raise ValueError(f"number must be in 0..99, got {n}")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])


def item_seed(split: Split, index: int) -> int:
    """The seed of item ``index`` of ``split``; the seed ranges of the splits are disjoint."""
    if split not in SPLIT_SEED_BASE:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 0 <= index < MAX_ITEMS_PER_SPLIT:
        raise ValueError(f"item index must be in [0, {MAX_ITEMS_PER_SPLIT}), got {index}")
    return SPLIT_SEED_BASE[split] + index


def _rng(split: Split, index: int) -> np.random.Generator:
    return np.random.default_rng(item_seed(split, index))


# --------------------------------------------------------------------------------------------- vision


@lru_cache(maxsize=None)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    path = FONT_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"font {path} is missing: install the Debian package fonts-dejavu-core")
    return ImageFont.truetype(str(path), size)


def render_number(number: int, rng: np.random.Generator, spec: ImageSpec = ImageSpec()) -> tuple[np.ndarray, tuple[float, ...]]:
    """``number`` drawn in a random DejaVu face, size, tint, rotation and position, plus noise.

    Returns the ``uint8 [h, w, 3]`` image and the approximate x centre (pixels) of each digit.
    """
    light, dark = rng.integers(170, 256, 3), rng.integers(0, 86, 3)  # random tints, always legible
    background, ink = (light, dark) if rng.random() < 0.5 else (dark, light)
    font = _font(FONT_FILES[rng.integers(len(FONT_FILES))], int(round(spec.height * rng.uniform(0.5, 0.7))))
    text = str(number)
    left, top, right, bottom = font.getbbox(text)
    layer = Image.new("L", (right - left + 8, bottom - top + 8), 0)
    ImageDraw.Draw(layer).text((4 - left, 4 - top), text, font=font, fill=255)
    centres = [4 - left + font.getlength(text[:i]) + font.getlength(text[i]) / 2 for i in range(len(text))]
    angle = float(rng.uniform(-6, 6))
    width = layer.width
    layer = layer.rotate(angle, resample=Image.BILINEAR, expand=True)
    centres = [(c - width / 2) * np.cos(np.radians(angle)) + layer.width / 2 for c in centres]
    scale = min(1.0, (spec.width - 2) / layer.width, (spec.height - 2) / layer.height)
    if scale < 1.0:
        layer = layer.resize((max(1, int(layer.width * scale)), max(1, int(layer.height * scale))), Image.BILINEAR)
    # jitter around the centre: a tiny tower learns in minutes when the digits sit roughly in place
    jx, jy = spec.width // 11, spec.height // 9
    x = int(np.clip((spec.width - layer.width) // 2 + rng.integers(-jx, jx + 1), 0, spec.width - layer.width))
    y = int(np.clip((spec.height - layer.height) // 2 + rng.integers(-jy, jy + 1), 0, spec.height - layer.height))
    alpha = np.zeros((spec.height, spec.width), dtype=np.float32)
    alpha[y : y + layer.height, x : x + layer.width] = np.asarray(layer, dtype=np.float32) / 255.0
    image = background[None, None] * (1 - alpha[..., None]) + ink[None, None] * alpha[..., None]
    image = image + rng.normal(0.0, rng.uniform(0.0, 10.0), image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), tuple(float(x + c * scale) for c in centres)


@dataclass(frozen=True)
class VisionItem:
    number: int
    seed: int
    image: np.ndarray  # uint8 [h, w, 3]
    digit_x: tuple[float, ...]  # approximate x centre of each digit, pixels


def vision_item(split: Split, index: int, spec: ImageSpec = ImageSpec()) -> VisionItem:
    """Item ``index`` of ``split``: evaluation cycles through the held-out numbers, the others through the rest."""
    rng = _rng(split, index)
    numbers = VISION_EVAL_NUMBERS if split == "evaluation" else VISION_TRAIN_NUMBERS
    number = numbers[index % len(numbers)]
    image, digit_x = render_number(number, rng, spec)
    return VisionItem(number, item_seed(split, index), image, digit_x)


# ---------------------------------------------------------------------------------------------- audio


@dataclass(frozen=True)
class Voice:
    accent: str
    variant: str
    speed: int
    pitch: int

    def espeak_name(self) -> str:
        return f"{self.accent}+{self.variant}"

    def __str__(self) -> str:
        return f"{self.espeak_name()} s{self.speed} p{self.pitch}"


def draw_voice(settings: VoiceSettings, rng: np.random.Generator) -> Voice:
    return Voice(
        accent=settings.accents[rng.integers(len(settings.accents))],
        variant=settings.variants[rng.integers(len(settings.variants))],
        speed=int(settings.speeds[rng.integers(len(settings.speeds))]),
        pitch=int(settings.pitches[rng.integers(len(settings.pitches))]),
    )


def _resample(wav: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling by zero-padding / truncating the spectrum."""
    if source_rate == target_rate:
        return wav
    n = int(round(len(wav) * target_rate / source_rate))
    spectrum = np.fft.rfft(wav)
    return np.fft.irfft(spectrum[: n // 2 + 1], n) * (n / len(wav))


def speak(number: int, voice: Voice, spec: AudioSpec = AudioSpec()) -> np.ndarray:
    """``number`` spoken by espeak-ng, silence trimmed: float32 at ``spec.sample_rate``, peak 1."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError(
            "espeak-ng is not installed (apt-get install -y espeak-ng); it is only needed to generate audio, "
            "the shipped calibration and evaluation sets load without it"
        )
    cmd = ["espeak-ng", "-v", voice.espeak_name(), "-s", str(voice.speed), "-p", str(voice.pitch), "--stdout", str(number)]
    out = subprocess.run(cmd, capture_output=True, check=True).stdout
    with wave.open(io.BytesIO(out)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    if pcm.size == 0:  # espeak writes 0 frames in the header when streaming: read what follows it
        pcm = np.frombuffer(out[44:], dtype=np.int16)
    wav = _resample(pcm.astype(np.float64) / 32768.0, rate, spec.sample_rate)
    loud = np.flatnonzero(np.abs(wav) > 0.02 * np.abs(wav).max())
    if loud.size == 0:
        raise RuntimeError(f"espeak-ng produced silence for {number} with {voice}")
    wav = wav[loud[0] : loud[-1] + 1]
    return (wav / np.abs(wav).max()).astype(np.float32)


def place_in_clip(speech: np.ndarray, rng: np.random.Generator, spec: AudioSpec = AudioSpec()) -> np.ndarray:
    """Put ``speech`` at a random offset of a 1-2 s clip, with random gain and background noise (SNR 10-40 dB)."""
    lo, hi = int(spec.min_seconds * spec.sample_rate), int(spec.max_seconds * spec.sample_rate)
    speech = speech[:hi]
    length = int(np.clip(len(speech) + rng.integers(0, spec.sample_rate // 2), lo, hi))
    clip = np.zeros(length, dtype=np.float64)
    start = int(rng.integers(0, length - len(speech) + 1))
    clip[start : start + len(speech)] = speech * rng.uniform(0.2, 1.0)
    power = np.mean(clip[start : start + len(speech)] ** 2)
    noise = rng.normal(0.0, 1.0, length) * np.sqrt(power / 10 ** (rng.uniform(10.0, 40.0) / 10))
    return (clip + noise).astype(np.float32)


@dataclass(frozen=True)
class AudioItem:
    number: int
    seed: int
    voice: Voice
    waveform: np.ndarray  # float32 at 16 kHz, 1-2 s


def audio_speech(split: Split, index: int, spec: AudioSpec = AudioSpec()) -> tuple[AudioItem, np.random.Generator]:
    """Item ``index`` of ``split`` before clipping (``waveform`` is the trimmed speech), and its generator.

    Training re-clips the same speech with fresh offsets and noise; :func:`audio_item` clips it once.
    """
    rng = _rng(split, index)
    number = int(rng.integers(len(NUMBERS)))
    voice = draw_voice(AUDIO_VOICES[split], rng)
    return AudioItem(number, item_seed(split, index), voice, speak(number, voice, spec)), rng


def audio_item(split: Split, index: int, spec: AudioSpec = AudioSpec()) -> AudioItem:
    """Item ``index`` of ``split``: a random number 0-99 in a random voice of the split. Needs espeak-ng."""
    speech, rng = audio_speech(split, index, spec)
    return replace(speech, waveform=place_in_clip(speech.waveform, rng, spec))


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


@dataclass(frozen=True)
class SetSizes:
    """Items per modality in each shipped split."""

    calibration: int = 64
    evaluation: int = 128


def _set_path(folder: Path, split: Split) -> Path:
    return folder / f"{split}.npz"


def build_set(split: Split, count: int, folder: Path = ASSETS, image_spec: ImageSpec = ImageSpec(), audio_spec: AudioSpec = AudioSpec()) -> Path:
    """Generate ``count`` vision and audio items of ``split`` and write them (log-mel float16 for audio)."""
    if split not in SHIPPED_SPLITS:
        raise ValueError(f"only {SHIPPED_SPLITS} ship; training data is generated on the fly")
    vision = [vision_item(split, i, image_spec) for i in range(count)]
    audio = [audio_item(split, i, audio_spec) for i in range(count)]
    feats = [log_mel(a.waveform, audio_spec) for a in audio]
    padded = np.zeros((count, audio_spec.mel_bins, audio_spec.max_frames), dtype=np.float16)
    for i, f in enumerate(feats):
        padded[i, :, : f.shape[1]] = f.numpy()
    folder.mkdir(parents=True, exist_ok=True)
    path = _set_path(folder, split)
    np.savez_compressed(
        path,
        vision_images=np.stack([v.image for v in vision]),
        vision_numbers=np.array([v.number for v in vision], dtype=np.int64),
        vision_seeds=np.array([v.seed for v in vision], dtype=np.int64),
        audio_features=padded,
        audio_frames=np.array([f.shape[1] for f in feats], dtype=np.int64),
        audio_numbers=np.array([a.number for a in audio], dtype=np.int64),
        audio_seeds=np.array([a.seed for a in audio], dtype=np.int64),
        audio_voices=np.array([str(a.voice) for a in audio]),
    )
    return path


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

    def samples(self, modality: Modality, limit: int | None = None) -> list[Sample]:
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
        raise ValueError(f"unknown modality {modality!r}; expected 'vision', 'audio' or 'text'")


def load_set(split: Split, folder: Path = ASSETS) -> ShippedSet:
    """A shipped split; needs no espeak-ng."""
    path = _set_path(folder, split)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python benchmarks/fixtures/build_trimodal_data.py`")
    with np.load(path, allow_pickle=False) as data:
        return ShippedSet(split=split, **{k: data[k] for k in data.files})


def mixed_samples(shipped: ShippedSet, per_modality: int, modalities: Sequence[Modality] = ("vision", "audio", "text")) -> list[Sample]:
    """Up to ``per_modality`` samples of each modality, interleaved (a calibration mix)."""
    groups = [shipped.samples(m, per_modality) for m in modalities]
    return [s for row in zip(*groups) for s in row]


def calibration_batches(
    processor: TrimodalProcessor, per_modality: int = 32, batch_size: int = 8, folder: Path = ASSETS
) -> list[dict[str, torch.Tensor]]:
    """Processed batches of the shipped calibration split (vision, audio and text interleaved), for ``decoder_inputs``."""
    samples = mixed_samples(load_set("calibration", folder), per_modality)
    return [processor(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
