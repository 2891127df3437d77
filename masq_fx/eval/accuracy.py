"""Exact-match accuracy of a decoder by greedy decoding, for FP and quantized decoders alike.

Everything here drives a *decoder function*: ``DecoderInputs -> logits``. A
:class:`~masq_fx.capture.CapturedDecoder` (float or transformed) is one; :func:`eager_decoder` makes
one from the HF model. The towers run eagerly through :meth:`ModelAdapter.decoder_inputs`, once per
batch; :func:`greedy_decode` then re-runs the whole prefix for every new token (no KV cache: slow but
exact, and it works for any captured graph; :mod:`masq_fx.generation` is the cached path). Answers
are a few tokens long, so this stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from masq_fx.errors import InputError
from masq_fx.modality import Modality
from masq_fx.models import DecoderInputs, ModelAdapter, adapter_for

DecoderFn = Callable[[DecoderInputs], torch.Tensor]


def eager_decoder(model: nn.Module) -> DecoderFn:
    """The HF model's own language model and head as a decoder function (the FP reference)."""
    adapter = adapter_for(model)
    head = adapter.lm_head()

    @torch.no_grad()
    def run(inputs: DecoderInputs) -> torch.Tensor:
        hidden = adapter.run_decoder(inputs.inputs_embeds, inputs.position_ids, inputs.attention_mask, inputs.modality_ids, use_cache=False)
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
def greedy_decode(
    decoder: DecoderFn, adapter: ModelAdapter, prompt: DecoderInputs, max_new_tokens: int, stop_id: int | None
) -> torch.Tensor:
    """Greedy continuation ``[batch, <= max_new_tokens]`` of left-padded ``prompt``, re-running the full prefix each step.

    Stops early once every row has produced ``stop_id`` (``None``: never).
    """
    inputs, out = prompt, []
    done = torch.zeros(prompt.attention_mask.shape[0], dtype=torch.bool, device=prompt.attention_mask.device)
    for _ in range(max_new_tokens):
        token = decoder(inputs)[:, -1].argmax(-1)
        out.append(token)
        if stop_id is not None:
            done |= token == stop_id
            if bool(done.all()):
                break
        inputs = extend(inputs, token, adapter)
    return torch.stack(out, dim=1)


def reply_tokens(ids: list[int], stop_id: int | None) -> list[int]:
    """A generated row up to (not including) its first ``stop_id``."""
    return ids[: ids.index(stop_id)] if stop_id is not None and stop_id in ids else ids


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


def exact_match(
    decoder: DecoderFn,
    adapter: ModelAdapter,
    samples: Sequence[Any],
    process: Callable[[Sequence[Any]], Mapping[str, torch.Tensor]],
    decode: Callable[[list[int]], str],
    stop_id: int | None,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    progress: bool = False,
) -> Accuracy:
    """Greedy exact-match accuracy of ``decoder`` on ``samples`` (each with an ``answer``).

    ``process`` turns a chunk of samples into a processed batch of the model's processor; a reply is
    its tokens up to ``stop_id``, decoded and stripped.
    """
    missing = [s for s in samples if getattr(s, "answer", None) is None]
    if missing:
        raise InputError(f"{getattr(missing[0], 'where', missing[0])!s} has no 'answer': exact match needs one on every sample")
    result = Accuracy()
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc="exact match", unit="batch", disable=not progress):
        chunk = samples[start : start + batch_size]
        with torch.no_grad():
            prompt = adapter.decoder_inputs(process(chunk))
        replies = greedy_decode(decoder, adapter, prompt, max_new_tokens, stop_id=stop_id)
        for sample, ids in zip(chunk, replies.tolist()):
            result.record(sample.answer, decode(reply_tokens(ids, stop_id)).strip())
    return result
