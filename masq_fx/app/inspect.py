"""``masq-fx inspect``: the per-modality activation report: where each modality's outlier channels are, per linear input.

For every observed site (a linear input; q/k/v share one) and every modality present it lists the
token count, the largest channel abs-max, the median channel abs-max, and the top outlier
channels. For each non-text modality it also states how far its outliers are from text's: the
overlap of the top-k channel sets and the largest per-channel ratio of abs-maxima. A small
overlap or a large ratio is the "smoothing misalignment" MASQuant is about: one smoothing scale
cannot fit both modalities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from masq_fx.calibration import ModalityStats, observe
from masq_fx.capture import capture
from masq_fx.modality import Modality
from masq_fx.models import DecoderInputs
from masq_fx.pipeline import Context


@dataclass(frozen=True)
class SiteModalitySummary:
    """One modality at one site."""

    linears: tuple[str, ...]
    modality: Modality
    tokens: int
    absmax: float
    median: float
    top: tuple[tuple[int, float], ...]  # (channel, abs-max), largest first
    #: vs text: |top-k(self) ∩ top-k(text)| / k; None for text itself or when text is absent
    overlap_with_text: float | None
    #: vs text: max over channels of max(a/b, b/a) of the abs-maxima; None as above
    max_ratio_to_text: float | None


def _sites(stats: Mapping[str, ModalityStats]) -> list[tuple[tuple[str, ...], ModalityStats]]:
    """Distinct statistics objects with the linears that share them, in first-seen order."""
    grouped: dict[int, tuple[list[str], ModalityStats]] = {}
    for module, site in stats.items():
        grouped.setdefault(id(site), ([], site))[0].append(module)
    return [(tuple(modules), site) for modules, site in grouped.values()]


def _top(absmax: torch.Tensor, k: int) -> tuple[tuple[int, float], ...]:
    values, channels = absmax.topk(min(k, absmax.numel()))
    return tuple((int(c), float(v)) for c, v in zip(channels, values))


def activation_report(stats: Mapping[str, ModalityStats], top_k: int = 4) -> list[SiteModalitySummary]:
    """Summaries of every site and every modality with tokens, in graph order."""
    rows: list[SiteModalitySummary] = []
    for linears, site in _sites(stats):
        text = site.of(Modality.TEXT) if site.count[Modality.TEXT] > 0 else None
        text_top = {c for c, _ in _top(text.absmax, top_k)} if text is not None else set()
        for modality in site.present():
            chan = site.of(modality)
            top = _top(chan.absmax, top_k)
            overlap = ratio = None
            if modality != Modality.TEXT and text is not None:
                overlap = len(text_top & {c for c, _ in top}) / len(top)
                a = chan.absmax.clamp_min(1e-6)
                b = text.absmax.clamp_min(1e-6)
                ratio = float(torch.maximum(a / b, b / a).max())
            rows.append(
                SiteModalitySummary(
                    linears=linears,
                    modality=modality,
                    tokens=chan.count,
                    absmax=float(chan.absmax.max()),
                    median=float(chan.absmax.median()),
                    top=top,
                    overlap_with_text=overlap,
                    max_ratio_to_text=ratio,
                )
            )
    return rows


def _site_label(linears: Sequence[str]) -> str:
    prefix = linears[0].rsplit(".", 1)[0]
    leaves = ",".join(name.rsplit(".", 1)[1] for name in linears)
    return f"{prefix}.{{{leaves}}}" if len(linears) > 1 else linears[0]


def format_report(rows: Sequence[SiteModalitySummary], title: str) -> str:
    """A plain-text table of :func:`activation_report` rows."""
    header = f"{'site (linear inputs)':<44} {'modality':<8} {'tokens':>7} {'max|x|':>9} {'median':>8}  {'top channels (|x|)':<40} {'∩text':>5} {'ratio':>7}"
    lines = [title, header, "-" * len(header)]
    last = None
    for row in rows:
        label = _site_label(row.linears) if row.linears != last else ""
        last = row.linears
        top = " ".join(f"{c}:{v:.3g}" for c, v in row.top)
        overlap = "" if row.overlap_with_text is None else f"{row.overlap_with_text:.2f}"
        ratio = "" if row.max_ratio_to_text is None else f"{row.max_ratio_to_text:.3g}"
        lines.append(
            f"{label:<44} {row.modality.name.lower():<8} {row.tokens:>7} {row.absmax:>9.4g} {row.median:>8.3g}  {top:<40} {overlap:>5} {ratio:>7}"
        )
    return "\n".join(lines)


def inspect_model(
    model: nn.Module, samples: Sequence[DecoderInputs], title: str, top_k: int = 4, progress: bool = True
) -> str:
    """Capture, observe ``samples`` and format the per-modality activation report."""
    context = observe(Context(capture(model), samples), progress=progress)
    return format_report(activation_report(context.stats, top_k=top_k), title)
