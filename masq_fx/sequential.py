"""Layer-sequential execution: pipelines of layer-wise steps run one decoder layer at a time.

For each decoder layer ``i``, in order:

1. the float stream (each calibration sample's activations entering layer ``i`` of the float model)
   runs through the float capture's layer ``i`` with observers on its linears' inputs: layer ``i``'s
   statistics and the float layer's outputs;
2. each pipeline's steps run with ``context.layer = i`` (they touch only layer ``i``'s linears and
   read the streams from ``context.layer_data``);
3. a pipeline with a step that asks for it (``quantized_stream = True``, as MAS learning does)
   advances its quantized stream through its transformed layer ``i``;
4. layer ``i``'s second moments and its linears' caches of dequantized weights are dropped (the
   per-channel statistics, small, stay for reports; the caches are rebuilt when the model next runs),
   the pages of its float weights are given back where they are mapped from a safetensors file
   (:mod:`masq_fx.pages`), and the float stream moves on.

A float capture rotated lazily (:func:`~masq_fx.transforms.rotation.rotate` with ``lazy=True``) gets layer ``i``'s
rotated weights, shared with every job's copy, just before step 1.

In a ``torch.distributed`` process group each rank runs this on its share of the samples and the
statistics of step 1 are those of every rank's tokens (:mod:`masq_fx.distributed`). Only one layer's
second moments and each stream's activations at one layer boundary are held at a time. Several pipelines (recipes) share one pass, so the float stream and the statistics are computed
once for all of them. The statistics are bit-identical to those of a whole-graph calibration (the
same float ops, one layer at a time).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from masq_fx.calibration.calibrate import STATS, InsertObservers, collect_stats, remove_observers
from masq_fx.capture.dataflow import SmoothingGroup
from masq_fx.capture.decoder import CapturedDecoder
from masq_fx.capture.layers import PRE, Env, Segments, advance, start
from masq_fx.distributed import located
from masq_fx.modality import Modality
from masq_fx.models import DecoderInputs
from masq_fx.nn.quant_linear import QuantLinear
from masq_fx.pages import release
from masq_fx.pipeline import CALIBRATION_DATA, Context, LayerData, Pipeline, StepRecord, Transform, run_step
from masq_fx.transforms.rotation import rotate_layer

if TYPE_CHECKING:
    from masq_fx.offload import Offload
    from masq_fx.resume import Progress


@dataclass
class Job:
    """One pipeline of layer-wise steps and the context (a copy of the float capture) it transforms."""

    context: Context
    steps: Sequence[Transform]

    @property
    def quantized_stream(self) -> bool:
        return any(getattr(step, "quantized_stream", False) for step in self.steps)


def run_layerwise(
    float_capture: CapturedDecoder,
    samples: Sequence[DecoderInputs],
    jobs: Sequence[Job],
    moment_modalities: tuple[Modality, ...],
    progress: bool = True,
    site_moments: Callable[[SmoothingGroup], Iterable[Modality]] | None = None,
    resume: Progress | None = None,
    offload: Offload | None = None,
) -> None:
    """Run every job's steps layer by layer on its context, calibrating on ``samples`` once for all.

    Second moments of ``moment_modalities`` are collected at every site, or of ``site_moments(site)`` where
    given. ``float_capture`` is read, never transformed. Each job's steps are validated first (statistics and
    calibration data count as available); afterwards each context holds every layer's statistics
    without second moments, and its history the steps' total times. With ``resume``, each job's results
    are saved after every layer, and the layers every job has saved already are replayed, not recomputed
    (:mod:`masq_fx.resume`; their statistics are observed again, without second moments). With ``offload``, each
    finished layer's rotated weights are moved to a memory-mapped file (:mod:`masq_fx.offload`).
    """
    for job in jobs:
        job.context.provided.update((STATS, CALIBRATION_DATA))
        Pipeline(job.steps).validate(job.context.provided)
    floats = Segments(float_capture.graph_module, float_capture.num_layers)
    float_last = floats.last_reader()
    job_last = [Segments(job.context.graph_module, job.context.captured.num_layers).last_reader() for job in jobs]
    with torch.no_grad():
        pre = floats(PRE)
        float_envs = [advance(env, pre.run(env), PRE, float_last) for env in map(start, samples)]
    quantized: list[list[Env] | None] = [[dict(env) for env in float_envs] if job.quantized_stream else None for job in jobs]
    seconds: list[dict[str, float]] = [defaultdict(float) for _ in jobs]
    observe = InsertObservers(moment_modalities, site_moments=site_moments)
    finished = 0 if resume is None else resume.completed(float_capture.num_layers)
    bar = tqdm(range(float_capture.num_layers), desc="layers", unit="layer", disable=not progress)
    for layer in bar:
        with located(layer):  # in a process group, errors say which rank raised them, where
            began = time.perf_counter()
            rotate_layer(float_capture, [job.context.captured for job in jobs], layer)  # a lazy rotation's turn
            segment = floats(layer)
            replayed = layer < finished
            (InsertObservers(()) if replayed else observe)(segment.module, Context(float_capture, layer=layer))
            segment.module.recompile()
            with torch.no_grad():
                float_outputs = [segment.run(env) for env in float_envs]
            observe_seconds = time.perf_counter() - began
            stats = collect_stats(segment.module, layer)  # every rank's tokens, in a process group
            remove_observers(segment.module)  # a graph module sits in a reference cycle: drop what it holds now
            for index, job in enumerate(jobs):
                seconds[index]["calibrate"] += observe_seconds
                context = job.context
                context.stats.update(stats)
                context.layer = layer
                context.layer_data = LayerData(float_envs, float_outputs, quantized[index])
                if replayed:
                    bar.set_postfix_str("replaying saved progress")
                    assert resume is not None
                    resume.restore(index, layer, context)
                else:
                    recorded = {step: len(records) for step, records in context.diagnostics.items()}
                    for step in job.steps:
                        bar.set_postfix_str(step.name)
                        seconds[index][step.name] += run_step(step, context, recompile=False)
                    if resume is not None:
                        new = {step: records[recorded.get(step, 0) :] for step, records in context.diagnostics.items()}
                        resume.save(index, layer, context, new)
                stream = quantized[index]
                if stream is not None:
                    own = Segments(context.graph_module, context.captured.num_layers)(layer)
                    with torch.no_grad():
                        quantized[index] = [advance(env, own.run(env), layer, job_last[index]) for env in stream]
                for module in context.graph_module.modules():
                    if isinstance(module, QuantLinear) and context.in_scope(module.name):
                        module.release()
            release(segment.module.state_dict(keep_vars=True).values())  # this layer's float weights, where mapped
            if offload is not None:
                offload.layer(float_capture, [job.context.captured for job in jobs], layer)
            light = {id(s): s.without_moments() for s in stats.values()}
            for job in jobs:
                job.context.stats.update({name: light[id(s)] for name, s in stats.items()})
            float_envs = [advance(env, out, layer, float_last) for env, out in zip(float_envs, float_outputs)]
            del stats, light, segment  # this layer's second moments go before the next layer's are collected
    for index, job in enumerate(jobs):
        context = job.context
        context.layer = None
        context.layer_data = None
        context.graph_module.graph.lint()
        context.graph_module.recompile()
        context.history.extend(StepRecord(name, s) for name, s in seconds[index].items())
