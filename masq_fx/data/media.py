"""Media files as arrays: images (PNG/JPEG, resized RGB) and 16-bit PCM WAV audio, with clear errors for anything else."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
from PIL import Image

from masq_fx.errors import InputError, MissingFileError


def read_image(path: Path, height: int, width: int) -> np.ndarray:
    """An image file as ``uint8 [height, width, 3]`` RGB (resized)."""
    if not path.is_file():
        raise MissingFileError(f"image {path} does not exist")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB").resize((width, height)))
    except OSError as error:
        raise InputError(f"{path} is not a readable image ({error}); give a PNG or JPEG file") from None


def read_wav(path: Path, sample_rate: int) -> np.ndarray:
    """A 16-bit PCM WAV file at ``sample_rate`` as float32 mono in [-1, 1]."""
    if not path.is_file():
        raise MissingFileError(f"audio {path} does not exist")
    try:
        with wave.open(str(path)) as w:
            rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16 if width == 2 else np.uint8)
    except (wave.Error, EOFError) as error:
        raise InputError(f"{path} is not a readable WAV file ({error}); give 16-bit PCM WAV") from None
    if width != 2 or rate != sample_rate:
        raise InputError(f"{path} is {8 * width}-bit at {rate} Hz; convert it to 16-bit PCM at {sample_rate} Hz (e.g. ffmpeg -ar {sample_rate})")
    return (pcm.reshape(-1, channels).mean(1) / 32768.0).astype(np.float32)
