"""The API: ``calibrate`` once, ``apply`` many recipes (``quantize`` is both), then ``save``, ``load``, ``generate``.

>>> from masq_fx import apply, calibrate, quantize, load
>>> calibrated = calibrate(model, calibration_batches, recipes=["masquant-w4a8", "smoothquant-w4a8-gptq"])
>>> qm = apply(calibrated, "masquant-w4a8")                        # one capture, one calibration for all recipes
>>> qm = quantize(model, "masquant-w4a8", calibration_batches)   # the same for one recipe
>>> qm.lower()                                                     # W8A8 / W4A8 onto torchao int8, W4A16 onto int4 CPU kernels
>>> tokens = qm.generate(processor_batch, max_new_tokens=16)       # KV-cache graph, mixed-modality prefill
>>> qm.save("out/")                                                # safetensors + manifest, atomic
>>> qm = load("out/", model)                                       # refuses another model

A :class:`QuantizedModel` holds the float HF model (its towers and embedding run eagerly and are never
modified), the transformed decoder graph and the recipe. A :class:`Calibrated` holds the float capture
(the FP reference) and the decoder inputs of the calibration batches; :func:`apply` transforms a copy
of its graph (parameters shared) one decoder layer at a time, computing each layer's statistics as it
goes (:mod:`masq_fx.sequential`), so it can be applied any number of times; :func:`apply_all` applies
several recipes in one such pass. The lower-level pieces (``capture``, ``Pipeline``, the transforms)
compose the same way for custom pipelines.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from masq_fx import checkpoint
from masq_fx.backends import CompiledGraph, LoweringReport, compile_graph, lower_to_torchao
from masq_fx.backends.sparse import lower_sparse
from masq_fx.calibration import ModalityStats, calibration_tokens, observe
from masq_fx.calibration.calibrate import STATS
from masq_fx.capture.dataflow import SmoothingGroup
from masq_fx.capture.decoder import CapturedDecoder, capture
from masq_fx.distributed import assign, ranks, reduce, shard
from masq_fx.errors import CoverageWarning, InputError
from masq_fx.generation import CachedDecoder, capture_cached, generate, transplant
from masq_fx.memory import available_memory, estimate_calibration_memory, require_memory, weight_caches_fit
from masq_fx.modality import Modality
from masq_fx.models import DecoderInputs, ModelAdapter, adapter_for, model_device, place
from masq_fx.nn.quant_linear import keep_weight_caches
from masq_fx.offload import Offload
from masq_fx.pages import release
from masq_fx.pipeline import Context, Pipeline, Transform
from masq_fx.recipes import PRESETS, Recipe, recipe_steps, resolve_recipe
from masq_fx.resume import Progress
from masq_fx.sequential import Job, run_layerwise
from masq_fx.transforms.prepare import quant_linears
from masq_fx.transforms.rotation import rotate
from masq_fx.transforms.sparsity import sparsify

Batch = Mapping[str, Tensor]

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

    def __post_init__(self) -> None:
        # the reference path keeps every linear's float32 weights once computed (4 bytes a parameter and row);
        # where they would not fit (a 7B model: 26 GiB), each forward computes them and lets them go
        keep_weight_caches(self.decoder.graph_module, weight_caches_fit(self.decoder.graph_module, self.device))

    @property
    def adapter(self) -> ModelAdapter:
        return adapter_for(self.model)

    @property
    def device(self) -> torch.device:
        """Where the model and its graphs run (batches on any device are moved there)."""
        return model_device(self.model)

    def decoder_inputs(self, batch: Batch) -> DecoderInputs:
        """What the decoder graph takes for a processed ``batch`` (the towers run eagerly)."""
        with torch.no_grad():
            return self.adapter.decoder_inputs(batch)

    def logits(self, batch: Batch) -> Tensor:
        with torch.no_grad():
            return self.decoder(self.decoder_inputs(batch))

    def lower(self) -> LoweringReport:
        """Move the quantized linears onto integer kernels (torchao int8 for W8A8/W4A8, the int4 CPU kernel for W4A16);
        others stay reference, with a warning. Float linears reading a sparsifier go to the sparse-input kernel."""
        if self.lowering is None:
            quantized = any(True for _ in quant_linears(self.decoder.graph_module))
            self.lowering = lower_to_torchao(self.decoder) if quantized else LoweringReport()
            self.lowering.sparse = lower_sparse(self.decoder)
            self._cached.clear()
            self._compiled.clear()
        return self.lowering

    def generation_graph(self, batch_size: int, max_cache_len: int) -> CachedDecoder:
        """The KV-cache graph for ``batch_size`` rows and ``max_cache_len`` slots, sharing this model's modules."""
        key = (batch_size, max_cache_len)
        if key not in self._cached:
            cached = capture_cached(self.model, batch_size, max_cache_len)
            if self.recipe.method != "fp" or self.recipe.sparsity is not None:
                transplant(self.decoder, cached)
            if self.lowering is not None:
                lower_sparse(cached.graph_module)  # the replayed sparsifiers' readers onto the sparse-input kernel
            self._cached[key] = cached
        return self._cached[key]

    def generate(self, batch: Batch, max_new_tokens: int = 32, stop_id: int | None = None, compiled: bool = False) -> Tensor:
        """Greedy new tokens ``[batch, <= max_new_tokens]`` for a processed, left-padded ``batch``."""
        prompt = self.decoder_inputs(batch)
        rows, length = prompt.attention_mask.shape
        self.adapter.check_length(
            length + max_new_tokens, f"the prompt ({length}) plus {max_new_tokens} new tokens", "shorten the prompt or ask for fewer new tokens"
        )
        key = (rows, length + max_new_tokens)
        graph = self.generation_graph(*key)
        if compiled and key not in self._compiled:  # compiled once per generation graph, reused by later calls
            self._compiled[key] = compile_graph(graph.graph_module)
        run = self._compiled[key] if compiled else None
        return generate(graph, prompt, max_new_tokens, stop_id=stop_id, run=run)

    def save(
        self, directory: str | os.PathLike, overwrite: bool = False, source: str | None = None, extra_files: Callable[[Path], object] | None = None
    ) -> Path:
        """Write a checkpoint (see :func:`masq_fx.checkpoint.save` for ``source`` and ``extra_files``); needs the
        quantization context (not a loaded model)."""
        if self.context is None:
            raise InputError("this model was loaded from a checkpoint; copy that folder instead of saving it again")
        if self.lowering is not None:
            raise InputError("save before lower(): checkpoints store the reference state, which load() replays")
        return checkpoint.save(
            self.context,
            directory,
            model=self.model,
            recipe=self.recipe,
            overwrite=overwrite,
            data_hashes=self.data_hashes,
            source=source,
            extra_files=extra_files,
        )


def calibration_inputs(model: nn.Module, batches: Iterable[Batch], progress: bool = False) -> list[DecoderInputs]:
    """The decoder inputs of processed ``batches`` (the towers and the embedding run eagerly)."""
    adapter = adapter_for(model)
    with torch.no_grad():
        inputs = [adapter.decoder_inputs(batch) for batch in tqdm(batches, desc="decoder inputs", unit="batch", disable=not progress)]
    for index, sample in enumerate(inputs):
        adapter.check_length(sample.attention_mask.shape[1], f"calibration batch {index}", "use shorter calibration samples (--seq-len)")
    if not inputs:
        raise InputError("no calibration batches: pass at least one processed batch (a few hundred tokens per modality)")
    return inputs


@dataclass
class Calibrated:
    """A model's float capture and the decoder inputs of its calibration batches.

    What every recipe starts from: :func:`apply` transforms a copy of ``captured``, which itself stays
    the float graph (the FP reference of evaluations and reports), computing the statistics layer by
    layer as it goes (:mod:`masq_fx.sequential`).
    """

    model: nn.Module
    captured: CapturedDecoder
    samples: list[DecoderInputs]
    #: modalities whose second moments are collected besides those a recipe needs (custom pipelines)
    moment_modalities: tuple[Modality, ...]
    #: content sha256 of each calibration sample (recorded in the checkpoint manifest)
    data_hashes: tuple[str, ...] = ()
    #: the rank holding each calibration batch, in a process group (:func:`~masq_fx.distributed.assign`)
    sample_ranks: tuple[int, ...] = ()
    _stats: dict[str, ModalityStats] | None = field(default=None, repr=False)

    def seen_modalities(self) -> tuple[Modality, ...]:
        """Modalities the calibration samples have tokens of (every rank's, in a process group)."""
        local = calibration_tokens(self.samples)
        seen = torch.tensor([local[m] for m in Modality], dtype=torch.float64)
        reduce([seen], "sum", "counting the calibration tokens")
        return tuple(m for m in Modality if seen[m] > 0)

    @property
    def stats(self) -> dict[str, ModalityStats]:
        """Every decoder linear's input statistics from one whole-graph pass (computed on first use, then kept;
        second moments of :attr:`moment_modalities`). For custom whole-graph pipelines; :func:`apply` does not need them."""
        if self._stats is None:
            observed = observe(Context(self.captured, self.samples), moment_modalities=self.moment_modalities, progress=False)
            self._stats = observed.stats
        return self._stats

    def context(self) -> Context:
        """A fresh whole-graph pipeline context on a copy of the float graph, with :attr:`stats` collected."""
        return Context(self.captured.copy(), self.samples, self.sample_ranks, stats=dict(self.stats), provided={STATS})


def calibrate(
    model: nn.Module,
    calibration: Iterable[Batch],
    recipes: Iterable[Recipe | str | os.PathLike] = (),
    progress: bool = True,
    data_hashes: Sequence[str] = (),
    moment_modalities: Iterable[Modality] = (),
    device: str | torch.device | None = None,
) -> Calibrated:
    """Capture ``model``'s decoder once and compute the decoder inputs of the ``calibration`` batches.

    ``calibration`` are processed batches of the model's processor. The memory that applying ``recipes``
    needs is estimated first, and a clear error raised (:class:`~masq_fx.memory.CalibrationMemoryError`)
    when it exceeds what is available. ``moment_modalities`` adds second moments to those the recipes
    need (for custom pipelines). ``data_hashes`` (content hashes of the calibration samples) are
    recorded by :meth:`QuantizedModel.save`. ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``; ``None``:
    where the model's parameters are) is checked, with the model's dtype, before any work, and the model
    moved there; the captures, statistics and quantized state then live on it.

    In a ``torch.distributed`` process group (``torchrun``), every rank calls it with the same batches and
    keeps its share (:func:`~masq_fx.distributed.assign`: balanced by tokens per modality); :func:`apply_all`
    then reduces the statistics over the ranks at each layer (:mod:`masq_fx.distributed`).
    """
    place(model, device)
    resolved = [resolve_recipe(r) for r in recipes]
    everything = list(calibration)
    adapter = adapter_for(model)  # once: making one walks the model's modules
    owners = assign([_token_counts(adapter, b) for b in everything]) if ranks() is not None else ()
    batches = shard(everything, owners)
    captured = capture(model)
    require_memory(estimate_calibration_memory(model, captured, resolved, batches), available_memory())
    samples = calibration_inputs(model, batches, progress)
    release(model.parameters())  # the towers and embeddings ran; mapped pages are read again when needed
    moments = tuple(m for m in Modality if m in set(moment_modalities))
    return Calibrated(model, captured, samples, moments, tuple(data_hashes), owners)


def _token_counts(adapter: ModelAdapter, batch: Batch) -> list[int]:
    """Tokens of each modality in a processed batch (what its share of the work grows with)."""
    if "input_ids" not in batch:
        raise InputError("every calibration batch needs 'input_ids' (the processor's output)")
    mask = batch.get("attention_mask")
    ids = adapter.batch_modality_ids(batch)
    ids = ids if mask is None else ids[mask.bool()]
    return torch.bincount(ids.flatten().cpu(), minlength=len(Modality)).tolist()


def apply(
    calibrated: Calibrated, recipe: Recipe | str | os.PathLike, progress: bool = True, extra_steps: Sequence[Transform] = ()
) -> QuantizedModel:
    """Apply ``recipe`` to a copy of ``calibrated``'s graph, layer by layer, then ``extra_steps`` to the whole
    graph; ``calibrated`` is left as it was.

    ``recipe`` is a :class:`Recipe`, a preset name (:data:`PRESETS`) or a JSON/YAML file.
    """
    return apply_all(calibrated, [recipe], progress=progress, extra_steps=extra_steps)[0]


def apply_all(
    calibrated: Calibrated,
    recipes: Sequence[Recipe | str | os.PathLike],
    progress: bool = True,
    extra_steps: Sequence[Transform] = (),
    resume: str | os.PathLike | None = None,
    offload: bool | None = None,
) -> list[QuantizedModel]:
    """Apply every recipe of ``recipes`` in one layer-by-layer pass: the float activations and statistics
    are computed once for all of them (once per distinct rotation: a rotated recipe calibrates on its
    rotated float graph). ``extra_steps`` run on each whole graph afterwards (they see the statistics
    without second moments).

    ``resume``: a progress folder. Each layer's results are saved there as the run goes, and a run that
    finds the saved layers of the same model, recipes and calibration there continues after them
    (:mod:`masq_fx.resume`); delete the folder once the results are saved.

    ``offload``: move each finished layer's rotated weights to a memory-mapped file (:mod:`masq_fx.offload`), in the
    progress folder if there is one, else in a temporary one. ``None``: where a rotation's weights would take more
    than a quarter of the available memory."""
    resolved = [resolve_recipe(r) for r in recipes]
    saved = None if resume is None else Progress(resume, calibrated.model, resolved, calibrated.samples, calibrated.sample_ranks)
    seen = calibrated.seen_modalities()
    absent = tuple(m for m in calibrated.captured.modalities if m != Modality.TEXT and m not in seen)
    for recipe in resolved:
        if absent and recipe.modality_aware:
            names = " or ".join(m.name.lower() for m in absent)
            warnings.warn(
                f"the calibration samples have no {names} tokens, so {recipe.label} has nothing to learn for them: "
                f"{names} tokens will use the text scales and get no compensation; calibrate with {names} samples too",
                CoverageWarning,
                stacklevel=3,
            )
        if recipe.method != "fp":
            recipe.modules.require_match(calibrated.captured.decoder_linears())

    def site_moments(site: SmoothingGroup) -> tuple[Modality, ...]:  # only where a recipe reads them, of tokens there are
        wanted = set(calibrated.moment_modalities).union(*(r.site_moments(site) for r in resolved))
        return tuple(m for m in seen if m in wanted)

    if offload is None:
        available = available_memory()
        weights = sum(w.numel() * w.element_size() for w in calibrated.captured.weights.values())
        offload = any(r.rotation is not None for r in resolved) and available is not None and weights > available // 4
    jobs: dict[int, Job] = {}
    with contextlib.ExitStack() as stack:
        spill = None
        if offload:
            spill = Offload(Path(resume) / "offload" if resume is not None else Path(stack.enter_context(tempfile.TemporaryDirectory())))
        for rotation, sparsity in dict.fromkeys((r.rotation, r.sparsity) for r in resolved):  # one float pass per float graph
            floats = calibrated.captured
            if rotation is not None:
                floats = rotate(floats, rotation, lazy=True)  # each layer's weights when its turn comes
            if sparsity is not None:
                floats = sparsify(floats, sparsity, calibrated.samples, progress=progress)
            chosen = {i: r for i, r in enumerate(resolved) if (r.rotation, r.sparsity) == (rotation, sparsity)}
            group = {i: Job(Context(floats.copy(), calibrated.samples, calibrated.sample_ranks), recipe_steps(r, progress=False)) for i, r in chosen.items()}
            with warnings.catch_warnings():
                if absent:  # said once above, in plain words
                    warnings.simplefilter("ignore", CoverageWarning)
                run_layerwise(
                    floats,
                    calibrated.samples,
                    list(group.values()),
                    (),
                    progress=progress,
                    site_moments=site_moments,
                    resume=None if saved is None else saved.of(list(group)),
                    offload=spill,
                )
                for job in group.values():
                    if extra_steps:
                        Pipeline(extra_steps).run(job.context, progress=False)
            jobs.update(group)
    return [
        QuantizedModel(calibrated.model, jobs[i].context.captured, recipe, jobs[i].context, data_hashes=calibrated.data_hashes)
        for i, recipe in enumerate(resolved)
    ]


def quantize(
    model: nn.Module,
    recipe: Recipe | str | os.PathLike,
    calibration: Iterable[Batch],
    progress: bool = True,
    data_hashes: Sequence[str] = (),
    device: str | torch.device | None = None,
) -> QuantizedModel:
    """:func:`calibrate` for ``recipe`` and :func:`apply` it: capture ``model``'s decoder, calibrate on
    ``calibration`` (processed batches) and transform, on ``device`` (``None``: where the model is; the
    model is moved there). The HF model's weights are not modified."""
    recipe = resolve_recipe(recipe)
    calibrated = calibrate(model, calibration, [recipe], progress=progress, data_hashes=data_hashes, device=device)
    return apply(calibrated, recipe, progress=progress)


def load(directory: str | os.PathLike, model: nn.Module, device: str | torch.device | None = None) -> QuantizedModel:
    """A saved quantized model replayed onto ``model`` (which must be the model it was quantized from), on
    ``device`` (``None``: where the model is; the model is moved there). Checkpoints load on any device."""
    place(model, device)
    decoder = checkpoint.load(directory, model)
    recipe = Recipe.from_dict(checkpoint.read_manifest(directory)["recipe"])
    return QuantizedModel(model, decoder, recipe)


__all__ = ["PRESETS", "Calibrated", "QuantizedModel", "apply", "apply_all", "calibrate", "calibration_inputs", "load", "quantize", "resolve_recipe"]
