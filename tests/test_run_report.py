"""The run report: SQNR plot, CMC diagnostics, stage times and metrics written as markdown + PNG."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from masq_fx.api import quantize
from masq_fx.app.run_report import PLOT_FILE, REPORT_FILE, RunReport, build
from masq_fx.modality import Modality
from masq_fx.models.tiny import tiny_model
from masq_fx.pipeline import StepRecord
from masq_fx.recipes import Recipe, preset
from masq_fx.transforms.cmc import BranchReport, CMCConfig
from masq_fx.transforms.gptq import GPTQConfig
from masq_fx.transforms.quantize import ModuleFilter

METRICS = {
    "FP32": {"vision exact match": 0.914, "text perplexity": 15.25},
    "masquant|w4a8": {"vision exact match": 0.875, "text perplexity": 16.5},
}


@pytest.fixture(scope="module")
def omni(one_thread):
    tiny = tiny_model("qwen2.5-omni-thinker", seed=0, batch_size=2)
    return tiny.model, tiny.batch


@pytest.fixture(scope="module")
def omni_quantized(omni):
    model, batch = omni
    return quantize(model, "masquant-w4a8", [batch], progress=False)


@pytest.fixture(scope="module")
def omni_report(omni_quantized):
    return build(omni_quantized, title="tiny Omni thinker", metrics=METRICS)


@pytest.fixture(scope="module")
def llama(one_thread):
    tiny = tiny_model("llama", seed=0, batch_size=2)
    return tiny.model, tiny.batch


def section(markdown: str, heading: str) -> str:
    """The text of the ``## heading`` section, up to the next one."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", markdown, re.MULTILINE | re.DOTALL)
    assert match, f"no section {heading!r}"
    return match.group(1)


def table_row(text: str, first_cell: str) -> list[str]:
    """Cells after the first of the table row starting with ``first_cell``."""
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, (first_cell, rows)
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", rows[0])[2:-1]]  # an escaped \| stays in its cell


def test_multimodal_report_has_every_section(omni_quantized, omni_report, tmp_path):
    path = omni_report.write(tmp_path / "run")
    assert path == tmp_path / "run" / REPORT_FILE
    assert sorted(p.name for p in path.parent.iterdir()) == [REPORT_FILE, PLOT_FILE]
    with Image.open(path.parent / PLOT_FILE) as image:
        assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 200
    markdown = path.read_text()
    assert markdown.startswith("# tiny Omni thinker\n")
    assert "## Recipe: mas W4A8 +clip +tied +GPTQ +CMC +rot\n" in markdown and omni_quantized.recipe.label == "mas W4A8 +clip +tied +GPTQ +CMC +rot"
    assert f"![per-layer output SQNR per modality]({PLOT_FILE})" in markdown

    sqnr = section(markdown, "Per-layer output SQNR")
    for modality in ("text", "vision", "audio"):
        mean, worst, tokens = table_row(sqnr, modality)
        assert math.isfinite(float(mean)) and math.isfinite(float(worst.split()[0])) and int(tokens) > 0
    for layer in (0, 1):
        assert all(math.isfinite(float(cell)) for cell in table_row(sqnr, str(layer)))

    cmc = section(markdown, "Cross-modal compensation")
    branches = omni_quantized.context.diagnostics["cmc"]
    for modality in (Modality.VISION, Modality.AUDIO):
        mine = [b for b in branches if b.modality == modality]
        count, _, effective_rank, relative_error, overhead = table_row(cmc, modality.name.lower())
        assert int(count) == len(mine) == 12  # 2 layers × (q, k, v, o, gate, up)
        assert float(effective_rank) == pytest.approx(sum(b.effective_rank for b in mine) / 12, abs=0.005)
        assert 0 < float(relative_error) < 1 and 0 < float(overhead.rstrip("%")) < 100
    assert "`layers.1.mlp.up_proj` | audio" in cmc

    stages = section(markdown, "Time per stage")
    names = ["capture"] + [record.name for record in omni_quantized.context.history]
    assert names[:3] == ["capture", "calibrate", "prepare_quant_linears"] and "cmc" in names  # summed over the layers
    rows = [line.split("|")[1].strip() for line in stages.splitlines() if line.startswith("| ")]
    assert rows == ["stage", *names, "**total**"]
    assert table_row(stages, "**total**")[1] == "100.0%"

    metrics = section(markdown, "Final metrics")
    assert table_row(metrics, "FP32") == ["91.4%", "15.250"]
    assert table_row(metrics, r"masquant\|w4a8") == ["87.5%", "16.500"]  # a | would end the cell


def test_text_only_report_has_no_cmc_and_no_other_modalities(llama, tmp_path):
    model, batch = llama
    recipe = replace(preset("mas-init", 4, 8), cmc=CMCConfig())
    report = build(quantize(model, recipe, [batch], progress=False), title="tiny llama")
    assert report.modalities == (Modality.TEXT,) and report.branches == ()
    markdown = report.write(tmp_path).read_text()
    assert "## Cross-modal compensation" not in markdown
    assert not re.search(r"^\| (vision|audio) ", markdown, re.MULTILINE)
    assert "| layer | text |" in markdown
    assert section(markdown, "Final metrics").strip() == "Not evaluated."
    with Image.open(tmp_path / PLOT_FILE) as image:
        assert image.format == "PNG"


def test_exact_model_reports_infinite_sqnr(llama, tmp_path):
    model, batch = llama
    report = build(quantize(model, Recipe(method="fp"), [batch], progress=False), title="float")
    assert all(v == math.inf for v in report.sqnr.values())
    markdown = report.write(tmp_path).read_text()
    assert table_row(section(markdown, "Per-layer output SQNR"), "text")[:2] == ["∞", "∞ (layer 0)"]
    with Image.open(tmp_path / PLOT_FILE) as image:
        assert image.format == "PNG"


def test_samples_bound_the_sqnr_measurement(omni_quantized):
    sample = omni_quantized.context.calibration[0]
    report = build(omni_quantized, title="t", samples=[sample, sample])
    assert report.samples == 2
    text_tokens = int(((sample.modality_ids == int(Modality.TEXT)) & sample.attention_mask.bool()).sum())
    assert report.tokens[Modality.TEXT] == 2 * text_tokens
    assert "pooled over 2 samples" in report.markdown()


def test_rewrite_is_atomic(omni_report, tmp_path, monkeypatch):
    omni_report.write(tmp_path)
    before = (tmp_path / PLOT_FILE).read_bytes()

    def broken(self, out):
        out.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(RunReport, "plot", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        omni_report.write(tmp_path)
    assert (tmp_path / PLOT_FILE).read_bytes() == before, "the old plot is untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == [REPORT_FILE, PLOT_FILE], "no temporary file left"


def test_loaded_model_is_refused(omni_quantized):
    with pytest.raises(ValueError, match="loaded from a checkpoint .* build the report from the QuantizedModel that quantize"):
        build(replace(omni_quantized, context=None), title="t")


def test_no_samples_is_refused(omni_quantized):
    with pytest.raises(ValueError, match="no samples to measure the SQNR on: pass at least one DecoderInputs"):
        build(omni_quantized, title="t", samples=[])


def _report(sqnr, branches=(), params=None, recipe=None) -> RunReport:
    return RunReport(
        title="t",
        recipe=recipe or Recipe(),
        stages=(StepRecord("s", 1.0),),
        sqnr=sqnr,
        tokens={},
        samples=1,
        linear_params=params or {},
        branches=tuple(branches),
    )


@given(
    st.dictionaries(
        st.tuples(st.integers(0, 5), st.sampled_from(list(Modality))),
        st.floats(-20, 80, allow_nan=False),
        min_size=1,
    )
)
def test_sqnr_summary_brackets_every_layer(sqnr):
    for row in _report(sqnr).sqnr_summary():
        values = [db for (_, m), db in sqnr.items() if m == row.modality]
        assert row.min_db == min(values) == sqnr[row.min_layer, row.modality]
        assert min(values) - 1e-9 <= row.mean_db <= max(values) + 1e-9


@given(
    st.lists(
        st.tuples(st.integers(1, 8), st.integers(1, 8), st.sampled_from([Modality.VISION, Modality.AUDIO])),
        min_size=1,
        max_size=6,
    )
)
def test_cmc_overhead_is_branch_macs_over_dense_macs(shapes):
    params, branches = {"other": 64}, []
    for index, (d_in, d_out, modality) in enumerate(shapes):
        name = f"linear{index}"
        params[name] = d_in * d_out
        rank = min(d_in, d_out)
        overhead = rank * (d_in + d_out) / (d_in * d_out)
        branches.append(BranchReport(name, modality, rank, 0.1, 1.5, overhead))
    for row in _report({(0, Modality.TEXT): 1.0}, branches, params).cmc_summary():
        mine = [(d_in, d_out) for d_in, d_out, m in shapes if m == row.modality]
        macs = sum(min(d_in, d_out) * (d_in + d_out) for d_in, d_out in mine)
        assert row.branches == len(mine)
        assert row.overhead == pytest.approx(macs / sum(params.values()))


def test_recipe_section_names_the_key_settings():
    recipe = replace(preset("smoothquant", 4, 16), gptq=GPTQConfig(), modules=ModuleFilter(exclude=(r".*(q|k)_proj",)))
    assert recipe.label == "smoothquant W4A16 g64 +GPTQ"
    settings = section(_report({(0, Modality.TEXT): 30.0}, recipe=recipe).markdown(), "Recipe: smoothquant W4A16 g64 +GPTQ")
    assert table_row(settings, "weights") == ["4-bit, groups of 64, symmetric, full grid"]
    assert table_row(settings, "activations") == ["float (weight-only)"]
    assert table_row(settings, "smoothing") == ["tied, shared by all modalities, α 0.5, sites norm, attention"]
    assert table_row(settings, "GPTQ") == ["damping 0.01, block 128"]
    assert table_row(settings, "quantized linears") == [r"include `.*`; exclude `.*(q\|k)_proj`"]
    assert "| MAS learning |" not in settings and "| CMC |" not in settings


def test_layer_sqnr_of_rotated_models_is_measured_in_their_basis(one_thread):
    """Rotated and LaRoSA graphs carry their residual stream in another basis: the report compares each layer's
    output with the float model's in that basis (a plain comparison gives about -3 dB whatever the quantization)."""
    from masq_fx.api import apply_all, calibrate
    from masq_fx.transforms.rotation import RotationConfig
    from masq_fx.transforms.sparsity import SparsityConfig

    tiny = tiny_model("qwen2.5-omni-thinker")
    calibrated = calibrate(tiny.model, [tiny.batch], progress=False)
    recipes = [replace(preset("rtn", 8, 8), rotation=RotationConfig()), Recipe("fp", sparsity=SparsityConfig(levels=(0.0, 0.0)))]
    rotated, larosa = apply_all(calibrated, recipes, progress=False)
    quantized = build(rotated, title="rot", reference=calibrated.captured).sqnr
    assert quantized and min(quantized.values()) > 20
    assert min(build(larosa, title="larosa", reference=calibrated.captured).sqnr.values()) > 80  # rotations alone: float rounding
