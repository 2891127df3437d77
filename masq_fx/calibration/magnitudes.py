"""Magnitude statistics of activations for sparsification: histograms of ``|x|`` and counts of zeroed entries.

:class:`MagnitudeObserver` gathers a log-spaced histogram of an activation's magnitudes over the valid tokens,
from which :meth:`AbsHistogram.quantile` reads a threshold (TEAL's: the ``s``-quantile zeroes a fraction
``s`` of the entries). :class:`ZeroTally` counts, per modality, the entries a sparsifier set to zero.
:func:`run_probes` runs samples through a graph with such modules attached to some of its nodes, then
removes them again (even when interrupted).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, fx, nn
from tqdm.auto import tqdm

from masq_fx.calibration.calibrate import reduce_over_ranks
from masq_fx.calibration.observer import ModalityObserver
from masq_fx.capture.dataflow import token_context
from masq_fx.distributed import reduce
from masq_fx.modality import NUM_MODALITIES
from masq_fx.models import DecoderInputs

_PROBE_PREFIX = "masq_fx_probe_"


class AbsHistogram:
    """Counts of ``|x|`` in ``bins`` log-spaced bins over ``[2^low, 2^high]`` (values outside go to the end bins)."""

    def __init__(self, bins: int = 4096, low: float = -32.0, high: float = 16.0) -> None:
        self.low, self.high = low, high
        self.counts = torch.zeros(bins, dtype=torch.float64)

    def update(self, x: Tensor) -> None:
        logs = x.detach().abs().float().clamp_min(2.0**self.low).log2().clamp(self.low, self.high)
        self.counts += torch.histc(logs, bins=self.counts.numel(), min=self.low, max=self.high).double().cpu()

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def quantile(self, q: float) -> float:
        """The magnitude below which a fraction ``q`` of the recorded entries lie (log-interpolated in its bin)."""
        if self.total == 0:
            raise ValueError("the histogram is empty: no tokens reached it")
        cumulative = self.counts.cumsum(0)
        target = q * self.total
        index = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64)).clamp(max=self.counts.numel() - 1))
        before = float(cumulative[index - 1]) if index > 0 else 0.0
        within = (target - before) / max(float(self.counts[index]), 1.0)
        width = (self.high - self.low) / self.counts.numel()
        return float(2.0 ** (self.low + (index + min(max(within, 0.0), 1.0)) * width))


class MagnitudeObserver(nn.Module):
    """Histogram of its input's magnitudes over the tokens with a nonzero attention mask; returns ``None``."""

    _is_impure = True

    def __init__(self) -> None:
        super().__init__()
        self.histogram = AbsHistogram()

    def forward(self, x: Tensor, modality_ids: Tensor, attention_mask: Tensor) -> None:
        self.histogram.update(x[attention_mask != 0])


class ZeroTally(nn.Module):
    """Per modality: entries seen and entries equal to zero, over the tokens with a nonzero attention mask."""

    _is_impure = True

    def __init__(self) -> None:
        super().__init__()
        self.entries = torch.zeros(NUM_MODALITIES, dtype=torch.float64)
        self.zeros = torch.zeros(NUM_MODALITIES, dtype=torch.float64)

    def forward(self, x: Tensor, modality_ids: Tensor, attention_mask: Tensor) -> None:
        valid = attention_mask != 0
        zeros = (x == 0).sum(-1).double()
        for m in range(NUM_MODALITIES):
            tokens = valid & (modality_ids == m)
            self.entries[m] += float(tokens.sum()) * x.shape[-1]
            self.zeros[m] += float(zeros[tokens].sum())


def reduce_probes(probes: Iterable[nn.Module]) -> None:
    """In a process group, turn each rank's probes (the same, in the same order, on every rank) into those of
    every rank's tokens (calibration probes; a measurement on one rank's samples stays that rank's)."""
    probes = list(probes)
    reduce_over_ranks([p.stats for p in probes if isinstance(p, ModalityObserver) and p.stats is not None])
    tables: list[Tensor] = []
    for probe in probes:
        if isinstance(probe, MagnitudeObserver):
            tables.append(probe.histogram.counts)
        elif isinstance(probe, ZeroTally):
            tables += [probe.entries, probe.zeros]
    reduce(tables, "sum", "reducing the activation magnitudes")


@torch.no_grad()
def run_probes(gm: fx.GraphModule, probes: Mapping[fx.Node, nn.Module], samples: Iterable[DecoderInputs], desc: str, progress: bool = True) -> None:
    """Run ``samples`` through ``gm`` with each probe called on its node's output ``(x, modality_ids, attention_mask)``.

    The probe nodes and modules are removed afterwards, so the graph is left as it was.
    """
    added: list[fx.Node] = []
    try:
        for index, (node, probe) in enumerate(probes.items()):
            target = f"{_PROBE_PREFIX}{index}"
            gm.add_submodule(target, probe)
            with gm.graph.inserting_after(node):
                added.append(gm.graph.call_module(target, (node, *token_context(gm, node))))
        gm.recompile()
        for sample in tqdm(samples, desc=desc, unit="sample", disable=not progress):
            gm(*sample.args())
    finally:
        for node in added:
            target = str(node.target)
            gm.graph.erase_node(node)
            gm.delete_submodule(target)
        gm.recompile()
