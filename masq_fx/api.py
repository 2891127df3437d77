"""The one-call API: ``quantize(model, recipe, calibration) -> QuantizedModel``, ``save``, ``load``, ``generate``.

>>> from masq_fx import quantize, load
>>> qm = quantize(model, "masquant-w4a8", calibration_batches)   # batches as the model's processor returns them
>>> qm.lower()                                                     # W8A8 / W4A8 onto torchao int8 kernels
>>> tokens = qm.generate(processor_batch, max_new_tokens=16)       # KV-cache graph, mixed-modality prefill
>>> qm.save("out/")                                                # safetensors + manifest, atomic
>>> qm = load("out/", model)                                       # refuses another model

A :class:`QuantizedModel` holds the float HF model (its towers and embedding run eagerly and are never
modified), the transformed decoder graph and the recipe. The lower-level pieces (``capture``,
``Pipeline``, the transforms) compose the same way for custom pipelines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from masq_fx import checkpoint
from masq_fx.backends import CompiledGraph, LoweringReport, compile_graph, lower_to_torchao
from masq_fx.calibration.calibrate import observe
from masq_fx.capture.decoder import CapturedDecoder, capture
from masq_fx.generation import CachedDecoder, capture_cached, generate, transplant
from masq_fx.memory import available_memory, estimate_calibration_memory, require_memory
from masq_fx.models import DecoderInputs, ModelAdapter, adapter_for
from masq_fx.pipeline import Context, Pipeline
from masq_fx.recipes import Recipe, preset, recipe_steps
from masq_fx.transforms.cmc import CMCConfig
from masq_fx.transforms.gptq import GPTQConfig

Batch = Mapping[str, Tensor]

#: W4 compensation measured on the built-in tri-modal model: a modality's own scale kept on the rank's
#: channels only (``own_channels="rank"``), since full-channel scale mismatches are out of a low-rank
#: branch's reach (the spec's CMC there: vision and audio exact match 0%)
_W4_CMC = CMCConfig(rank_ratio=0.05, own_channels="rank")


def _masquant_w4(abits: int) -> Recipe:
    """MAS with learned weight clipping, learned under CMC's constraint (each modality's own scale on the
    rank's channels only), GPTQ, and that CMC."""
    recipe = preset("mas", 4, abits)
    learning = replace(recipe.learning, learn_clipping=True, own_channels_in_loop=True)
    return replace(recipe, learning=learning, gptq=GPTQConfig(), cmc=_W4_CMC)


#: named recipes. ``masquant-*`` learn per-modality scales; at 4 bits they also learn weight clipping,
#: solve the weights with GPTQ and keep one stored weight plus CMC branches (each measured to help on
#: the tri-modal model and SmolLM2; README "Measured"). ``masquant-w4a8-paper`` is the paper's method
#: as specified (MAS + CMC, ρ = 0.2, every channel's own scale), for reproduction.
#: W8A8 and W4A8 run on torchao int8 kernels after ``lower()``; W4A6 and W4A16 are reference numerics.
PRESETS: dict[str, Recipe] = {
    "rtn-w8a8": preset("rtn", 8, 8),
    "smoothquant-w8a8": preset("smoothquant", 8, 8),
    "smoothquant-w4a8": preset("smoothquant", 4, 8),
    "smoothquant-w4a8-gptq": replace(preset("smoothquant", 4, 8), gptq=GPTQConfig()),
    "masquant-w8a8": preset("mas", 8, 8),
    "masquant-w4a8": _masquant_w4(8),
    "masquant-w4a6": _masquant_w4(6),
    "masquant-w4a16": _masquant_w4(16),
    "masquant-w4a8-paper": replace(preset("mas", 4, 8), cmc=CMCConfig()),
}


def resolve_recipe(recipe: Recipe | str | os.PathLike) -> Recipe:
    """A :class:`Recipe`, a preset name, or a JSON/YAML file of :meth:`Recipe.to_dict` fields (missing ones default)."""
    if isinstance(recipe, Recipe):
        return recipe
    if str(recipe) in PRESETS:
        return PRESETS[str(recipe)]
    path = Path(recipe)
    if path.suffix in (".json", ".yaml", ".yml") and path.is_file():
        text = path.read_text()
        return Recipe.from_dict(json.loads(text) if path.suffix == ".json" else yaml.safe_load(text))
    raise ValueError(
        f"unknown recipe {str(recipe)!r}: use one of {', '.join(PRESETS)} or a .json/.yaml file of Recipe fields "
        "(Recipe.to_dict(); missing fields take their defaults)"
    )


@dataclass
class QuantizedModel:
    """A quantized multimodal model: the float HF model around a transformed decoder graph."""

    model: nn.Module
    decoder: CapturedDecoder
    recipe: Recipe
    #: the pipeline context that produced ``decoder`` (calibration inputs and statistics; None once loaded)
    context: Context | None = None
    lowering: LoweringReport | None = None
    #: content sha256 of each calibration sample (recorded in the checkpoint manifest)
    data_hashes: tuple[str, ...] = ()
    _cached: dict[tuple[int, int], CachedDecoder] = field(default_factory=dict, repr=False)
    _compiled: dict[tuple[int, int], CompiledGraph] = field(default_factory=dict, repr=False)

    @property
    def adapter(self) -> ModelAdapter:
        return adapter_for(self.model)

    def decoder_inputs(self, batch: Batch) -> DecoderInputs:
        """What the decoder graph takes for a processed ``batch`` (the towers run eagerly)."""
        with torch.no_grad():
            return self.adapter.decoder_inputs(batch)

    def logits(self, batch: Batch) -> Tensor:
        with torch.no_grad():
            return self.decoder(self.decoder_inputs(batch))

    def lower(self) -> LoweringReport:
        """Move the quantized linears onto torchao int8 kernels (W8A8, W4A8); others stay reference, with a warning."""
        if self.lowering is None:
            self.lowering = lower_to_torchao(self.decoder)
            self._cached.clear()
            self._compiled.clear()
        return self.lowering

    def generation_graph(self, batch_size: int, max_cache_len: int) -> CachedDecoder:
        """The KV-cache graph for ``batch_size`` rows and ``max_cache_len`` slots, sharing this model's modules."""
        key = (batch_size, max_cache_len)
        if key not in self._cached:
            cached = capture_cached(self.model, batch_size, max_cache_len)
            if self.recipe.method != "fp":
                transplant(self.decoder, cached)
            self._cached[key] = cached
        return self._cached[key]

    def generate(self, batch: Batch, max_new_tokens: int = 32, stop_id: int | None = None, compiled: bool = False) -> Tensor:
        """Greedy new tokens ``[batch, <= max_new_tokens]`` for a processed, left-padded ``batch``."""
        prompt = self.decoder_inputs(batch)
        rows, length = prompt.attention_mask.shape
        key = (rows, length + max_new_tokens)
        graph = self.generation_graph(*key)
        if compiled and key not in self._compiled:  # compiled once per generation graph, reused by later calls
            self._compiled[key] = compile_graph(graph.graph_module)
        run = self._compiled[key] if compiled else None
        return generate(graph, prompt, max_new_tokens, stop_id=stop_id, run=run)

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write a checkpoint (see :mod:`masq_fx.checkpoint`); needs the quantization context (not a loaded model)."""
        if self.context is None:
            raise ValueError("this model was loaded from a checkpoint; copy that folder instead of saving it again")
        if self.lowering is not None:
            raise ValueError("save before lower(): checkpoints store the reference state, which load() replays")
        return checkpoint.save(
            self.context, directory, model=self.model, recipe=self.recipe, overwrite=overwrite, data_hashes=self.data_hashes
        )


def calibration_inputs(model: nn.Module, batches: Iterable[Batch]) -> list[DecoderInputs]:
    adapter = adapter_for(model)
    with torch.no_grad():
        inputs = [adapter.decoder_inputs(batch) for batch in batches]
    if not inputs:
        raise ValueError("no calibration batches: pass at least one processed batch (a few hundred tokens per modality)")
    return inputs


def quantize(
    model: nn.Module,
    recipe: Recipe | str | os.PathLike,
    calibration: Iterable[Batch],
    progress: bool = True,
    data_hashes: Sequence[str] = (),
) -> QuantizedModel:
    """Capture ``model``'s decoder, calibrate on ``calibration`` (processed batches) and apply ``recipe``.

    ``recipe`` is a :class:`Recipe`, a preset name (:data:`PRESETS`) or a JSON file. The HF model is
    not modified. The memory calibration and the recipe need is estimated first, and a clear error
    raised (:class:`~masq_fx.memory.CalibrationMemoryError`) when it exceeds what is available.
    ``data_hashes`` (content hashes of the calibration samples) are recorded by :meth:`QuantizedModel.save`.
    """
    recipe = resolve_recipe(recipe)
    batches = list(calibration)
    captured = capture(model)
    require_memory(estimate_calibration_memory(model, captured, recipe, batches), available_memory())
    samples = calibration_inputs(model, batches)
    context = observe(Context(captured, samples), moment_modalities=recipe.moment_modalities, progress=progress)
    Pipeline(recipe_steps(recipe, progress=progress)).run(context, progress=progress)
    return QuantizedModel(model, context.captured, recipe, context, data_hashes=tuple(data_hashes))


def load(directory: str | os.PathLike, model: nn.Module) -> QuantizedModel:
    """A saved quantized model replayed onto ``model`` (which must be the model it was quantized from)."""
    decoder = checkpoint.load(directory, model)
    recipe = Recipe.from_dict(checkpoint.read_manifest(directory)["recipe"])
    return QuantizedModel(model, decoder, recipe)
