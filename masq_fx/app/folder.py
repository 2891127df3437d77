"""A local model folder as a command-line source: an HF model as ``save_pretrained`` writes it (or as published).

The model class is the one ``config.json`` names, checked against the supported families before any
weight is read; the weights are memory-mapped from the (sharded) safetensors files. A multimodal model
(its config has a vision or audio tower) is read with its own processor, which builds every batch from
chat prompts through the folder's chat template, one text, image or audio prompt per row. A text-only
causal LM is read with its tokenizer. Of an omni model (Qwen2.5-Omni, Qwen3-Omni) the thinker is loaded
and quantized, without the speech talker.

Built-in data of a multimodal folder, when no ``--calib`` is given: text windows of the reference text and
the shipped digit images (shown at 4 × their 56 × 112 size) asked which number they show; evaluation is
text perplexity and exact match on the evaluation split's digit images. No audio clips are built in:
calibrate an audio model's audio path with ``--calib`` samples that have audio.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from torch import nn

from masq_fx.app.sources import FILE_BATCH, Batch, Decoder, ModelSource, Sizes, _calibration, _first_line, _text_source
from masq_fx.data.media import read_wav
from masq_fx.data.processor import PROCESSOR_FILES, has_processor, load_processor
from masq_fx.data.samples import FileSample
from masq_fx.data.text import token_windows
from masq_fx.errors import InputError, MissingFileError
from masq_fx.eval.accuracy import exact_match
from masq_fx.eval.perplexity import perplexity
from masq_fx.models import adapter_for, place
from masq_fx.models.registry import check_supported

#: the question asked about a built-in digit image (and the answer's form)
DIGIT_QUESTION = "What number is in the image? Answer with the number only."
#: the question asked about a sample's image or clip when it brings no text
MEDIA_QUESTION = {"vision": "Describe the image.", "audio": "What is said in this clip?"}
#: omni models whose thinker (the text-generating part) is loaded and quantized; the talker, which turns its
#: output into speech, is not loaded
THINKERS = {
    "Qwen2_5OmniForConditionalGeneration": "Qwen2_5OmniThinkerForConditionalGeneration",
    "Qwen3OmniMoeForConditionalGeneration": "Qwen3OmniMoeThinkerForConditionalGeneration",
}
#: config attributes of a multimodal model's towers: such a folder is read with its processor
TOWER_CONFIGS = ("vision_config", "audio_config")
#: the built-in digit images are drawn at this many times their stored size
DIGIT_SCALE = 4


@dataclass(frozen=True)
class Prompt:
    """One chat prompt: text, with at most one image (a file or RGB array) or audio clip (a WAV file)."""

    text: str | None = None
    image: Path | np.ndarray | None = None
    audio: Path | None = None
    answer: str | None = None


def _check_shards(folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"{index} is not a safetensors index (no 'weight_map'): download the model's index file again") from None
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise MissingFileError(
            f"{folder} lacks {len(missing)} of the {len(files)} weight shards its index lists ({', '.join(missing[:3])}"
            f"{', …' if len(missing) > 3 else ''}): the download is incomplete; download those files again"
        )


def _model_class(folder: Path, config: Any) -> type[nn.Module]:
    import transformers
    from transformers import AutoModelForCausalLM

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            check_supported(getattr(transformers, THINKERS.get(name, name)))
            return cls
    if type(config) in AutoModelForCausalLM._model_mapping:
        causal = cast(type[nn.Module], AutoModelForCausalLM._model_mapping[type(config)])
        check_supported(causal)
        return causal
    raise InputError(
        f"{folder}'s config.json names no model class transformers {transformers.__version__} has "
        f"(architectures: {getattr(config, 'architectures', None)}): use a transformers version that has it, or fix 'architectures'"
    )


def _config(folder: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise InputError(f"{folder} is not an HF model folder transformers can read ({_first_line(error)}): it needs a config.json") from None


def load_model(folder: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The supported model in ``folder`` (an omni model's thinker), in eval mode; its weights memory-mapped
    when ``dtype`` is theirs. Checks the class and the shards before reading any weight."""
    import transformers

    config = _config(folder)
    cls = _model_class(folder, config)
    _check_shards(folder)
    options: dict[str, Any] = {}
    if cls.__name__ in THINKERS:  # the thinker's own class, its weights read from under ``thinker.``
        options = {"config": config.thinker_config, "key_mapping": {r"^thinker\.": ""}}
        cls = getattr(transformers, THINKERS[cls.__name__])
    try:
        return cast(nn.Module, cls.from_pretrained(folder, dtype=dtype, **options).eval())  # type: ignore[attr-defined]
    except OSError as error:
        raise MissingFileError(f"{folder}'s weights cannot be read ({_first_line(error)}): download the model's safetensors files again") from None


def folder_source(folder: Path, sizes: Sizes, calibration: Path | None, dtype: torch.dtype, device: torch.device, progress: bool) -> ModelSource:
    """The model in ``folder`` (see the module docstring), in ``dtype`` on ``device``."""
    from transformers import AutoTokenizer

    config = _config(folder)
    cls = _model_class(folder, config)
    _check_shards(folder)
    multimodal = cls.__name__ in THINKERS or any(hasattr(config, tower) for tower in TOWER_CONFIGS)
    if multimodal:
        if not has_processor(folder):
            raise InputError(
                f"{folder} holds a multimodal {cls.__name__} but no processor: copy the model's processor files "
                f"({' or '.join(PROCESSOR_FILES)}, tokenizer files, chat template) into it"
            )
        processor = load_processor(folder)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError) as error:
            raise InputError(f"{folder} has no usable tokenizer ({_first_line(error)}): copy the model's tokenizer files into it") from None
    model = load_model(folder, dtype)
    place(model, device)
    if not multimodal:
        return _text_source(str(folder), folder.name, model, tokenizer, sizes, calibration, progress)
    return _processor_source(folder, model, processor, sizes, calibration, progress)


class _Chat:
    """Chat prompts of one model, processed by its own processor into left-padded batches."""

    def __init__(self, folder: Path, processor: Any, model: nn.Module) -> None:
        self.folder = folder
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.images = getattr(processor, "image_processor", None) is not None
        extractor = getattr(processor, "feature_extractor", None)
        self.sample_rate: int | None = None if extractor is None else int(extractor.sampling_rate)
        if getattr(processor, "chat_template", None) is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise InputError(f"{folder} has no chat template: copy the model's chat_template.jinja (or its tokenizer_config.json) into it")
        self.stop_id = self._turn_end(model)

    def _turn_end(self, model: nn.Module) -> int | None:
        """The token that ends an assistant turn: the last of the model's end-of-sequence ids in a chat rendered
        with a reply (the one closing it; the tokenizer's end of sequence if none is found)."""
        generation = getattr(model, "generation_config", None)
        ends = getattr(generation, "eos_token_id", None)
        candidates = set(ends if isinstance(ends, list) else [] if ends is None else [ends])
        if self.tokenizer.eos_token_id is not None:
            candidates.add(self.tokenizer.eos_token_id)
        chat = [{"role": "user", "content": [{"type": "text", "text": "1"}]}, {"role": "assistant", "content": [{"type": "text", "text": "2"}]}]
        rendered = self.processor.apply_chat_template(chat, tokenize=False)
        ids = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        return next((i for i in reversed(ids) if i in candidates and i != self.tokenizer.pad_token_id), self.tokenizer.eos_token_id)

    def _content(self, prompt: Prompt | FileSample, kind: str) -> list[dict[str, str]]:
        content: list[dict[str, str]] = []
        if prompt.image is not None:
            content.append({"type": "image"})
        if prompt.audio is not None:
            content.append({"type": "audio"})
        text = prompt.text if prompt.text is not None else MEDIA_QUESTION.get(kind)
        if text is not None:
            content.append({"type": "text", "text": text})
        return content

    def __call__(self, prompts: Sequence[Prompt | FileSample]) -> Batch:
        """One batch of ``prompts``, each a user turn ending where the assistant's reply starts."""
        texts, images, audio = [], [], []
        for prompt in prompts:
            kind = "vision" if prompt.image is not None else "audio" if prompt.audio is not None else "text"
            where = getattr(prompt, "where", "the prompt")
            if prompt.image is not None:
                if not self.images:
                    raise InputError(f"{where} has an image, but the model in {self.folder} takes no images: give it text or audio")
                images.append(_image(prompt.image))
            if prompt.audio is not None:
                if self.sample_rate is None:
                    raise InputError(f"{where} has audio, but the model in {self.folder} takes no audio: give it text or images")
                audio.append(read_wav(prompt.audio, self.sample_rate))
            chat = [{"role": "user", "content": self._content(prompt, kind)}]
            texts.append(self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
        media: dict[str, Any] = {}
        if images:
            media["images"] = images
        if audio:
            media["audio"] = audio
        return dict(self.processor(text=texts, padding=True, return_tensors="pt", **media))

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


def _image(image: Path | np.ndarray) -> Image.Image:
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    if not image.is_file():
        raise MissingFileError(f"image {image} does not exist")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except OSError as error:
        raise InputError(f"{image} is not a readable image ({error}); give a PNG or JPEG file") from None


def _digit_prompts(split: str, count: int) -> list[Prompt]:
    """The shipped ``split``'s first ``count`` digit images, enlarged, with their question and answer."""
    from masq_fx.builtin.trimodal.data import load_set

    shipped = load_set(split)  # type: ignore[arg-type]
    prompts = []
    for image, number in zip(shipped.vision_images[:count], shipped.vision_numbers[:count]):
        height, width = image.shape[:2]
        large = np.asarray(Image.fromarray(image).resize((DIGIT_SCALE * width, DIGIT_SCALE * height), Image.Resampling.BICUBIC))
        prompts.append(Prompt(DIGIT_QUESTION, large, answer=str(int(number))))
    return prompts


def _processor_source(folder: Path, model: nn.Module, processor: Any, sizes: Sizes, calibration: Path | None, progress: bool) -> ModelSource:
    chat = _Chat(folder, processor, model)
    adapter = adapter_for(model)
    adapter.check_length(sizes.seq_len, "--seq-len", "lower --seq-len")
    windows = token_windows(chat.tokenizer, "evaluation", window=512, count=sizes.eval_windows)
    digits = _digit_prompts("evaluation", sizes.evaluation) if chat.images else []

    def builtin() -> list[Batch]:
        rows = token_windows(chat.tokenizer, "calibration", window=sizes.seq_len, count=sizes.calibration)
        batches: list[Batch] = [{"input_ids": row[None], "attention_mask": torch.ones_like(row[None])} for row in rows]
        if chat.images:
            images = _digit_prompts("calibration", sizes.calibration)
            batches += [chat(images[i : i + FILE_BATCH]) for i in range(0, len(images), FILE_BATCH)]
        return batches

    media = "and as many digit images " if chat.images else ""
    builtin_title = f"{sizes.calibration} × {sizes.seq_len} calibration tokens of reference text {media}(no built-in audio)"
    batches, hashes, described = _calibration(chat, sizes, calibration, builtin, builtin_title)

    def evaluate(decoder: Decoder) -> dict[str, float]:
        scores = {}
        if digits:
            accuracy = exact_match(decoder, adapter, digits, chat, chat.decode, chat.stop_id, progress=progress)
            scores["vision exact match"] = accuracy.value
        return scores | {"text perplexity": perplexity(decoder, adapter, windows, progress=progress)}

    def prompt(text: str | None, image: Path | None, audio: Path | None) -> Batch:
        if text is None and image is None and audio is None:
            raise InputError("give a prompt: --prompt TEXT, --image FILE or --audio FILE (with --prompt as its question if you like)")
        if image is not None and audio is not None:
            raise InputError("give one medium per prompt: --image or --audio, not both")
        return chat([Prompt(text, image, audio)])

    return ModelSource(
        name=str(folder),
        title=f"{folder.name} ({type(model).__name__}), {described}",
        model=model,
        calibration=batches,
        evaluate=evaluate,
        decode=chat.decode,
        prompt=prompt,
        process=chat,
        stop_id=chat.stop_id,
        calibration_hashes=hashes,
    )

