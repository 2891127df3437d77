"""A markdown report of one quantization run: recipe, per-layer SQNR plot, CMC diagnostics, stage times, metrics.

>>> qm = quantize(model, "masquant-w4a8", calibration_batches)
>>> report = build(qm, title="my model", metrics={"FP32": {...}, "masquant-w4a8": {...}})
>>> report.write("runs/w4a8")          # runs/w4a8/report.md embedding runs/w4a8/sqnr.png

The SQNR is that of every decoder layer's output against the float model, per modality, pooled over
the given samples (the calibration inputs by default). The CMC section lists the effective rank and
whitened relative error of every low-rank branch; models or recipes without branches have none. Sparsified
models get the achieved activation sparsity, model level and per layer and site, per modality.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from masq_fx.api import QuantizedModel
from masq_fx.calibration import ModalityStats
from masq_fx.calibration.calibrate import calibration_tokens
from masq_fx.calibration.coverage import ExpertCoverage, expert_coverage
from masq_fx.capture.decoder import CapturedDecoder, capture
from masq_fx.errors import InputError
from masq_fx.eval.sqnr import per_modality_layer_sqnr
from masq_fx.files import write_atomically
from masq_fx.modality import Modality
from masq_fx.models import DecoderInputs
from masq_fx.pipeline import StepRecord
from masq_fx.recipes import Recipe
from masq_fx.transforms.cmc import BranchReport
from masq_fx.transforms.rotation import rotate, rotation_record
from masq_fx.transforms.sparsity import SiteSparsity, SparsityRecord, achieved_sparsity, apply_sparsity, model_sparsity, sparsity_record

REPORT_FILE = "report.md"
PLOT_FILE = "sqnr.png"
_COLORS = {Modality.TEXT: "tab:blue", Modality.VISION: "tab:orange", Modality.AUDIO: "tab:green"}

Metrics = Mapping[str, Mapping[str, float]]


@dataclass(frozen=True)
class ModalitySQNR:
    """SQNR of one modality over the decoder layers (dB)."""

    modality: Modality
    mean_db: float
    min_db: float
    min_layer: int
    tokens: int


@dataclass(frozen=True)
class ModalityCMC:
    """CMC branches of one modality."""

    modality: Modality
    branches: int
    mean_rank: float
    mean_effective_rank: float
    mean_relative_error: float
    #: branch multiply-adds per token of this modality, relative to all decoder linears' dense ones
    overhead: float


@dataclass(frozen=True)
class RunReport:
    """Everything the report shows; :func:`build` makes one from a :class:`~masq_fx.api.QuantizedModel`."""

    title: str
    recipe: Recipe
    #: timed stages in run order (capture, calibration, then the recipe's steps)
    stages: tuple[StepRecord, ...]
    #: (layer, modality) → output SQNR in dB (+inf where the layer is exact)
    sqnr: Mapping[tuple[int, Modality], float]
    #: tokens of each modality the SQNR pools over
    tokens: Mapping[Modality, int]
    #: samples the SQNR pools over
    samples: int
    #: decoder linear (module name) → weight elements, the denominator of the CMC overhead
    linear_params: Mapping[str, int]
    branches: tuple[BranchReport, ...] = ()
    #: modality the model has → the observed sites (first linear of each) that saw no calibration token of it
    uncovered: Mapping[Modality, tuple[str, ...]] = field(default_factory=dict)
    #: model name → metric → value, as the CLI prints them ("exact match" metrics are fractions)
    metrics: Metrics = field(default_factory=dict)
    #: the fraction of each sparsifier's input zeroed, per modality, over the samples (sparsified graphs)
    sparsity: tuple[SiteSparsity, ...] = ()
    #: per MoE layer, the experts that calibration tokens of each modality reached
    experts: tuple[ExpertCoverage, ...] = ()

    @property
    def modalities(self) -> tuple[Modality, ...]:
        """Modalities with SQNR values, in :class:`Modality` order."""
        return tuple(sorted({m for _, m in self.sqnr}))

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for layer, _ in self.sqnr}))

    def sqnr_summary(self) -> list[ModalitySQNR]:
        rows = []
        for modality in self.modalities:
            values = {layer: db for (layer, m), db in self.sqnr.items() if m == modality}
            worst = min(values, key=values.__getitem__)
            mean = sum(values.values()) / len(values)
            rows.append(ModalitySQNR(modality, mean, values[worst], worst, self.tokens.get(modality, 0)))
        return rows

    def cmc_summary(self) -> list[ModalityCMC]:
        dense = sum(self.linear_params.values())
        rows = []
        for modality in sorted({b.modality for b in self.branches}):
            mine = [b for b in self.branches if b.modality == modality]
            extra = sum(b.overhead * self.linear_params[b.module] for b in mine)
            rows.append(
                ModalityCMC(
                    modality=modality,
                    branches=len(mine),
                    mean_rank=sum(b.rank for b in mine) / len(mine),
                    mean_effective_rank=sum(b.effective_rank for b in mine) / len(mine),
                    mean_relative_error=sum(b.relative_error for b in mine) / len(mine),
                    overhead=extra / dense,
                )
            )
        return rows

    def plot(self, out: IO[bytes]) -> None:
        """The per-layer SQNR plot as PNG, one line per modality (non-interactive Agg canvas)."""
        figure = Figure(figsize=(8, 4.5), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        drawn = False
        for modality in self.modalities:
            layers = [layer for layer, m in sorted(self.sqnr) if m == modality]
            values = [self.sqnr[layer, modality] for layer in layers]
            finite = [v if math.isfinite(v) else math.nan for v in values]  # exact layers leave a gap
            drawn |= any(math.isfinite(v) for v in finite)
            axes.plot(layers, finite, marker="o", markersize=3, color=_COLORS[modality], label=_name(modality))
        if not drawn:
            axes.text(0.5, 0.5, "every layer is exact (∞ dB)", ha="center", va="center", transform=axes.transAxes)
        axes.set_xlabel("decoder layer")
        axes.set_ylabel("output SQNR vs float (dB)")
        axes.set_title(f"Per-layer output SQNR, {self.recipe.label}")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
        figure.savefig(out, format="png", dpi=120)

    def markdown(self, image: str = PLOT_FILE) -> str:
        """The report; ``image`` is the path of the SQNR plot relative to the markdown file."""
        parts = [f"# {self.title}", _recipe_section(self.recipe), self._sqnr_section(image)]
        if self.uncovered:
            parts.append(self._coverage_section())
        if self.experts:
            parts.append(self._experts_section())
        if self.branches:
            parts.append(self._cmc_section())
        if self.sparsity:
            parts.append(self._sparsity_section())
        parts += [self._stage_section(), _metrics_section(self.metrics)]
        return "\n\n".join(parts) + "\n"

    def write(self, directory: str | os.PathLike) -> Path:
        """Write ``report.md`` and ``sqnr.png`` into ``directory`` (created if missing), each atomically."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(folder / PLOT_FILE, self.plot)
        report = folder / REPORT_FILE
        write_atomically(report, lambda out: out.write(self.markdown(PLOT_FILE).encode()))
        return report

    def _coverage_section(self) -> str:
        lines = [
            "## Calibration coverage",
            "",
            "Observed sites that saw no calibration token of a modality the model has: their tokens of it use the "
            "text scales and get no compensation. Add calibration samples of that modality.",
            "",
            "| modality | sites without tokens | sites |",
            "|---|---:|---|",
        ]
        for modality, sites in self.uncovered.items():
            shown = ", ".join(sites[:4]) + (f", … ({len(sites) - 4} more)" if len(sites) > 4 else "")
            lines.append(f"| {_name(modality)} | {len(sites)} | {_cell(shown)} |")
        return "\n".join(lines)

    def _experts_section(self) -> str:
        modalities = list(self.experts[0].seen)
        lines = [
            "## Experts",
            "",
            "Experts of each mixture-of-experts layer that calibration tokens of each modality were routed to. An "
            "expert calibrated without a modality uses its fallback scales for it and gets no compensation; one "
            "no token reached is not smoothed and keeps round-to-nearest weights.",
            "",
            "| layer | experts | " + " | ".join(f"with {_name(m)} tokens" for m in modalities) + " | without tokens |",
            "|---:|---:|" + "---:|" * len(modalities) + "---:|",
        ]
        for row in self.experts:
            lines.append(f"| {row.layer} | {row.experts} | " + " | ".join(str(row.seen[m]) for m in modalities) + f" | {row.unseen} |")
        return "\n".join(lines)

    def _sqnr_section(self, image: str) -> str:
        tokens = ", ".join(f"{self.tokens.get(m, 0)} {_name(m)}" for m in self.modalities)
        lines = [
            "## Per-layer output SQNR",
            "",
            (
                f"SQNR of every decoder layer's output against the float model, 10·log10(signal / error power), "
                f"pooled over {self.samples} sample{'s' if self.samples != 1 else ''} ({tokens} tokens). "
                "Higher is better."
            ),
            "",
            f"![per-layer output SQNR per modality]({image})",
            "",
            "| modality | mean over layers (dB) | worst layer (dB) | tokens |",
            "|---|---:|---:|---:|",
        ]
        for row in self.sqnr_summary():
            worst = f"{_db(row.min_db)} (layer {row.min_layer})"
            lines.append(f"| {_name(row.modality)} | {_db(row.mean_db)} | {worst} | {row.tokens} |")
        lines += ["", "<details><summary>SQNR per layer (dB)</summary>", ""]
        lines.append("| layer | " + " | ".join(_name(m) for m in self.modalities) + " |")
        lines.append("|---:|" + "---:|" * len(self.modalities))
        for layer in self.layers:
            cells = [_db(self.sqnr[layer, m]) if (layer, m) in self.sqnr else "—" for m in self.modalities]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines += ["", "</details>"]
        return "\n".join(lines)

    def _cmc_section(self) -> str:
        lines = [
            "## Cross-modal compensation",
            "",
            (
                "One text weight per linear plus a low-rank branch per other modality. Effective rank: exp(entropy "
                "of the whitened error's normalised singular values); relative error: whitened residual after the "
                "branch; overhead: branch multiply-adds per token of that modality, relative to the decoder "
                "linears' dense ones."
            ),
            "",
            "| modality | branches | mean rank | mean effective rank | mean relative error | overhead |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in self.cmc_summary():
            lines.append(
                f"| {_name(row.modality)} | {row.branches} | {row.mean_rank:.1f} | {row.mean_effective_rank:.2f} | "
                f"{row.mean_relative_error:.4f} | {100 * row.overhead:.2f}% |"
            )
        lines += [
            "",
            "<details><summary>every branch</summary>",
            "",
            "| linear | modality | rank | effective rank | relative error | overhead |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for b in self.branches:
            lines.append(
                f"| `{b.module}` | {_name(b.modality)} | {b.rank} | {b.effective_rank:.2f} | "
                f"{b.relative_error:.4f} | {100 * b.overhead:.2f}% |"
            )
        lines += ["", "</details>"]
        return "\n".join(lines)

    def sparsity_summary(self) -> dict[Modality, float]:
        """Per modality: the fraction of the decoder linears' weight rows skipped per token (sites weighed by size)."""
        return model_sparsity(self.sparsity, self.linear_params)

    def _sparsity_section(self) -> str:
        modalities = list(self.sparsity_summary())
        lines = [
            "## Activation sparsity",
            "",
            "The fraction of each sparsified linear input that is zero, per modality, over the report's samples. Model "
            "level: the decoder linears' weight rows skipped per token, each site weighed by its linears' size.",
            "",
            "| modality | model level |",
            "|---|---:|",
        ]
        lines += [f"| {_name(m)} | {100 * v:.1f}% |" for m, v in self.sparsity_summary().items()]
        lines += ["", "<details><summary>per layer and site</summary>", ""]
        lines.append("| layer | site | linears | level | " + " | ".join(_name(m) for m in modalities) + " |")
        lines.append("|---:|---|---|---:|" + "---:|" * len(modalities))
        for entry in self.sparsity:
            site = entry.site
            cells = [f"{100 * entry.achieved[m]:.1f}%" if m in entry.achieved else "—" for m in modalities]
            short = ", ".join(name.rsplit(".", 1)[-1] for name in site.linears)
            lines.append(f"| {site.layer} | {site.role} | {short} | {100 * site.level:.1f}% | " + " | ".join(cells) + " |")
        lines += ["", "</details>"]
        return "\n".join(lines)

    def _stage_section(self) -> str:
        total = sum(s.seconds for s in self.stages)
        lines = ["## Time per stage", "", "| stage | seconds | share |", "|---|---:|---:|"]
        for stage in self.stages:
            share = stage.seconds / total if total > 0 else 0.0
            lines.append(f"| {stage.name} | {stage.seconds:.2f} | {100 * share:.1f}% |")
        lines.append(f"| **total** | **{total:.2f}** | 100.0% |")
        return "\n".join(lines)


def in_basis_of(reference: CapturedDecoder, decoder: CapturedDecoder) -> CapturedDecoder:
    """The float ``reference`` with the residual-stream rotations of ``decoder`` (a recipe's Hadamard rotation,
    LaRoSA's per-layer bases), nothing sparsified or quantized: its layer outputs are in ``decoder``'s basis, so
    per-layer SQNRs compare like with like (an orthogonal change of basis leaves each SQNR unchanged)."""
    gm = decoder.graph_module
    rotation, sparsity = rotation_record(gm), sparsity_record(gm)
    if rotation is not None:
        return rotate(reference, rotation.config)
    if sparsity is not None and sparsity.plan.roles is not None:
        rotated = reference.copy()
        dense = replace(sparsity.plan, sites=tuple(replace(site, level=0.0) for site in sparsity.plan.sites))
        apply_sparsity(rotated.graph_module, SparsityRecord(sparsity.config, dense, sparsity.bases, sparsity.thresholds))
        rotated.graph_module.recompile()
        return rotated
    return reference


def build(
    quantized: QuantizedModel,
    *,
    title: str,
    samples: Sequence[DecoderInputs] | None = None,
    reference: CapturedDecoder | None = None,
    metrics: Metrics | None = None,
    progress: bool = False,
) -> RunReport:
    """Measure and collect the report of a model that :func:`masq_fx.api.quantize` returned (a progress bar over
    the SQNR samples if ``progress``).

    ``samples``: decoder inputs the SQNR pools over (default: the calibration inputs; pass a few to
    bound the time, two forward passes each). ``reference``: the float capture of ``quantized.model``
    (captured here if omitted). ``metrics``: model name → metric → value, shown as the final table.
    """
    context = quantized.context
    if context is None:
        raise InputError(
            "this model was loaded from a checkpoint and has no quantization context (stage times, CMC "
            "diagnostics): build the report from the QuantizedModel that quantize() returned"
        )
    samples = list(context.calibration if samples is None else samples)
    if not samples:
        raise InputError(
            "no samples to measure the SQNR on: pass at least one DecoderInputs (e.g. qm.decoder_inputs(batch))"
        )
    reference = capture(quantized.model) if reference is None else reference
    decoder = quantized.decoder
    routed = {name for site in decoder.sites if site.routed for name in site.linears}  # experts: counted apart
    stages = [StepRecord("capture", decoder.capture_seconds)] if decoder.capture_seconds > 0 else []
    return RunReport(
        title=title,
        recipe=quantized.recipe,
        stages=tuple(stages + list(context.history)),
        sqnr=per_modality_layer_sqnr(in_basis_of(reference, decoder), decoder, samples, progress=progress),
        tokens={m: n for m, n in calibration_tokens(samples).items() if n > 0},
        samples=len(samples),
        linear_params={name: reference.weights[name].numel() for name in reference.decoder_linears()},
        branches=tuple(r for records in context.diagnostics.values() for r in records if isinstance(r, BranchReport)),
        uncovered=uncovered_sites({n: s for n, s in context.stats.items() if n not in routed}, decoder.modalities),
        metrics=dict(metrics or {}),
        sparsity=tuple(achieved_sparsity(decoder, samples, progress=False)) if sparsity_record(decoder.graph_module) else (),
        experts=tuple(expert_coverage(decoder.sites, context.stats, decoder.modalities)),
    )


def uncovered_sites(stats: Mapping[str, ModalityStats], modalities: Sequence[Modality]) -> dict[Modality, tuple[str, ...]]:
    """Modality → the observed sites (first linear of each) whose statistics count no token of it."""
    sites: dict[int, tuple[str, ModalityStats]] = {}
    for name, site in stats.items():
        sites.setdefault(id(site), (name, site))
    found = {m: tuple(name for name, site in sites.values() if int(site.count[m]) == 0) for m in modalities if m != Modality.TEXT}
    return {m: names for m, names in found.items() if names}


def recipe_settings(recipe: Recipe) -> list[tuple[str, str]]:
    """(setting, value) rows of the recipe's key settings."""
    w, a = recipe.weight, recipe.activation
    layout = "per channel" if w.group_size is None else f"groups of {w.group_size}"
    weights = f"{w.bits}-bit, {layout}, {'symmetric' if w.symmetric else 'asymmetric'}, {w.grid} grid"
    rows = [
        ("method", recipe.method),
        ("weights", weights + (", clip search" if w.clip_search else "")),
        ("activations", "float (weight-only)" if a is None else f"{a.bits}-bit, {_words(a.granularity)}, {a.grid} grid"),
    ]
    if recipe.method in ("smoothquant", "mas-init", "mas"):
        s = recipe.smoothing
        shared = "per modality" if s.per_modality else "shared by all modalities"
        rows.append(("smoothing", f"{_words(s.variant)}, {shared}, α {s.alpha:g}, sites {', '.join(s.kinds)}"))
    if recipe.method == "mas":
        ln = recipe.learning
        loss = " / ".join(f"{_name(m)} {v:g}" for m, v in zip(Modality, ln.loss_weights))
        clipping = f", learned clipping (lr {ln.clip_lr:g}, ratio ≥ {ln.min_clip_ratio:g})" if ln.learn_clipping else ""
        tied = ", under CMC's own-channel constraint" if ln.own_channels_in_loop else ""
        rows.append(("MAS learning", f"{ln.epochs} epochs, lr {ln.lr:g}, loss weights {loss}, {ln.normalization}{clipping}{tied}"))
    if recipe.cmc is not None:
        c = recipe.cmc
        rank = f"rank {c.rank}" if c.rank is not None else f"rank ratio {0.2 if c.rank_ratio is None else c.rank_ratio:g}"
        whiten = f"whitened (damping {c.damping:g})" if c.whiten else "unwhitened"
        rows.append(("CMC", f"{rank}, floor {c.rank_floor}, {whiten}, target {c.target}, branch input {c.branch_input}"
                     + ("" if c.factor_bits is None else f", {c.factor_bits}-bit factors")
                     + ("" if c.own_channels is None else f", own scale on {c.own_channels} channels")))
    gptq = recipe.gptq
    rows.append(("GPTQ", "off" if gptq is None else f"damping {gptq.damping:g}, block {gptq.block_size}"))
    include = ", ".join(f"`{p}`" for p in recipe.modules.include)
    exclude = ", ".join(f"`{p}`" for p in recipe.modules.exclude) or "none"
    rows.append(("quantized linears", f"include {include}; exclude {exclude}"))
    if recipe.rotation is not None:
        r = recipe.rotation
        parts = [name for name, on in (("residual", r.residual), ("heads", r.heads), ("down_proj online", r.down)) if on]
        rows.append(("rotation", f"{r.kind}, seed {r.seed}: {', '.join(parts)}"))
    if recipe.sparsity is not None:
        sp = recipe.sparsity
        level = f"levels {sp.levels[0]:g} / {sp.levels[1]:g}" if sp.levels is not None else f"target {sp.target:g}"
        extra = f", bases per {sp.granularity}, covariance of {sp.covariance}" if sp.method == "larosa" else ""
        rows.append(("activation sparsity", f"{sp.method}, {level} (block inputs / inner){extra}"))
    return rows


def _recipe_section(recipe: Recipe) -> str:
    lines = [f"## Recipe: {recipe.label}", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in recipe_settings(recipe)]
    lines += [
        "",
        "<details><summary>recipe JSON (Recipe.to_dict)</summary>",
        "",
        "```json",
        json.dumps(recipe.to_dict(), indent=2),
        "```",
        "",
        "</details>",
    ]
    return "\n".join(lines)


def _metrics_section(metrics: Metrics) -> str:
    if not metrics:
        return "## Final metrics\n\nNot evaluated."
    names = list(dict.fromkeys(m for scores in metrics.values() for m in scores))
    lines = ["## Final metrics", "", "| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for model, scores in metrics.items():
        cells = [_metric(name, scores[name]) if name in scores else "—" for name in names]
        lines.append(f"| {_cell(model)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _metric(name: str, value: float) -> str:
    return f"{100 * value:.1f}%" if "exact match" in name else f"{value:.3f}"


def _db(value: float) -> str:
    return "∞" if value == math.inf else f"{value:.2f}"


def _words(identifier: str) -> str:
    return identifier.replace("_", " ")


def _name(modality: Modality) -> str:
    return modality.name.lower()


def _cell(text: str) -> str:
    """Table-safe text: a ``|`` (in a regex, say) would end the cell."""
    return text.replace("|", "\\|")


