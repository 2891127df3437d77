"""Which calibration tokens reached the experts of each mixture-of-experts layer.

An expert's linears are observed on the tokens routed to it only, so an expert may see no token of a
modality, or none at all. A modality it saw none of uses its fallback scale row (text's, or all its tokens'
where it saw no text) and gets no compensation branch; an expert it saw no token at all is not smoothed and
keeps round-to-nearest weights. :func:`expert_coverage` counts them for the run report and the benchmarks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from masq_fx.calibration.stats import ModalityStats
from masq_fx.capture.dataflow import SmoothingGroup
from masq_fx.modality import Modality


@dataclass(frozen=True)
class ExpertCoverage:
    """The experts of one MoE layer: how many, how many saw calibration tokens of each modality, and of any."""

    layer: int
    experts: int
    #: modality → experts that saw at least one calibration token of it
    seen: Mapping[Modality, int]
    #: experts that saw no calibration token at all
    unseen: int


def expert_coverage(sites: Sequence[SmoothingGroup], stats: Mapping[str, ModalityStats], modalities: Sequence[Modality]) -> list[ExpertCoverage]:
    """Per MoE layer (in order), the coverage of its experts: one expert is one routed site whose input is the
    block's (``kind`` not ``"activation"``: its gate and up projections), read from its observer's ``stats``."""
    layers: dict[int, list[ModalityStats]] = {}
    for site in sites:
        if site.routed and site.kind != "activation" and site.layer is not None and site.linears[0] in stats:
            layers.setdefault(site.layer, []).append(stats[site.linears[0]])
    return [
        ExpertCoverage(
            layer=layer,
            experts=len(experts),
            seen={m: sum(int(s.count[m]) > 0 for s in experts) for m in modalities},
            unseen=sum(not s.present() for s in experts),
        )
        for layer, experts in sorted(layers.items())
    ]
