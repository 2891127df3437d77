"""Turn images, waveforms and questions into the batch dict ``Qwen2_5OmniThinkerForConditionalGeneration`` takes.

No torchvision or torchaudio: images are patchified with torch in the Qwen2-VL layout (patches
ordered by 2x2 merge window, each patch flattened as ``channel x time x 14 x 14``), and audio becomes
a log-mel spectrogram computed with ``torch.stft``.

Prompts follow SmolLM2's chat format without a system turn::

    <|im_start|>user\\n<vision_start><image>*N<vision_end>What number is in the image?<|im_end|>\\n<|im_start|>assistant\\n

and the answer is the number's digits followed by ``<|im_end|>``. The media markers and placeholders
are SmolLM2 special tokens that its chat format never uses (see :data:`SPECIAL_TOKENS`), so the
embedding table is not resized.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from masq_fx.data.samples import Kind
from masq_fx.errors import InputError

#: SmolLM2 special tokens (ids 3..9) reused as the thinker's media tokens
SPECIAL_TOKENS: dict[str, int] = {
    "audio_start": 3,  # <repo_name>
    "audio_end": 4,  # <reponame>
    "vision_start": 5,  # <file_sep>
    "vision_end": 6,  # <filename>
    "image": 7,  # <gh_stars>
    "audio": 8,  # <issue_start>
    "video": 9,  # <issue_comment>
}
IM_START, IM_END = 1, 2  # <|im_start|>, <|im_end|>

QUESTIONS: dict[Kind, str] = {
    "vision": "What number is in the image?",
    "audio": "What number was said?",
}

# Qwen2-VL image normalisation (the CLIP mean and std)
_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageSpec:
    """Image geometry: ``height x width`` pixels, a multiple of ``patch * merge``."""

    height: int = 56
    width: int = 112
    patch: int = 14
    temporal_patch: int = 2
    merge: int = 2

    def __post_init__(self) -> None:
        unit = self.patch * self.merge
        if self.height % unit or self.width % unit:
            raise InputError(f"image size {self.height}x{self.width} must be a multiple of {unit}")

    @property
    def grid(self) -> tuple[int, int, int]:
        """``(t, h, w)`` patch grid of one image."""
        return (1, self.height // self.patch, self.width // self.patch)

    @property
    def tokens(self) -> int:
        """Placeholder tokens per image (patches after the 2x2 merge)."""
        t, h, w = self.grid
        return t * h * w // self.merge**2


@dataclass(frozen=True)
class AudioSpec:
    """Log-mel front end: 16 kHz audio, 50 ms Hann windows every 40 ms, ``mel_bins`` HTK mel bands.

    Coarser than Whisper's 25 ms / 10 ms so that a 1-2 s clip is 6-12 LM tokens: the towers are
    trained through the frozen LM on a shared 2-core CPU, where every token counts.
    """

    sample_rate: int = 16000
    n_fft: int = 1024
    win_length: int = 800
    hop_length: int = 640
    mel_bins: int = 40
    min_seconds: float = 1.0
    max_seconds: float = 2.0

    @property
    def max_frames(self) -> int:
        return int(self.max_seconds * self.sample_rate) // self.hop_length

    def frames(self, samples: int) -> int:
        return samples // self.hop_length

    @staticmethod
    def tokens(frames: int) -> int:
        """Placeholder tokens of a clip of ``frames`` mel frames (conv stride 2, then average pooling by 2)."""
        return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def image_patches(images: np.ndarray | torch.Tensor, spec: ImageSpec = ImageSpec()) -> dict[str, torch.Tensor]:
    """``uint8`` images ``[n, height, width, 3]`` → ``pixel_values`` ``[n * patches, 3 * 2 * 14 * 14]`` and ``image_grid_thw``.

    Same layout as the Qwen2-VL image processor: the still image is repeated over the temporal patch,
    and patches are ordered so that each 2x2 merge window is contiguous.
    """
    x = torch.as_tensor(images)
    if x.dim() != 4 or x.shape[1:] != (spec.height, spec.width, 3) or x.dtype != torch.uint8:
        raise InputError(f"images must be uint8 [n, {spec.height}, {spec.width}, 3], got {x.dtype} {tuple(x.shape)}")
    n = x.shape[0]
    x = x.permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(_IMAGE_MEAN).view(1, 3, 1, 1)) / torch.tensor(_IMAGE_STD).view(1, 3, 1, 1)
    x = x[:, None].expand(n, spec.temporal_patch, 3, spec.height, spec.width)  # [n, T, C, H, W]
    _, gh, gw = spec.grid
    m, p = spec.merge, spec.patch
    x = x.reshape(n, spec.temporal_patch, 3, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # n, h/m, w/m, m, m, C, T, p, p
    pixel_values = x.reshape(n * gh * gw, 3 * spec.temporal_patch * p * p).contiguous()
    return {"pixel_values": pixel_values, "image_grid_thw": torch.tensor([spec.grid] * n, dtype=torch.long)}


def _mel_filterbank(spec: AudioSpec) -> torch.Tensor:
    """Triangular HTK mel filters ``[n_fft // 2 + 1, mel_bins]`` from 0 Hz to Nyquist."""

    def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    freqs = torch.linspace(0, spec.sample_rate / 2, spec.n_fft // 2 + 1, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(0.0, float(hz_to_mel(torch.tensor(spec.sample_rate / 2.0))), spec.mel_bins + 2, dtype=torch.float64))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None] - lower) / (centre - lower)
    falling = (upper - freqs[None]) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).T.float()


def log_mel(waveform: np.ndarray | torch.Tensor, spec: AudioSpec = AudioSpec()) -> torch.Tensor:
    """Normalised log-mel features ``[mel_bins, samples // hop]`` of a mono float waveform at ``spec.sample_rate``.

    Whisper-style scaling: ``log10`` power, floored 8 decades below the clip's peak, then ``(x + 4) / 4``.
    """
    wav = torch.as_tensor(waveform, dtype=torch.float32)
    if wav.dim() != 1:
        raise InputError(f"waveform must be 1-D (mono), got shape {tuple(wav.shape)}")
    window = torch.hann_window(spec.win_length)
    stft = torch.stft(wav, spec.n_fft, spec.hop_length, spec.win_length, window, center=True, return_complex=True)
    power = stft[:, : spec.frames(wav.numel())].abs() ** 2
    mel = _mel_filterbank(spec).T @ power
    logm = torch.log10(mel.clamp(min=1e-10))
    logm = torch.maximum(logm, logm.max() - 8.0)
    return (logm + 4.0) / 4.0


def audio_batch(features: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clips of log-mel features ``[mel, frames_i]`` → zero-padded ``input_features`` and ``feature_attention_mask``."""
    width = max(f.shape[1] for f in features)
    feats = torch.zeros(len(features), features[0].shape[0], width)
    mask = torch.zeros(len(features), width, dtype=torch.long)
    for i, f in enumerate(features):
        feats[i, :, : f.shape[1]] = f
        mask[i, : f.shape[1]] = 1
    return {"input_features": feats, "feature_attention_mask": mask}


@dataclass(frozen=True)
class Sample:
    """One question: an image (``uint8 [h, w, 3]``), audio features (``[mel, frames]``) or a text question.

    ``answer`` is the expected reply (the number's digits); ``None`` for prompts without a reference.
    """

    modality: Kind
    answer: str | None = None
    image: np.ndarray | None = None
    features: torch.Tensor | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        needed = {"vision": self.image, "audio": self.features, "text": self.text}[self.modality]
        if needed is None:
            field_name = {"vision": "image", "audio": "features", "text": "text"}[self.modality]
            raise InputError(f"a {self.modality} sample needs its {field_name!r}")


class TrimodalProcessor:
    """Prompt building and batching for the trimodal thinker (the role of an HF processor)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image: ImageSpec = ImageSpec(), audio: AudioSpec = AudioSpec()) -> None:
        self.tokenizer = tokenizer
        self.image = image
        self.audio = audio
        self._user = self._encode("user\n")
        self._assistant = [IM_END] + self._encode("\n") + [IM_START] + self._encode("assistant\n")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def sample(
        self,
        *,
        image: np.ndarray | None = None,
        waveform: np.ndarray | torch.Tensor | None = None,
        text: str | None = None,
        answer: str | None = None,
    ) -> Sample:
        """A :class:`Sample` from exactly one raw input: a ``uint8 [h, w, 3]`` image, a 16 kHz mono waveform
        (1-2 s) or a text question."""
        given = [name for name, value in (("image", image), ("waveform", waveform), ("text", text)) if value is not None]
        if len(given) != 1:
            raise InputError(f"give exactly one of image, waveform, text; got {given or 'none'}")
        if image is not None:
            return Sample("vision", answer, image=np.asarray(image))
        if waveform is not None:
            return Sample("audio", answer, features=log_mel(waveform, self.audio))
        return Sample("text", answer, text=text)

    def prompt_ids(self, sample: Sample) -> list[int]:
        """Token ids of the chat prompt of ``sample``, ending where the assistant's reply starts."""
        t = SPECIAL_TOKENS
        if sample.modality == "vision":
            media = [t["vision_start"]] + [t["image"]] * self.image.tokens + [t["vision_end"]]
            question = QUESTIONS["vision"]
        elif sample.modality == "audio":
            assert sample.features is not None  # checked in Sample.__post_init__
            frames = int(sample.features.shape[1])
            media = [t["audio_start"]] + [t["audio"]] * self.audio.tokens(frames) + [t["audio_end"]]
            question = QUESTIONS["audio"]
        else:
            assert sample.text is not None  # checked in Sample.__post_init__
            media, question = [], sample.text
        return [IM_START] + self._user + media + self._encode(question) + self._assistant

    def answer_ids(self, answer: str) -> list[int]:
        """The reply's token ids, ``<|im_end|>`` included."""
        return self._encode(answer) + [IM_END]

    def decode_answer(self, ids: Sequence[int]) -> str:
        """The reply text up to the first ``<|im_end|>`` (or end of sequence), stripped."""
        ids = list(ids)
        if IM_END in ids:
            ids = ids[: ids.index(IM_END)]
        return cast(str, self.tokenizer.decode(ids, skip_special_tokens=True)).strip()  # one sequence: one str

    def __call__(self, samples: Sequence[Sample], with_answers: bool = False) -> dict[str, torch.Tensor]:
        """The model's batch for ``samples``: prompts left-padded (for generation and ``decoder_inputs``).

        With ``with_answers`` the rows are prompt + answer, right-padded, and ``labels`` holds the
        answer ids (``-100`` elsewhere): the training layout.
        """
        if not samples:
            raise InputError("no samples to batch")
        rows, labels = [], []
        for s in samples:
            prompt = self.prompt_ids(s)
            if with_answers:
                if s.answer is None:
                    raise InputError("with_answers=True needs every sample's answer")
                reply = self.answer_ids(s.answer)
                rows.append(prompt + reply)
                labels.append([-100] * len(prompt) + reply)
            else:
                rows.append(prompt)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), IM_END, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        batch: dict[str, torch.Tensor] = {}
        if with_answers:
            lab = torch.full((len(rows), width), -100, dtype=torch.long)
            for i, (row, label) in enumerate(zip(rows, labels)):
                ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
                lab[i, : len(row)] = torch.tensor(label)
            batch["labels"] = lab
        else:
            for i, row in enumerate(rows):
                ids[i, width - len(row):] = torch.tensor(row)
                mask[i, width - len(row):] = 1
        batch["input_ids"], batch["attention_mask"] = ids, mask
        images = [s.image for s in samples if s.modality == "vision" and s.image is not None]
        if images:
            batch.update(image_patches(np.stack(images), self.image))
        clips = [s.features for s in samples if s.modality == "audio" and s.features is not None]
        if clips:
            batch.update(audio_batch(clips))
        return batch


__all__ = [
    "AudioSpec",
    "ImageSpec",
    "QUESTIONS",
    "SPECIAL_TOKENS",
    "Sample",
    "TrimodalProcessor",
    "audio_batch",
    "image_patches",
    "log_mel",
]
