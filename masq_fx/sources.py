"""Models the command line knows by name, with their calibration data and evaluation.

``default`` is the built-in tri-modal thinker (SmolLM2 + trained vision/audio towers: exact-match
accuracy per modality and text perplexity), ``smollm2`` the real SmolLM2-135M-Instruct (text
perplexity), ``tiny:FAMILY`` a tiny random model of a supported family (logit SQNR against FP: it
shows the mechanics, not accuracy), and a local folder an HF causal LM with its tokenizer (text
perplexity). Calibration and evaluation use disjoint splits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import wave
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from masq_fx.data.text import token_windows
from masq_fx.eval.perplexity import perplexity
from masq_fx.eval.sqnr import sqnr_db
from masq_fx.models import DecoderInputs, adapter_for

TINY_PREFIX = "tiny:"
Batch = dict[str, Tensor]
Decoder = Callable[[DecoderInputs], Tensor]


@dataclass(frozen=True)
class Sizes:
    """How much data a source uses (per modality for the tri-modal model)."""

    calibration: int = 32
    evaluation: int = 64
    seq_len: int = 256
    eval_windows: int = 4


@dataclass
class ModelSource:
    """A model, its processed calibration batches, and how to score a decoder graph of it."""

    name: str
    title: str
    model: nn.Module
    calibration: list[Batch]
    #: metric name → value for a decoder callable (float or quantized graph of ``model``)
    evaluate: Callable[[Decoder], dict[str, float]]
    #: token ids → text, for ``generate``
    decode: Callable[[list[int]], str]
    #: a processed prompt from text, an image file or a 16 kHz WAV file (``generate``)
    prompt: Callable[[str | None, Path | None, Path | None], Batch]
    #: the end-of-reply token (generation stops once every row produced it)
    stop_id: int | None = None


def _text_source(name: str, title: str, model: nn.Module, tokenizer, sizes: Sizes) -> ModelSource:
    adapter = adapter_for(model)
    windows = token_windows(tokenizer, "calibration", window=sizes.seq_len, count=sizes.calibration)
    evaluation = token_windows(tokenizer, "evaluation", window=512, count=sizes.eval_windows)
    return ModelSource(
        name=name,
        title=f"{title}, {sizes.calibration} × {sizes.seq_len} calibration tokens of Python reference text",
        model=model,
        calibration=[{"input_ids": row[None], "attention_mask": torch.ones_like(row[None])} for row in windows],
        evaluate=lambda decoder: {"text perplexity": perplexity(decoder, adapter, evaluation)},
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        prompt=lambda text, image, audio: _chat_prompt(tokenizer, text, image, audio),
        stop_id=tokenizer.eos_token_id,
    )


def _chat_prompt(tokenizer, text: str | None, image: Path | None, audio: Path | None) -> Batch:
    if image is not None or audio is not None or text is None:
        raise ValueError("this is a text-only model: give --prompt TEXT and no --image/--audio")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return dict(tokenizer(chat, return_tensors="pt"))


def read_image(path: Path, height: int, width: int) -> np.ndarray:
    """An image file as ``uint8 [height, width, 3]`` RGB (resized)."""
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB").resize((width, height)))
    except OSError as error:
        raise ValueError(f"{path} is not a readable image ({error}); give a PNG or JPEG file") from None


def read_wav(path: Path, sample_rate: int) -> np.ndarray:
    """A 16-bit PCM WAV file at ``sample_rate`` as float32 mono in [-1, 1]."""
    if not path.is_file():
        raise FileNotFoundError(f"audio {path} does not exist")
    try:
        with wave.open(str(path)) as w:
            rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16 if width == 2 else np.uint8)
    except (wave.Error, EOFError) as error:
        raise ValueError(f"{path} is not a readable WAV file ({error}); give 16-bit PCM WAV") from None
    if width != 2 or rate != sample_rate:
        raise ValueError(f"{path} is {8 * width}-bit at {rate} Hz; convert it to 16-bit PCM at {sample_rate} Hz (e.g. ffmpeg -ar {sample_rate})")
    return (pcm.reshape(-1, channels).mean(1) / 32768.0).astype(np.float32)


def _trimodal_source(sizes: Sizes) -> ModelSource:
    from masq_fx.trimodal import accuracy, calibration_batches, load_set, load_trimodal
    from masq_fx.trimodal.processing import IM_END

    model, processor = load_trimodal()
    adapter = adapter_for(model)
    evaluation = load_set("evaluation")
    windows = token_windows(processor.tokenizer, "evaluation", window=512, count=sizes.eval_windows)

    def evaluate(decoder: Decoder) -> dict[str, float]:
        scores = {
            f"{m} exact match": accuracy(decoder, adapter, processor, evaluation.samples(m, sizes.evaluation), progress=True).value
            for m in ("vision", "audio")
        }
        return scores | {"text perplexity": perplexity(decoder, adapter, windows)}

    return ModelSource(
        name="default",
        title=f"built-in tri-modal thinker (SmolLM2-135M + trained towers), {sizes.calibration} calibration samples per modality",
        model=model,
        calibration=calibration_batches(processor, per_modality=sizes.calibration),
        evaluate=evaluate,
        decode=processor.decode_answer,
        prompt=lambda text, image, audio: processor([_trimodal_sample(processor, text, image, audio)]),
        stop_id=IM_END,
    )


def _trimodal_sample(processor, text: str | None, image: Path | None, audio: Path | None):
    given = [name for name, value in (("--prompt", text), ("--image", image), ("--audio", audio)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"the built-in model answers one input at a time: give exactly one of --prompt, --image, --audio (got {given or 'none'})")
    if image is not None:
        return processor.sample(image=read_image(image, processor.image.height, processor.image.width))
    if audio is not None:
        return processor.sample(waveform=read_wav(audio, processor.audio.sample_rate))
    return processor.sample(text=text)


def _tiny_source(family: str, sizes: Sizes) -> ModelSource:
    from masq_fx.models.tiny import tiny_model

    tiny = tiny_model(family, seed=0, batch_size=2)
    adapter = adapter_for(tiny.model)
    inputs = adapter.decoder_inputs(tiny.batch)
    with torch.no_grad():
        reference = tiny.model(**tiny.batch).logits
    keep = inputs.attention_mask.bool()
    return ModelSource(
        name=TINY_PREFIX + family,
        title=f"tiny random {tiny.family} (random weights: shows the mechanics, not accuracy)",
        model=tiny.model,
        calibration=[tiny.batch],
        evaluate=torch.no_grad()(lambda decoder: {"logit SQNR dB": sqnr_db(reference[keep], decoder(inputs)[keep])}),
        decode=lambda ids: " ".join(map(str, ids)),
        prompt=lambda text, image, audio: dict(tiny.batch) if text is None and image is None and audio is None else _no_input(),
    )


def _no_input() -> Batch:
    raise ValueError("a tiny random model has no tokenizer or processor: omit --prompt/--image/--audio to use its example batch")


def load_source(name: str, sizes: Sizes = Sizes()) -> ModelSource:
    """The model called ``name`` on the command line (see the module docstring)."""
    if sizes.calibration < 1 or sizes.evaluation < 1:
        raise ValueError(f"calibration and evaluation sizes must be at least 1, got {sizes.calibration} and {sizes.evaluation}")
    if name == "default":
        return _trimodal_source(sizes)
    if name == "smollm2":
        from masq_fx.pretrained import load_smollm2

        model, tokenizer = load_smollm2()
        return _text_source(name, "SmolLM2-135M-Instruct (real weights)", model, tokenizer, sizes)
    if name.startswith(TINY_PREFIX):
        return _tiny_source(name[len(TINY_PREFIX) :], sizes)
    folder = Path(name)
    if not folder.is_dir():
        raise FileNotFoundError(f"model {name!r} is neither 'default', 'smollm2', 'tiny:FAMILY' nor a local model folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return _text_source(name, folder.name, model, AutoTokenizer.from_pretrained(folder), sizes)
