"""Models the command line knows by name, with their calibration data and evaluation.

``default`` is the built-in tri-modal thinker (SmolLM2 + trained vision/audio towers: exact-match
accuracy per modality and text perplexity), ``smollm2`` the real SmolLM2-135M-Instruct (text
perplexity), ``tiny:FAMILY`` a tiny random model of a supported family (logit SQNR against FP: it
shows the mechanics, not accuracy), and a local folder an HF model, multimodal with its processor or
text-only with its tokenizer (:mod:`masq_fx.app.folder`). Calibration and evaluation use disjoint splits.

Instead of the built-in calibration split, a source can calibrate on the user's samples (a JSONL
file or a folder, :mod:`masq_fx.data.samples`), processed by the model's own processor
(:attr:`ModelSource.process`), optionally balanced across modalities within a token budget; their
content hashes go into the checkpoint. :func:`exact_match_per_kind` scores a decoder on samples with answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

from masq_fx.data.media import read_image, read_wav
from masq_fx.data.samples import FileSample, Kind, Selection, balance, first_per_kind, read_samples, selection_of
from masq_fx.data.text import token_windows
from masq_fx.errors import InputError, MissingFileError
from masq_fx.eval.accuracy import Accuracy, exact_match
from masq_fx.eval.perplexity import perplexity
from masq_fx.eval.sqnr import sqnr_db
from masq_fx.models import DecoderInputs, adapter_for, place, resolve_device
from masq_fx.models.device import check_dtype

TINY_PREFIX = "tiny:"
#: samples per processed batch of file calibration data
FILE_BATCH = 8
Batch = dict[str, Tensor]
Decoder = Callable[[DecoderInputs], Tensor]


@dataclass(frozen=True)
class Sizes:
    """How much data a source uses (per modality for the tri-modal model)."""

    calibration: int = 32
    evaluation: int = 64
    seq_len: int = 256
    eval_windows: int = 4
    #: token budget of file calibration data, shared equally by the modalities present (None: no budget)
    calibration_tokens: int | None = None


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
    #: file samples → one processed batch (prompts left-padded), by the model's own processor
    process: Callable[[Sequence[FileSample]], Batch]
    #: the end-of-reply token (generation stops once every row produced it)
    stop_id: int | None = None
    #: content sha256 of each file calibration sample (empty for the built-in split)
    calibration_hashes: tuple[str, ...] = ()


def calibration_selection(process: Callable[[Sequence[FileSample]], Batch], path: Path, sizes: Sizes) -> Selection:
    """The samples of ``path`` to calibrate on: the first ``sizes.calibration`` of each modality, then
    balanced within ``sizes.calibration_tokens`` (tokens counted on ``process``'s batches)."""
    samples = first_per_kind(read_samples(path), sizes.calibration)
    tokens = [int(process([sample])["attention_mask"].sum()) for sample in samples]
    if sizes.calibration_tokens is None:
        return selection_of(samples, tokens)
    return balance(samples, tokens, sizes.calibration_tokens)


def _calibration(
    process: Callable[[Sequence[FileSample]], Batch],
    sizes: Sizes,
    path: Path | None,
    builtin: Callable[[], list[Batch]],
    builtin_title: str,
) -> tuple[list[Batch], tuple[str, ...], str]:
    """Calibration batches, their content hashes and a description: the built-in split, or ``path``'s samples."""
    if path is None:
        return builtin(), (), builtin_title
    chosen = calibration_selection(process, path, sizes).samples
    batches = [process(chosen[i : i + FILE_BATCH]) for i in range(0, len(chosen), FILE_BATCH)]
    kinds = {kind: sum(s.kind == kind for s in chosen) for kind in dict.fromkeys(s.kind for s in chosen)}
    counts = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    return batches, tuple(s.sha256 for s in chosen), f"{len(chosen)} calibration samples from {path} ({counts})"


def _text_source(name: str, title: str, model: nn.Module, tokenizer, sizes: Sizes, calibration: Path | None, progress: bool) -> ModelSource:
    adapter = adapter_for(model)
    adapter.check_length(sizes.seq_len, "--seq-len", "lower --seq-len")
    evaluation = token_windows(tokenizer, "evaluation", window=512, count=sizes.eval_windows)

    def windows() -> list[Batch]:
        rows = token_windows(tokenizer, "calibration", window=sizes.seq_len, count=sizes.calibration)
        return [{"input_ids": row[None], "attention_mask": torch.ones_like(row[None])} for row in rows]

    def process(samples: Sequence[FileSample]) -> Batch:
        return _chat_batch(tokenizer, title, samples)

    builtin_title = f"{sizes.calibration} × {sizes.seq_len} calibration tokens of Python reference text"
    batches, hashes, described = _calibration(process, sizes, calibration, windows, builtin_title)
    return ModelSource(
        name=name,
        title=f"{title}, {described}",
        model=model,
        calibration=batches,
        evaluate=lambda decoder: {"text perplexity": perplexity(decoder, adapter, evaluation, progress=progress)},
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        prompt=lambda text, image, audio: _chat_prompt(tokenizer, text, image, audio),
        process=process,
        stop_id=tokenizer.eos_token_id,
        calibration_hashes=hashes,
    )


def _chat_prompt(tokenizer, text: str | None, image: Path | None, audio: Path | None) -> Batch:
    if image is not None or audio is not None or text is None:
        raise InputError("this is a text-only model: give --prompt TEXT and no --image/--audio")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return dict(tokenizer(chat, return_tensors="pt"))


def _chat_batch(tokenizer, title: str, samples: Sequence[FileSample]) -> Batch:
    """Text samples as chat prompts, left-padded into one batch."""
    rows = []
    for sample in samples:
        if sample.kind != "text":
            raise InputError(f"{sample.where} is a {sample.kind} sample, but {title} is a text-only model: give it text samples only")
        rows.append(_chat_prompt(tokenizer, sample.text, None, None)["input_ids"][0])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return _left_padded(rows, pad)


def _left_padded(rows: Sequence[Tensor], pad_id: int) -> Batch:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _trimodal_source(sizes: Sizes, calibration: Path | None, dtype: torch.dtype, device: torch.device, progress: bool) -> ModelSource:
    from masq_fx.builtin.trimodal import accuracy, calibration_batches, load_set, load_trimodal
    from masq_fx.builtin.trimodal.processing import IM_END

    model, processor = load_trimodal()
    cast(nn.Module, model).to(dtype)  # PreTrainedModel.to is typed as a plain function
    place(model, device)
    adapter = adapter_for(model)
    evaluation = load_set("evaluation")
    windows = token_windows(processor.tokenizer, "evaluation", window=512, count=sizes.eval_windows)

    def evaluate(decoder: Decoder) -> dict[str, float]:
        scores = {
            f"{m} exact match": accuracy(decoder, adapter, processor, evaluation.samples(m, sizes.evaluation), progress=progress).value
            for m in ("vision", "audio")
        }
        return scores | {"text perplexity": perplexity(decoder, adapter, windows, progress=progress)}

    def process(samples: Sequence[FileSample]) -> Batch:
        return processor([_trimodal_file_sample(processor, s) for s in samples])

    # running text beside the short text questions: it calibrates what text perplexity measures (README: tri-modal rows)
    text_windows = max(1, sizes.calibration // 2)

    batches, hashes, described = _calibration(
        process,
        sizes,
        calibration,
        lambda: calibration_batches(processor, per_modality=sizes.calibration, text_windows=text_windows, window=sizes.seq_len),
        f"{sizes.calibration} calibration samples per modality and {text_windows} × {sizes.seq_len} reference-text tokens",
    )
    return ModelSource(
        name="default",
        title=f"built-in tri-modal thinker (SmolLM2-135M + trained towers), {described}",
        model=model,
        calibration=batches,
        evaluate=evaluate,
        decode=processor.decode_answer,
        prompt=lambda text, image, audio: processor([_trimodal_sample(processor, text, image, audio)]),
        process=process,
        stop_id=IM_END,
        calibration_hashes=hashes,
    )


def _trimodal_sample(processor, text: str | None, image: Path | None, audio: Path | None):
    given = [name for name, value in (("--prompt", text), ("--image", image), ("--audio", audio)) if value is not None]
    if len(given) != 1:
        raise InputError(f"the built-in model answers one input at a time: give exactly one of --prompt, --image, --audio (got {given or 'none'})")
    if image is not None:
        return processor.sample(image=read_image(image, processor.image.height, processor.image.width))
    if audio is not None:
        return processor.sample(waveform=read_wav(audio, processor.audio.sample_rate))
    return processor.sample(text=text)


def _trimodal_file_sample(processor, sample: FileSample):
    from masq_fx.builtin.trimodal.processing import QUESTIONS

    if sample.kind != "text" and sample.text not in (None, QUESTIONS[sample.kind]):
        raise InputError(
            f"{sample.where}: the built-in model asks {QUESTIONS[sample.kind]!r} about every "
            f"{'image' if sample.kind == 'vision' else 'clip'}; drop the 'text' or use that question"
        )
    text = sample.text if sample.kind == "text" else None
    return _trimodal_sample(processor, text, sample.image, sample.audio)


def _tiny_source(family: str, sizes: Sizes, calibration: Path | None, dtype: torch.dtype, device: torch.device) -> ModelSource:
    from masq_fx.models.tiny import tiny_model

    if calibration is not None:
        _no_processor()

    tiny = tiny_model(family, seed=0, batch_size=2)
    tiny.model.to(dtype)
    place(tiny.model, device)
    adapter = adapter_for(tiny.model)
    inputs = adapter.decoder_inputs(tiny.batch)
    with torch.no_grad():
        reference = tiny.model(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in tiny.batch.items()}).logits
    keep = inputs.attention_mask.bool()
    return ModelSource(
        name=TINY_PREFIX + family,
        title=f"tiny random {tiny.family} (random weights: shows the mechanics, not accuracy)",
        model=tiny.model,
        calibration=[tiny.batch],
        evaluate=torch.no_grad()(lambda decoder: {"logit SQNR dB": sqnr_db(reference[keep], decoder(inputs)[keep])}),
        decode=lambda ids: " ".join(map(str, ids)),
        prompt=lambda text, image, audio: dict(tiny.batch) if text is None and image is None and audio is None else _no_input(),
        process=lambda samples: _no_processor(),
    )


def _no_input() -> Batch:
    raise InputError("a tiny random model has no tokenizer or processor: omit --prompt/--image/--audio to use its example batch")


def _no_processor() -> Batch:
    raise InputError(
        "a tiny random model has no tokenizer or processor, so it cannot read sample files: "
        "use 'default', 'smollm2' or a local model folder"
    )


def load_source(
    name: str,
    sizes: Sizes = Sizes(),
    calibration: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ModelSource:
    """The model called ``name`` on the command line (see the module docstring), in ``dtype`` on ``device``;
    its evaluation shows progress bars if ``progress``.

    ``calibration``: a JSONL file or folder of samples (:mod:`masq_fx.data.samples`) to calibrate on
    instead of the built-in split; ``sizes.calibration`` caps its samples per modality and
    ``sizes.calibration_tokens`` balances them across modalities. Batches stay on the CPU (the API
    moves them to the model's device).
    """
    device = resolve_device(device)  # before any model is loaded
    check_dtype(device, dtype)
    if sizes.calibration < 1 or sizes.evaluation < 1:
        raise InputError(f"calibration and evaluation sizes must be at least 1, got {sizes.calibration} and {sizes.evaluation}")
    if sizes.calibration_tokens is not None and calibration is None:
        raise InputError("a calibration token budget (--calib-tokens) balances calibration files: give one (--calib PATH) too")
    calibration = None if calibration is None else Path(calibration)
    if name == "default":
        return _trimodal_source(sizes, calibration, dtype, device, progress)
    if name == "smollm2":
        from masq_fx.builtin.smollm2 import load_smollm2

        model, tokenizer = load_smollm2(dtype)
        place(model, device)
        return _text_source(name, "SmolLM2-135M-Instruct (real weights, dequantized from the shipped Q4_1 GGUF)", model, tokenizer, sizes, calibration, progress)
    if name.startswith(TINY_PREFIX):
        return _tiny_source(name[len(TINY_PREFIX) :], sizes, calibration, dtype, device)
    folder = Path(name)
    if not folder.is_dir():
        raise MissingFileError(f"model {name!r} is neither 'default', 'smollm2', 'tiny:FAMILY' nor a local model folder")
    from masq_fx.app.folder import folder_source

    return folder_source(folder, sizes, calibration, dtype, device, progress)


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__).rstrip(":")


def exact_match_per_kind(
    source: ModelSource, decoder: Decoder, samples: Sequence[FileSample], batch_size: int = 16, max_new_tokens: int = 16
) -> dict[Kind, Accuracy]:
    """Greedy exact-match accuracy of ``decoder`` per modality on ``samples`` (each with an answer), scored
    as :func:`masq_fx.eval.accuracy.exact_match` with the source's processor; ``{kind: Accuracy}`` of the kinds present."""
    adapter = adapter_for(source.model)
    return {
        kind: exact_match(
            decoder, adapter, [s for s in samples if s.kind == kind], source.process, source.decode, source.stop_id, batch_size, max_new_tokens
        )
        for kind in dict.fromkeys(s.kind for s in samples)
    }
