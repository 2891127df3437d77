"""Calibration and evaluation samples from the user's files: a JSONL file or a folder of media.

JSONL, one object per line (blank lines are skipped)::

    {"text": "What number is in the image?", "image": "img/7.png", "answer": "7"}
    {"audio": "wav/12.wav"}
    {"text": "Explain Python decorators."}

``text`` is the prompt, ``image`` (PNG/JPEG) and ``audio`` (16-bit PCM WAV) are paths relative to
the JSONL file's folder (at most one of them per sample), ``answer`` the expected reply (used by
evaluation). A folder holds one sample per file, sorted by name: every ``*.png``/``*.jpg``/``*.jpeg``
an image, every ``*.wav`` a clip, every ``*.txt`` a text prompt (its stripped content); hidden files
are skipped.

Reading is model-independent: a :class:`masq_fx.app.sources.ModelSource` turns samples into its
model's batches. Each sample carries a sha256 of its content (prompt text and media file bytes;
not its path nor its answer), so a checkpoint can record what it was calibrated on and evaluation
can refuse those samples.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from masq_fx.errors import InputError, MissingFileError

Kind = Literal["text", "vision", "audio"]
KINDS: tuple[Kind, ...] = ("text", "vision", "audio")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
AUDIO_SUFFIXES = (".wav",)
TEXT_SUFFIXES = (".txt",)
KEYS = ("text", "image", "audio", "answer")


class SampleFileError(InputError):
    """A calibration or evaluation file (or folder) is malformed."""


@dataclass(frozen=True)
class FileSample:
    """One prompt: text, an image file or an audio file (with optional text), and an optional answer."""

    #: where it came from, for messages: ``data.jsonl line 3`` or the file of a folder sample
    origin: str
    #: sha256 of the prompt text and the media file's bytes (see :func:`content_sha256`)
    sha256: str
    text: str | None = None
    image: Path | None = None
    audio: Path | None = None
    answer: str | None = None

    @property
    def kind(self) -> Kind:
        """``vision`` for an image sample, ``audio`` for a clip, ``text`` otherwise."""
        return "vision" if self.image is not None else "audio" if self.audio is not None else "text"

    @property
    def where(self) -> str:
        """The origin and, for a JSONL sample with media, the media file."""
        media = self.image or self.audio
        return self.origin if media is None or str(media) == self.origin else f"{self.origin} ({media})"


def content_sha256(text: str | None, media: tuple[str, bytes] | None) -> str:
    """sha256 of a prompt: its text (UTF-8) and its media (kind and file bytes), each length-prefixed."""
    parts = ([] if text is None else [("text", text.encode())]) + ([] if media is None else [media])
    digest = hashlib.sha256()
    for key, data in parts:
        digest.update(f"{key}:{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()


def _sample(origin: str, text: str | None, image: Path | None, audio: Path | None, answer: str | None) -> FileSample:
    media = image or audio
    content = None if media is None else ("image" if image is not None else "audio", media.read_bytes())
    return FileSample(origin, content_sha256(text, content), text, image, audio, answer)


def read_samples(path: str | Path) -> list[FileSample]:
    """The samples of a JSONL file or a folder (see the module docstring); clear errors for bad input."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist: give a JSONL file or a folder of samples")
    return _read_jsonl(path)


def _read_jsonl(path: Path) -> list[FileSample]:
    samples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            samples.append(_jsonl_sample(path, number, line))
    if not samples:
        raise SampleFileError(f"{path} holds no samples: write one JSON object per line, e.g. {{\"text\": \"Hello\"}}")
    return samples


def _jsonl_sample(path: Path, number: int, line: str) -> FileSample:
    where = f"{path} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise SampleFileError(f"{where} is not valid JSON ({error.msg}): write one JSON object per line") from None
    if not isinstance(record, dict):
        raise SampleFileError(f"{where} is a JSON {type(record).__name__}, not an object like {{\"text\": \"Hello\"}}")
    unknown = sorted(set(record) - set(KEYS))
    if unknown:
        raise SampleFileError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; the keys are {', '.join(KEYS)}")
    for key, value in record.items():
        if not isinstance(value, str) or not value.strip():
            raise SampleFileError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    if "image" in record and "audio" in record:
        raise SampleFileError(f"{where} has both 'image' and 'audio': give one medium per sample (one line each)")
    if not {"text", "image", "audio"} & set(record):
        raise SampleFileError(f"{where} has no prompt: give 'text', 'image' or 'audio'")
    media = {key: _media(path, where, key, record[key]) for key in ("image", "audio") if key in record}
    return _sample(where, record.get("text"), media.get("image"), media.get("audio"), record.get("answer"))


def _media(jsonl: Path, where: str, key: str, value: str) -> Path:
    suffixes = IMAGE_SUFFIXES if key == "image" else AUDIO_SUFFIXES
    file = jsonl.parent / value
    if file.suffix.lower() not in suffixes:
        raise SampleFileError(f"{where}: {key} {value!r} is not a {'/'.join(suffixes)} file")
    if not file.is_file():
        raise MissingFileError(f"{where}: {key} {value!r} not found (looked for {file}; paths are relative to the JSONL file's folder)")
    return file


def _read_folder(folder: Path) -> list[FileSample]:
    accepted = IMAGE_SUFFIXES + AUDIO_SUFFIXES + TEXT_SUFFIXES
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    unknown = [p.name for p in entries if not p.is_file() or p.suffix.lower() not in accepted]
    if unknown:
        raise SampleFileError(
            f"{folder} holds {len(unknown)} entr{'y' if len(unknown) == 1 else 'ies'} that are no samples "
            f"({', '.join(unknown[:3])}{', …' if len(unknown) > 3 else ''}): a folder of samples holds only "
            f"{', '.join('*' + s for s in accepted)} files; use a JSONL file for anything else"
        )
    if not entries:
        raise SampleFileError(f"{folder} is empty: put {', '.join('*' + s for s in accepted)} files in it, or give a JSONL file")
    return [_folder_sample(p) for p in entries]


def _folder_sample(file: Path) -> FileSample:
    suffix = file.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return _sample(str(file), None, file, None, None)
    if suffix in AUDIO_SUFFIXES:
        return _sample(str(file), None, None, file, None)
    try:
        text = file.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise SampleFileError(f"{file} is not UTF-8 text: save it as UTF-8") from None
    if not text:
        raise SampleFileError(f"{file} is empty: a text sample needs a prompt")
    return _sample(str(file), text, None, None, None)


# ----------------------------------------------------------------------------- selection


def first_per_kind(samples: Sequence[FileSample], limit: int) -> list[FileSample]:
    """The first ``limit`` samples of each kind, in their original order."""
    seen = dict.fromkeys(KINDS, 0)
    chosen = []
    for sample in samples:
        if seen[sample.kind] < limit:
            seen[sample.kind] += 1
            chosen.append(sample)
    return chosen


@dataclass(frozen=True)
class Selection:
    """Samples chosen for calibration and the tokens of each kind they hold."""

    samples: tuple[FileSample, ...]
    #: kind → tokens of the chosen samples of that kind (prompt text of media samples included)
    tokens: dict[Kind, int]


def selection_of(samples: Sequence[FileSample], tokens: Sequence[int]) -> Selection:
    """All of ``samples`` (``tokens[i]`` tokens each) as a :class:`Selection`."""
    return Selection(tuple(samples), _totals(samples, tokens, range(len(samples))))


def _totals(samples: Sequence[FileSample], tokens: Sequence[int], chosen: Iterable[int]) -> dict[Kind, int]:
    totals: dict[Kind, int] = {}
    for i in chosen:
        totals[samples[i].kind] = totals.get(samples[i].kind, 0) + tokens[i]
    return {kind: totals[kind] for kind in KINDS if kind in totals}


def balance(samples: Sequence[FileSample], tokens: Sequence[int], budget: int) -> Selection:
    """Choose samples within ``budget`` tokens so that every kind present gets an equal share.

    ``tokens[i]`` is the token count of ``samples[i]`` (all of its tokens count toward its kind).
    The budget is split equally between the kinds present; a kind whose samples fit in less than
    its share takes them all and the rest is shared among the others again. Within its share a
    kind takes samples in their original order, skipping any that would overflow it.
    Deterministic; refuses a budget that leaves a kind without a sample, naming one that suffices.
    """
    if len(tokens) != len(samples):
        raise InputError(f"{len(samples)} samples but {len(tokens)} token counts")
    if any(n < 1 for n in tokens):
        raise InputError("every sample must have at least one token")
    groups = {kind: [i for i, s in enumerate(samples) if s.kind == kind] for kind in KINDS}
    groups = {kind: members for kind, members in groups.items() if members}
    if not groups:
        raise InputError("no samples to choose from")
    totals = {kind: sum(tokens[i] for i in members) for kind, members in groups.items()}
    shares: dict[Kind, int] = {}
    remaining, open_kinds = budget, list(groups)
    while open_kinds:
        share = remaining // len(open_kinds)
        filled = [kind for kind in open_kinds if totals[kind] <= share]
        if not filled:
            shares.update(dict.fromkeys(open_kinds, share))
            break
        for kind in filled:
            shares[kind] = totals[kind]
            remaining -= totals[kind]
            open_kinds.remove(kind)
    chosen = []
    for kind, members in groups.items():
        used = 0
        for i in members:
            if used + tokens[i] <= shares[kind]:
                used += tokens[i]
                chosen.append(i)
        if not used:
            smallest = max(min(tokens[i] for i in group) for group in groups.values())
            raise InputError(
                f"a budget of {budget} calibration tokens leaves {shares[kind]} for {kind}, less than its smallest "
                f"sample ({min(tokens[i] for i in members)} tokens); raise it to {len(groups) * smallest} tokens "
                f"(enough for a sample of each of {', '.join(groups)})"
            )
    chosen.sort()
    return Selection(tuple(samples[i] for i in chosen), _totals(samples, tokens, chosen))


def require_unseen(samples: Sequence[FileSample], calibration_hashes: Collection[str], checkpoint: str) -> None:
    """Refuse evaluation samples whose content was used to calibrate ``checkpoint``."""
    used = set(calibration_hashes)
    seen = [s for s in samples if s.sha256 in used]
    if seen:
        raise InputError(
            f"{len(seen)} of the {len(samples)} evaluation samples were calibration samples of {checkpoint} "
            f"(e.g. {seen[0].where}): scores on them would overstate accuracy; evaluate on samples the "
            "checkpoint was not calibrated on"
        )


__all__ = [
    "AUDIO_SUFFIXES",
    "IMAGE_SUFFIXES",
    "KEYS",
    "KINDS",
    "TEXT_SUFFIXES",
    "FileSample",
    "Kind",
    "SampleFileError",
    "Selection",
    "balance",
    "content_sha256",
    "first_per_kind",
    "read_samples",
    "require_unseen",
    "selection_of",
]
