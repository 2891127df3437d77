"""Peak memory of calibration and a recipe, estimated before the work starts.

Recipes run layer by layer (:mod:`masq_fx.sequential`). What stays resident, and is counted:

* the decoder inputs of every calibration batch (embeddings, position, modality and attention
  tensors), held from calibration to the last layer;
* the observers' statistics: per observed site (linears reading one input share one) min, max
  and absmax tables, kept for every layer, plus a float64 ``d × d`` second moment per modality a
  recipe reads there (:meth:`~masq_fx.recipes.Recipe.site_moments`: CMC, GPTQ), held for the
  current layer only (the largest layer's are counted);
* the calibration streams at one layer boundary: for every batch the float activations entering
  and leaving the layer and, for MAS learning, the quantized ones, each ``rows × seq × hidden``;
* what every layer reads besides the stream, computed once before the first layer and held for every
  batch: the boolean attention mask ``rows × seq × seq`` and the rotary tables ``2 × rows × seq × head_dim``
  (float32), once per kind of layer (Gemma 3's sliding and full layers each have theirs);
* one layer pass on the largest batch: its ``heads × seq × seq`` attention tensors (2 at once without
  gradients, 6 under MAS learning's autograd, as measured on SmolLM2) and MLP intermediates (a
  linear-attention layer's chunked gated delta rule holds tensors linear in seq: 666 MiB at 2,048 tokens and
  Qwen3.5-27B's widths, ``benchmarks/gated_delta_rule.py``);
* the rotated copy of the decoder's linear weights that each distinct rotation of the recipes makes
  (:mod:`masq_fx.transforms.rotation`: the rotated float graph);
* the largest layer's transform work, one step at a time: MAS learning's quantized weights of every scale row and
  their gradients (float32), plus the weight quantizer it recomputes in the backward pass (about 8 weight-sized
  temporaries of one row); GPTQ's float64 Hessian and inverse factor (3 ``in × in``) and float32 weight; CMC's
  float64 whitened error and float32 text weight, and its eigendecompositions (about 4 ``min(in, out)²``).

Model weights are already loaded when this runs, so they are not counted; nor are the copies of
the decoder weights that transforms make (quantized codes, per-modality rows), nor allocator slack: on
SmolLM2 the measured peak stays 0.2-0.7 GiB above the estimate at 2,048 and 4,096 tokens
(``benchmarks/memory_estimate.py``).

After the work, the reference (fake-quant) path would keep each linear's float32 weights once computed;
:func:`weight_caches_fit` says whether they fit in half the free memory, and a quantized model whose caches
would not computes them per forward instead (:func:`masq_fx.nn.quant_linear.keep_weight_caches`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from masq_fx.capture.decoder import CapturedDecoder
from masq_fx.errors import CalibrationMemoryError
from masq_fx.modality import NUM_MODALITIES, Modality
from masq_fx.models import adapter_for
from masq_fx.nn.quant_linear import cached_weight_bytes
from masq_fx.recipes import Recipe

_FLOAT32 = 4
_INT64 = 8
_FLOAT64 = 8
_GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated resident bytes of calibration and a recipe (see the module docstring)."""

    batches: int
    #: decoder tokens of all batches, padding included
    tokens: int
    decoder_inputs: int
    #: observer tables of every layer, and the second moments of the largest layer
    statistics: int
    #: observed sites that keep second moments (0 when the recipe collects none)
    moment_sites: int
    moment_modalities: tuple[Modality, ...]
    #: the float (and, for MAS learning, quantized) streams at one layer boundary
    streams: int
    #: the attention masks and rotary tables of every batch, read by every layer
    layer_inputs: int
    #: one pass of a layer on the largest batch (its attention tensors, under autograd for MAS learning)
    activations: int
    #: the rotated decoder weights of the recipes' distinct rotations
    rotated_weights: int = 0
    #: the largest layer's transform work (MAS learning, GPTQ, CMC), the costliest step
    layer_work: int = 0

    @property
    def total(self) -> int:
        return self.decoder_inputs + self.statistics + self.streams + self.layer_inputs + self.activations + self.rotated_weights + self.layer_work

    def parts(self) -> str:
        """The terms, largest first, for messages."""
        moments = ", ".join(m.name.lower() for m in self.moment_modalities)
        terms = {
            f"decoder inputs of {self.batches} batches ({self.tokens} tokens)": self.decoder_inputs,
            "observer statistics"
            + (f" (float64 second moments of {moments} at {self.moment_sites} sites)" if self.moment_sites else ""): self.statistics,
            "calibration streams": self.streams,
            "attention masks and rotary tables": self.layer_inputs,
            "one layer pass on the largest batch": self.activations,
            "rotated weights": self.rotated_weights,
            "the largest layer's transform work": self.layer_work,
        }
        return ", ".join(f"{name} {_gib(size)}" for name, size in sorted(terms.items(), key=lambda t: -t[1]) if size)


#: float32 ``[heads, seq, seq]`` attention tensors a layer pass holds at its peak, measured on SmolLM2 (one sample of
#: 2,048 and 4,096 tokens, peak RSS growth against seq²): about 1.6 without gradients (scores, masked scores and
#: probabilities overlap), about 5.7 when MAS learning runs it under autograd (the saved probabilities and their
#: gradients besides); rounded up
_FORWARD_SCORES = 2
_LEARNING_SCORES = 6


def _gib(size: int) -> str:
    return f"{size / _GIB:.2f} GiB"


def observed_channels(captured: CapturedDecoder) -> list[int]:
    """Input width of every site calibration observes: one per distinct input of the decoder-layer linears."""
    return [int(captured.weights[site.linears[0]].shape[1]) for site in captured.groups()]


def _layer_work(captured: CapturedDecoder, recipes: Sequence[Recipe]) -> int:
    """Bytes of the costliest transform step on the largest layer (see the module docstring)."""
    rows = max(1, len(captured.modalities))  # scale rows of a per-modality recipe
    layers: dict[int, list[tuple[int, int]]] = {}
    for name, weight in captured.weights.items():
        layer = captured.linear_layers.get(name)
        if layer is not None:
            layers.setdefault(layer, []).append((int(weight.shape[0]), int(weight.shape[1])))
    work = 0
    for shapes in layers.values():
        sizes = [o * i for o, i in shapes]
        for recipe in recipes:
            if recipe.method == "fp":
                continue
            if recipe.method == "mas":
                work = max(work, (2 * rows * sum(sizes) + 8 * max(sizes)) * _FLOAT32)
            if recipe.gptq is not None:
                work = max(work, max(3 * i * i * _FLOAT64 + o * i * _FLOAT32 for o, i in shapes))
            if recipe.cmc is not None:
                work = max(work, max(o * i * (_FLOAT64 + _FLOAT32) + 4 * min(o, i) ** 2 * _FLOAT64 for o, i in shapes))
    return work


def estimate_calibration_memory(
    model: nn.Module, captured: CapturedDecoder, recipes: Recipe | Sequence[Recipe], batches: Sequence[Mapping[str, Tensor]]
) -> MemoryEstimate:
    """Resident bytes applying ``recipes`` to ``captured`` (the decoder of ``model``) in one layer-sequential
    pass calibrated on ``batches`` (processed, with ``input_ids``)."""
    recipes = [recipes] if isinstance(recipes, Recipe) else list(recipes)
    shapes = [tuple(batch["input_ids"].shape) for batch in batches]
    tokens = sum(rows * seq for rows, seq in shapes)
    hidden = captured.hidden_size
    width = max(w.element_size() for w in captured.weights.values()) if captured.weights else _FLOAT32
    per_token = adapter_for(model).embed_width() * width + (captured.position_rows + 2) * _INT64  # DeepStack features ride along
    channels = observed_channels(captured)
    moments = tuple(m for m in Modality if any(m in r.moment_modalities for r in recipes))
    tables = NUM_MODALITIES * _INT64  # token counts
    per_layer: dict[int | None, int] = {}
    moment_sites = 0
    for site, c in zip(captured.groups(), channels):
        kept = len(set().union(*(r.site_moments(site) for r in recipes)))
        moment_sites += kept > 0
        per_layer[site.layer] = per_layer.get(site.layer, 0) + kept * c * c * _FLOAT64
    statistics = sum(tables + 3 * NUM_MODALITIES * c * _FLOAT32 for c in channels) + max(per_layer.values(), default=0)
    streams = (2 + sum(r.method == "mas" for r in recipes)) * tokens * hidden * width
    text = adapter_for(model).text_config()
    kinds = len(set(getattr(text, "layer_types", None) or ["full_attention"]))
    layer_inputs = kinds * sum(rows * seq * (seq + 2 * captured.head_dim * _FLOAT32) for rows, seq in shapes)
    heads = int(getattr(text, "num_attention_heads", 1))
    widest = max(channels, default=hidden)
    scores = _LEARNING_SCORES if any(r.method == "mas" for r in recipes) else _FORWARD_SCORES
    activations = max((rows * (scores * heads * seq * seq + 4 * seq * widest) * _FLOAT32 for rows, seq in shapes), default=0)
    rotations = {r.rotation for r in recipes} - {None}
    weight_bytes = sum(w.numel() * w.element_size() for w in captured.weights.values())
    return MemoryEstimate(
        batches=len(shapes),
        tokens=tokens,
        decoder_inputs=tokens * per_token,
        statistics=statistics,
        moment_sites=moment_sites,
        moment_modalities=tuple(moments),
        streams=streams,
        layer_inputs=layer_inputs,
        activations=activations,
        rotated_weights=len(rotations) * weight_bytes,
        layer_work=_layer_work(captured, recipes),
    )


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """``MemAvailable`` of ``meminfo`` in bytes; ``None`` where it cannot be read (not Linux)."""
    try:
        for line in meminfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "MemAvailable":
                number, *unit = value.split()
                return int(number) * (1024 if unit == ["kB"] else 1)
    except (OSError, ValueError):
        return None
    return None


def device_memory(device: torch.device) -> int | None:
    """Free bytes where ``device``'s tensors live: CUDA's free memory, else :func:`available_memory`."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory()


def weight_caches_fit(root: nn.Module, device: torch.device) -> bool:
    """Whether the float32 weight caches of ``root``'s QuantLinears (the reference path's) take at most half of
    the memory free on ``device`` (unknown free memory: they fit)."""
    free = device_memory(device)
    return free is None or 2 * cached_weight_bytes(root) <= free


def require_memory(estimate: MemoryEstimate, available: int | None) -> None:
    """Refuse (:class:`CalibrationMemoryError`) an estimate above ``available`` bytes; ``None`` checks nothing."""
    if available is None or estimate.total <= available:
        return
    raise CalibrationMemoryError(
        f"calibration and the recipe need about {_gib(estimate.total)} ({estimate.parts()}), but only "
        f"{_gib(available)} of memory is available: use fewer or shorter calibration samples"
        + (", or a recipe without CMC/GPTQ (no second moments)" if estimate.moment_sites else "")
    )


__all__ = [
    "CalibrationMemoryError",
    "MemoryEstimate",
    "available_memory",
    "estimate_calibration_memory",
    "observed_channels",
    "require_memory",
]
