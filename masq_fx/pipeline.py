"""Composable graph transforms and the pipeline that orders and runs them.

A transform is a small step ``(graph_module, context) -> graph_module`` that declares what it
``requires`` and what it ``provides`` (capability names such as ``"observers"`` or ``"stats"``).
A :class:`Pipeline` runs the steps in the order the user gives, after checking with a
requires/provides graph (networkx) that every requirement is met by the context or by an
earlier step; otherwise it fails before doing any work, naming the step to add or move.

Results of transforms live in the :class:`Context` as data keyed by module name
(``context.results["layers.0.self_attn.q_proj"]["smooth_scale"]``), so they can be replayed
onto a fresh capture of the same model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import networkx as nx
import torch
from torch import fx
from tqdm.auto import tqdm

from masq_fx.calibration.stats import ModalityStats
from masq_fx.capture.dataflow import SmoothingGroup
from masq_fx.capture.decoder import CapturedDecoder
from masq_fx.models import DecoderInputs

#: capabilities a context can hold before any step runs
GRAPH = "graph"
CALIBRATION_DATA = "calibration_data"


@runtime_checkable
class Transform(Protocol):
    """One pipeline step."""

    name: str
    requires: tuple[str, ...]
    provides: tuple[str, ...]

    def __call__(self, gm: fx.GraphModule, context: Context) -> fx.GraphModule: ...


@dataclass
class StepRecord:
    name: str
    seconds: float


@dataclass
class Context:
    """State shared by the steps of one pipeline run."""

    captured: CapturedDecoder
    calibration: Sequence[DecoderInputs] = ()
    #: module name of a linear → statistics of its input (linears sharing an input share the object)
    stats: dict[str, ModalityStats] = field(default_factory=dict)
    #: smoothing groups of the float graph (filled by the step that first needs them)
    groups: list[SmoothingGroup] = field(default_factory=list)
    #: module name → named result tensors of transforms (scales, tables, quantized weights, factors)
    results: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    provided: set[str] = field(default_factory=set)
    history: list[StepRecord] = field(default_factory=list)
    #: step name → the diagnostics it records (CrossModalCompensation: its ``BranchReport`` list)
    diagnostics: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.provided.add(GRAPH)
        if self.calibration:
            self.provided.add(CALIBRATION_DATA)

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.captured.graph_module

    def result(self, module: str) -> dict[str, torch.Tensor]:
        """The (mutable) result record of ``module``, created empty on first use."""
        return self.results.setdefault(module, {})


class PipelineError(ValueError):
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

    def dependency_graph(self) -> nx.DiGraph:
        """Bipartite graph: step → capability it provides, capability → step that requires it."""
        graph = nx.DiGraph()
        for index, step in enumerate(self.steps):
            node = ("step", index)
            graph.add_node(node, name=step.name)
            for cap in step.provides:
                graph.add_edge(node, ("cap", cap))
            for cap in step.requires:
                graph.add_edge(("cap", cap), node)
        return graph

    def validate(self, available: set[str] | frozenset[str] = frozenset({GRAPH, CALIBRATION_DATA})) -> None:
        """Raise :class:`PipelineError` unless each requirement is available or provided earlier."""
        graph = self.dependency_graph()
        for index, step in enumerate(self.steps):
            for cap in step.requires:
                if cap in available:
                    continue
                providers = sorted(i for _, i in graph.predecessors(("cap", cap)) if i != index)
                earlier = [i for i in providers if i < index]
                if earlier:
                    continue
                if providers:
                    later = self.steps[providers[0]].name
                    raise PipelineError(
                        f"step {index} {step.name!r} requires {cap!r}, which step {providers[0]} {later!r} "
                        f"provides only later: move {later!r} before {step.name!r}"
                    )
                have = ", ".join(sorted(available)) or "nothing"
                raise PipelineError(
                    f"step {index} {step.name!r} requires {cap!r}, which no earlier step provides "
                    f"(the context has: {have}); add a step that provides {cap!r} before it"
                )

    def run(self, context: Context, progress: bool = True) -> Context:
        """Run every step on ``context.graph_module`` in order; returns the updated context."""
        self.validate(frozenset(context.provided))
        bar = tqdm(self.steps, desc="pipeline", unit="step", disable=not progress)
        for step in bar:
            bar.set_postfix_str(step.name)
            start = time.perf_counter()
            gm = step(context.graph_module, context)
            gm.graph.lint()
            gm.recompile()
            context.captured.graph_module = gm
            context.provided.update(step.provides)
            context.history.append(StepRecord(step.name, time.perf_counter() - start))
        return context
