"""Composable graph transforms and the pipeline that orders and runs them.

A transform is a small step ``(graph_module, context) -> graph_module`` that declares the
:class:`Capability` values it ``requires`` and ``provides``, and optionally those it ``invalidates``
(results it makes stale, e.g. new scales drop solved weights) and ``consumes`` (scaffolding it
removes, e.g. calibration removes the observers). A :class:`Pipeline` checks the whole order before
any step runs: every requirement must be met by the context or an earlier step, and no step may
invalidate what an earlier step provided unless a later step provides it again; otherwise it fails
naming the step to add or move.

The results of the steps live in the transformed graph's modules (quantized linears, routers,
replaced norm parameters); :mod:`masq_fx.replay` installs them onto a fresh capture by module name.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import fx
from tqdm.auto import tqdm

from masq_fx.capture.decoder import CapturedDecoder
from masq_fx.capture.layers import Env
from masq_fx.errors import InputError
from masq_fx.models import DecoderInputs

if TYPE_CHECKING:
    from masq_fx.calibration.stats import ModalityStats


class Capability(StrEnum):
    """What a context holds: steps require, provide, invalidate and consume these."""

    #: the captured float graph (every context has it)
    GRAPH = "graph"
    #: the float graph's rotations (:mod:`masq_fx.transforms.rotation`)
    ROTATED = "rotated"
    #: decoder inputs of calibration samples
    CALIBRATION_DATA = "calibration_data"
    OBSERVERS = "observers"
    #: per-modality input statistics of every decoder linear
    STATS = "stats"
    QUANT_LINEARS = "quant_linears"
    WEIGHT_QUANT = "weight_quant"
    ACT_QUANT = "act_quant"
    SCALES = "scales"
    LEARNED_SCALES = "learned_scales"
    #: the scales projected onto CMC's own-channel constraint
    SCALES_PROJECTED = "cmc_scales_projected"
    #: integer weights solved for the current scales (GPTQ)
    SOLVED_WEIGHTS = "solved_weights"
    #: cross-modal compensation branches for the current scales and weights
    CMC = "cmc"


#: capabilities a context can hold before any step runs
GRAPH = Capability.GRAPH
CALIBRATION_DATA = Capability.CALIBRATION_DATA


@runtime_checkable
class Transform(Protocol):
    """One pipeline step."""

    name: str
    requires: tuple[Capability, ...]
    provides: tuple[Capability, ...]

    def __call__(self, gm: fx.GraphModule, context: Context) -> fx.GraphModule: ...


@dataclass
class StepRecord:
    name: str
    seconds: float


@dataclass
class LayerData:
    """The calibration streams at the decoder layer a layer-sequential run is at (one env per sample).

    ``float_inputs``/``float_outputs``: the float model's activations entering and leaving the layer;
    ``quantized_inputs``: those entering it from the layers already transformed (``None`` unless a step
    asks for them with ``quantized_stream = True``).
    """

    float_inputs: list[Env]
    float_outputs: list[Env]
    quantized_inputs: list[Env] | None = None


@dataclass
class Context:
    """State shared by the steps of one pipeline run.

    ``layer`` is set while a layer-sequential run (:mod:`masq_fx.sequential`) transforms that decoder
    layer: steps then touch only its linears (:meth:`in_scope`) and read its calibration streams from
    ``layer_data``; ``None`` means the whole graph at once.
    """

    captured: CapturedDecoder
    calibration: Sequence[DecoderInputs] = ()
    #: the rank holding each calibration sample, in a process group (empty without one)
    sample_ranks: tuple[int, ...] = ()
    #: module name of a linear → statistics of its input (linears sharing an input share the object)
    stats: dict[str, ModalityStats] = field(default_factory=dict)
    provided: set[Capability] = field(default_factory=set)
    history: list[StepRecord] = field(default_factory=list)
    #: step name → the diagnostics it records (CrossModalCompensation: its ``BranchReport`` list)
    diagnostics: dict[str, list[Any]] = field(default_factory=dict)
    layer: int | None = None
    layer_data: LayerData | None = None

    def __post_init__(self) -> None:
        self.provided.add(GRAPH)
        if self.calibration:
            self.provided.add(CALIBRATION_DATA)

    def in_scope(self, name: str) -> bool:
        """Whether the linear ``name`` is one this run of the steps may touch."""
        return self.layer is None or self.captured.linear_layers.get(name) == self.layer

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.captured.graph_module


class PipelineError(InputError):
    """The steps cannot run in the given order."""


class Pipeline:
    """Runs transforms in the given order after validating their declared dependencies."""

    def __init__(self, steps: Sequence[Transform]) -> None:
        for step in steps:
            if not isinstance(step, Transform):
                raise TypeError(
                    f"{step!r} is not a transform: it needs `name`, `requires`, `provides` and "
                    "`__call__(graph_module, context) -> graph_module`"
                )
        self.steps = list(steps)

    def validate(self, available: Iterable[str] = (GRAPH, CALIBRATION_DATA)) -> None:
        """Raise :class:`PipelineError` unless every step's requirements are met in order and nothing an
        earlier step provided is invalidated without being provided again later."""
        have: set[str] = set(available)
        provider: dict[str, int] = {}  # capability → the step that provided it last
        for index, step in enumerate(self.steps):
            for needed in step.requires:
                if needed not in have:
                    raise PipelineError(self._missing(index, needed, have))
            for cap in _invalidates(step):
                if cap in provider and not any(cap in later.provides for later in self.steps[index + 1 :]):
                    earlier = self.steps[provider[cap]].name
                    raise PipelineError(
                        f"step {index} {step.name!r} invalidates {str(cap)!r}, which step {provider[cap]} {earlier!r} "
                        f"provided and no later step provides again: move {step.name!r} before {earlier!r}"
                    )
            for dropped in (*_invalidates(step), *_consumes(step)):
                have.discard(dropped)
                provider.pop(dropped, None)
            have.update(step.provides)
            provider.update((cap, index) for cap in step.provides)

    def _missing(self, index: int, cap: str, have: set[str]) -> str:
        step = self.steps[index]
        later = next((i for i in range(index + 1, len(self.steps)) if cap in self.steps[i].provides), None)
        if later is not None:
            name = self.steps[later].name
            return f"step {index} {step.name!r} requires {str(cap)!r}, which step {later} {name!r} provides only later: move {name!r} before {step.name!r}"
        held = ", ".join(sorted(map(str, have))) or "nothing"
        return (
            f"step {index} {step.name!r} requires {str(cap)!r}, which no earlier step provides "
            f"(at that point the context has: {held}); add a step that provides {str(cap)!r} before it"
        )

    def run(self, context: Context, progress: bool = True) -> Context:
        """Run every step on ``context.graph_module`` in order; returns the updated context."""
        self.validate(context.provided)
        bar = tqdm(self.steps, desc="pipeline", unit="step", disable=not progress)
        for step in bar:
            bar.set_postfix_str(step.name)
            context.history.append(StepRecord(step.name, run_step(step, context)))
        return context


def run_step(step: Transform, context: Context, recompile: bool = True) -> float:
    """Run one step on ``context`` and update what it provides; its wall time in seconds.

    ``recompile=False`` leaves the graph's Python code stale (a layer-sequential run executes
    segments cut from the graph, and recompiles once at the end).
    """
    start = time.perf_counter()
    gm = step(context.graph_module, context)
    if recompile:
        gm.graph.lint()
        gm.recompile()
    context.captured.graph_module = gm
    context.provided.difference_update((*_invalidates(step), *_consumes(step)))
    context.provided.update(step.provides)
    return time.perf_counter() - start


def _invalidates(step: Transform) -> tuple[str, ...]:
    return tuple(getattr(step, "invalidates", ()))


def _consumes(step: Transform) -> tuple[str, ...]:
    return tuple(getattr(step, "consumes", ()))
