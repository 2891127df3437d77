"""Accuracy of the trimodal thinker per modality, and its text perplexity, for FP and quantized decoders alike.

Everything here drives a *decoder function*: ``DecoderInputs -> logits``. A
:class:`masq_fx.capture.CapturedDecoder` (float or transformed) is one; :func:`eager_decoder` makes one
from the HF model. The towers always run eagerly through :meth:`ModelAdapter.decoder_inputs`, once
per batch; greedy decoding then re-runs the whole prefix for every new token (no KV cache: slow but
exact, and it works for any captured graph). Answers are a few tokens long, so this stays cheap.

Exact match: the reply up to ``<|im_end|>``, stripped, equals the number's digits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from masq_fx.capture import CapturedDecoder
from masq_fx.data.text import token_windows
from masq_fx.eval.perplexity import perplexity
from masq_fx.modality import Modality
from masq_fx.models import DecoderInputs, ModelAdapter, adapter_for
from masq_fx.trimodal.processing import IM_END, Sample, TrimodalProcessor

DecoderFn = Callable[[DecoderInputs], torch.Tensor]


def eager_decoder(model: nn.Module) -> DecoderFn:
    """The HF model's own language model and head as a decoder function (the FP reference)."""
    adapter = adapter_for(model)
    decoder, head = adapter.language_model(), adapter.lm_head()

    @torch.no_grad()
    def run(inputs: DecoderInputs) -> torch.Tensor:
        hidden = decoder(
            inputs_embeds=inputs.inputs_embeds,
            position_ids=inputs.position_ids,
            attention_mask=inputs.attention_mask,
            use_cache=False,
        ).last_hidden_state
        return head(hidden)

    return run


def extend(inputs: DecoderInputs, tokens: torch.Tensor, adapter: ModelAdapter) -> DecoderInputs:
    """``inputs`` with one text token per row appended (``tokens`` ``[batch]``), at the next position."""
    embeds = adapter.embed(tokens[:, None]).to(inputs.inputs_embeds.dtype)
    step = inputs.position_ids[..., -1:] + 1
    return replace(
        inputs,
        inputs_embeds=torch.cat([inputs.inputs_embeds, embeds], dim=1),
        position_ids=torch.cat([inputs.position_ids, step], dim=-1),
        modality_ids=torch.cat([inputs.modality_ids, torch.full_like(tokens[:, None], int(Modality.TEXT))], dim=1),
        attention_mask=torch.cat([inputs.attention_mask, torch.ones_like(tokens[:, None])], dim=1),
    )


@torch.no_grad()
def greedy_decode(decoder: DecoderFn, adapter: ModelAdapter, prompt: DecoderInputs, max_new_tokens: int, stop_id: int = IM_END) -> torch.Tensor:
    """Greedy continuation ``[batch, <= max_new_tokens]`` of left-padded ``prompt``, re-running the full prefix each step.

    Stops early once every row has produced ``stop_id``.
    """
    inputs, out = prompt, []
    done = torch.zeros(prompt.attention_mask.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        token = decoder(inputs)[:, -1].argmax(-1)
        out.append(token)
        done |= token == stop_id
        if bool(done.all()):
            break
        inputs = extend(inputs, token, adapter)
    return torch.stack(out, dim=1)


@dataclass
class Accuracy:
    """Exact-match accuracy of one modality, with the wrong replies for inspection."""

    correct: int = 0
    total: int = 0
    #: (expected, replied) of each miss
    misses: list[tuple[str, str]] = field(default_factory=list)

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def __str__(self) -> str:
        return f"{100 * self.value:.1f}% ({self.correct}/{self.total})"

    def record(self, expected: str, reply: str) -> None:
        """Count one reply (exact match)."""
        self.total += 1
        if reply == expected:
            self.correct += 1
        else:
            self.misses.append((expected, reply))


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
    result = Accuracy()
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    for chunk in tqdm(batches, desc="accuracy", unit="batch", disable=not progress):
        if any(s.answer is None for s in chunk):
            raise ValueError("accuracy needs samples with answers")
        prompt = adapter.decoder_inputs(processor(chunk))
        replies = greedy_decode(decoder, adapter, prompt, max_new_tokens)
        for sample, ids in zip(chunk, replies.tolist()):
            result.record(sample.answer, processor.decode_answer(ids))
    return result


def text_perplexity(captured: CapturedDecoder, adapter: ModelAdapter, processor: TrimodalProcessor, window: int = 512, count: int = 8) -> float:
    """Perplexity on ``count`` windows of the evaluation split of the Python reference (``masq_fx.data.text``)."""
    windows = token_windows(processor.tokenizer, "evaluation", window=window, count=count)
    return perplexity(captured, adapter, windows)
