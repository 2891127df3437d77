"""Observer insertion and the calibration runner: the first two transforms of every pipeline.

:class:`InsertObservers` adds one :class:`~masq_fx.calibration.ModalityObserver` node per distinct
linear input (q/k/v share one, gate/up share one); each takes ``(x, modality_ids,
attention_mask)`` from the graph's own placeholders. :class:`Calibrate` feeds the calibration
samples through the graph, collects the statistics into ``context.stats`` (keyed by the module
name of every linear that reads the observed input) and removes the observer nodes again, even
when interrupted, so the graph is left as it was. The statistics are float32 (second moments
float64) whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import fx
from tqdm.auto import tqdm

from masq_fx.calibration.observer import ModalityObserver
from masq_fx.calibration.stats import ModalityStats
from masq_fx.capture.dataflow import SmoothingGroup, token_context
from masq_fx.capture.decoder import MODULE_KEY
from masq_fx.distributed import reduce
from masq_fx.errors import InputError
from masq_fx.modality import Modality
from masq_fx.pipeline import CALIBRATION_DATA, GRAPH, Capability, Context

OBSERVERS = Capability.OBSERVERS
STATS = Capability.STATS
OBSERVER_PREFIX = "masq_fx_observer_"
_SITES_KEY = "masq_fx.observed_linears"


@dataclass
class InsertObservers:
    """Insert a modality-partitioned observer on the input of every decoder linear.

    ``moment_modalities``: modalities whose second moment ``Σ xᵀx`` is tracked (the CMC
    whitening needs the non-text ones); ``site_moments``, if given, names them per site instead (only
    where a step reads them: a ``d × d`` float64 matrix per site and modality is the bulk of calibration
    memory). ``include_head``: observe ``lm_head``'s input too.
    """

    moment_modalities: tuple[Modality, ...] = (Modality.VISION, Modality.AUDIO)
    include_head: bool = False
    site_moments: Callable[[SmoothingGroup], Iterable[Modality]] | None = None
    name: str = "insert_observers"
    requires: tuple[Capability, ...] = (GRAPH,)
    provides: tuple[Capability, ...] = (OBSERVERS,)

    def __call__(self, gm: fx.GraphModule, context: Context) -> fx.GraphModule:
        graph = gm.graph
        nodes = {n.meta[MODULE_KEY]: n for n in graph.nodes if MODULE_KEY in n.meta}
        # linears whose inputs come from the same node (q/k/v; gate/up: one site) share one observer,
        # which watches the tensor the first of them actually reads
        for index, site in enumerate(context.captured.groups(include_head=self.include_head)):
            if not context.in_scope(site.linears[0]):
                continue
            tensor = nodes[site.linears[0]].args[0]
            assert isinstance(tensor, fx.Node)
            target = f"{OBSERVER_PREFIX}{index}"
            moments = self.moment_modalities if self.site_moments is None else self.site_moments(site)
            gm.add_submodule(target, ModalityObserver(moments))
            with graph.inserting_after(tensor):
                observer = graph.call_module(target, (tensor, *token_context(gm, tensor)))
            observer.meta[_SITES_KEY] = site.linears
        return gm


def observer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.find_nodes(op="call_module") if str(n.target).startswith(OBSERVER_PREFIX)]


def remove_observers(gm: fx.GraphModule) -> None:
    """Erase every observer node and submodule."""
    for node in observer_nodes(gm):
        target = str(node.target)
        gm.graph.erase_node(node)
        gm.delete_submodule(target)
    gm.recompile()


@dataclass
class Calibrate:
    """Run the calibration samples through the graph and keep the observers' statistics."""

    progress: bool = True
    name: str = "calibrate"
    requires: tuple[Capability, ...] = (OBSERVERS, CALIBRATION_DATA)
    provides: tuple[Capability, ...] = (STATS,)
    consumes: tuple[Capability, ...] = (OBSERVERS,)

    def __call__(self, gm: fx.GraphModule, context: Context) -> fx.GraphModule:
        nodes = observer_nodes(gm)
        if not nodes:
            raise RuntimeError("the graph has no observers: run InsertObservers before Calibrate")
        try:
            gm.recompile()
            with torch.no_grad():
                for sample in tqdm(context.calibration, desc="calibrate", unit="sample", disable=not self.progress):
                    gm(*sample.args())
            context.stats.update(collect_stats(gm))
        finally:
            remove_observers(gm)
        return gm


def collect_stats(gm: fx.GraphModule, layer: int | None = None) -> dict[str, ModalityStats]:
    """Module name of every linear an observer of ``gm`` watched → what it recorded (shared per site).

    In a process group the statistics are those of every rank's tokens (:func:`reduce_over_ranks`;
    ``layer`` names where in its errors). Raises :class:`InputError` when a site saw NaN/Inf activations.
    """
    observers = [gm.get_submodule(str(node.target)) for node in observer_nodes(gm)]
    reduce_over_ranks([o.stats for o in observers if isinstance(o, ModalityObserver) and o.stats is not None], layer)
    found: dict[str, ModalityStats] = {}
    for node in observer_nodes(gm):
        observer = gm.get_submodule(str(node.target))
        assert isinstance(observer, ModalityObserver)
        stats = observer.stats
        if stats is None:
            continue
        if not bool(torch.isfinite(stats.absmax).all()):
            raise InputError(
                f"NaN/Inf activations reach {', '.join(node.meta[_SITES_KEY])}: the float model already "
                "overflows on the calibration data (check the inputs, and the dtype: use bfloat16 or "
                "float32, not float16)"
            )
        for module in node.meta[_SITES_KEY]:
            found[module] = stats
    return found


def reduce_over_ranks(stats: Sequence[ModalityStats], layer: int | None = None) -> None:
    """Turn each rank's ``stats`` (the same sites, in the same order on every rank) into the statistics of all
    ranks' tokens, in place: maxima and minima exactly, counts and second moments summed. Nothing without a
    process group."""
    what = "reducing the observers' statistics"
    reduce([t for s in stats for t in (s.absmax, s.max)], "max", what, layer)
    reduce([s.min for s in stats], "min", what, layer)
    reduce([s.count for s in stats], "sum", what, layer)
    # a modality no rank saw has zero moments everywhere already: only the others travel
    reduce([t for s in stats for m, t in s.moments.items() if s.count[m] > 0], "sum", what, layer)


def calibration_tokens(samples: Iterable) -> dict[Modality, int]:
    """Number of (unpadded) tokens of each modality in a set of decoder inputs."""
    counts = {m: 0 for m in Modality}
    for sample in samples:
        valid = sample.attention_mask.bool()
        for m in Modality:
            counts[m] += int(((sample.modality_ids == int(m)) & valid).sum())
    return counts


def observe(
    context: Context,
    moment_modalities: tuple[Modality, ...] = (Modality.VISION, Modality.AUDIO),
    progress: bool = True,
) -> Context:
    """Insert observers and calibrate: ``context.stats`` gets every decoder linear's input statistics."""
    from masq_fx.pipeline import Pipeline

    return Pipeline([InsertObservers(moment_modalities), Calibrate(progress=progress)]).run(context, progress=False)
