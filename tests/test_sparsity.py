"""Activation sparsity (LaRoSA, TEAL): the rotations alone leave every family's float logits unchanged (prefill and
KV-cache graphs, mixed modalities), the sparsifiers zero what they are configured to, the sparse-input kernel
computes what the sparsified linear computes, and sparsified models generate like their prefill graphs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import float_family, prefix_greedy
from hypothesis import given, settings
from hypothesis import strategies as st

from masq_fx.api import apply_all, calibrate, load
from masq_fx.app.cli import main
from masq_fx.app.run_report import build
from masq_fx.backends import compile_graph
from masq_fx.backends.sparse import lower_sparse
from masq_fx.calibration.magnitudes import AbsHistogram, run_probes
from masq_fx.calibration.observer import ModalityObserver
from masq_fx.errors import InputError
from masq_fx.generation import capture_cached, full_attention_mask, generate, transplant
from masq_fx.modality import Modality
from masq_fx.models import adapter_for, rotatable_families
from masq_fx.models.tiny import TINY_FAMILIES, tiny_model
from masq_fx.nn.sparsity import SparseInputLinear, Threshold, TopK
from masq_fx.recipes import PRESETS, Recipe, preset
from masq_fx.transforms.prepare import quant_linears
from masq_fx.transforms.rotation import RotationConfig, rotate
from masq_fx.transforms.sparsity import (
    SparsityConfig,
    achieved_sparsity,
    model_sparsity,
    plan_sparsity,
    sparsify,
    sparsity_record,
)

FLOAT_RTOL = 1e-4
#: the tiny families whose residual stream can be rotated (Gemma 3's sandwich norms cannot be)
ROTATABLE = [f for f in TINY_FAMILIES if f in rotatable_families()]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", ROTATABLE)
@settings(max_examples=2, deadline=None)
@given(granularity=st.sampled_from(["layer", "block"]), covariance=st.sampled_from(["tokens", "modalities"]))
def test_larosa_rotations_alone_leave_the_float_logits_unchanged(family, granularity, covariance):
    tiny, captured, inputs, fp = float_family(family)
    config = SparsityConfig(levels=(0.0, 0.0), granularity=granularity, covariance=covariance)
    rotated = sparsify(captured, config, [inputs], progress=False)
    with torch.no_grad():
        assert _relative(rotated(inputs), fp) <= FLOAT_RTOL
        assert torch.equal(captured(inputs), fp)  # the float capture is left as it was
    plan = sparsity_record(rotated.graph_module).plan
    per_block = 2 if granularity == "block" else 1
    installed = [name for name, _ in rotated.graph_module.named_children() if name.startswith("masq_fx_residual_adapter_")]
    assert len(installed) == per_block * captured.num_layers - 1  # one per residual add (an MoE block's experts share it)
    assert len(plan.entry) == 1 + len(captured.injection_layers)


#: one family per kind of KV cache and block (the prefill invariance above runs on every family): a plain decoder,
#: 3-row M-RoPE with audio, DeepStack injections, tri-modal experts, linear attention with a shared expert
CACHED_FAMILIES = ["llama", "qwen2.5-omni-thinker", "qwen3-vl", "qwen3-omni-moe-thinker", "qwen3.5-moe"]


@pytest.mark.parametrize("family", CACHED_FAMILIES)
def test_larosa_rotations_alone_leave_the_cached_graph_unchanged(family):
    """The KV-cache graph with the rotations, prefill then one decode step, equals the dense one."""
    tiny, captured, inputs, _ = float_family(family)
    rotated = sparsify(captured, SparsityConfig(levels=(0.0, 0.0), granularity="block"), [inputs], progress=False)
    plain = capture_cached(tiny.model, batch_size=2, max_cache_len=32, logits_to_keep=0)
    cached = capture_cached(tiny.model, batch_size=2, max_cache_len=32, logits_to_keep=0)
    transplant(rotated, cached)
    prompt = replace(inputs, attention_mask=full_attention_mask(inputs.attention_mask, 32))
    token = adapter_for(tiny.model).embed(torch.tensor([[3], [5]]))
    step = replace(prompt, inputs_embeds=token, position_ids=inputs.position_ids[..., -1:] + 1, modality_ids=torch.zeros(2, 1, dtype=torch.long))
    with torch.no_grad():
        for args, start in ((prompt, 0), (step, inputs.attention_mask.shape[1])):
            assert _relative(cached(args, start), plain(args, start)) <= FLOAT_RTOL


def test_larosa_is_refused_where_the_residual_stream_cannot_be_rotated_and_teal_runs():
    _, captured, inputs, fp = float_family("gemma3")
    with pytest.raises(InputError, match="LaRoSA cannot rotate this gemma3 model: .*sandwich norms.*; use method 'teal'"):
        sparsify(captured, SparsityConfig(levels=(0.0, 0.0)), [inputs], progress=False)
    teal = sparsify(captured, SparsityConfig(method="teal", levels=(0.0, 0.0)), [inputs], progress=False)
    with torch.no_grad():
        assert _relative(teal(inputs), fp) <= FLOAT_RTOL


def test_larosa_bases_decorrelate_the_block_inputs():
    """In the rotated basis, the calibration second moment of each layer's first block input is diagonal."""
    _, captured, inputs, _ = float_family("qwen2.5-omni-thinker")
    rotated = sparsify(captured, SparsityConfig(levels=(0.0, 0.0)), [inputs], progress=False)
    gm = rotated.graph_module
    first = {}
    for node in gm.graph.find_nodes(op="call_module"):
        if str(node.target).startswith("masq_fx_sparsify_") and isinstance(gm.get_submodule(str(node.target)), TopK):
            first.setdefault(node.meta["masq_fx.layer"], node)
    observers = {layer: ModalityObserver(tuple(Modality)) for layer in first}
    run_probes(gm, {first[layer]: observers[layer] for layer in first}, [inputs], "test", progress=False)
    for observer in observers.values():
        moment = observer.stats.all_tokens().moment
        off = moment - torch.diag(torch.diagonal(moment))
        assert float(off.abs().max()) <= 1e-4 * float(moment.abs().max())


@pytest.mark.parametrize("method", ["larosa", "teal"])
def test_sparsifiers_zero_the_configured_fractions(method):
    _, captured, inputs, fp = float_family("qwen2.5-vl")
    config = SparsityConfig(method, target=0.4)
    sparse = sparsify(captured, config, [inputs], progress=False)
    sites = achieved_sparsity(sparse, [inputs], progress=False)
    for entry in sites:
        for value in entry.achieved.values():
            if method == "larosa":  # the same count for every token
                assert value == pytest.approx(1 - entry.site.keep / entry.site.width, abs=1e-9)
    overall = model_sparsity(sites, {name: w.numel() for name, w in sparse.weights.items()})
    assert set(overall) == {Modality.TEXT, Modality.VISION}
    # TEAL's thresholds are quantiles of these same tokens; Top-K rounds each site's count down
    tokens = sum(inputs.attention_mask.flatten().tolist())
    counts = {m: int(((inputs.modality_ids == int(m)) & (inputs.attention_mask == 1)).sum()) for m in overall}
    mean = sum(overall[m] * counts[m] for m in overall) / tokens
    assert mean == pytest.approx(0.4, abs=0.02)
    levels = {entry.site.role: entry.site.level for entry in sites}
    expected = (0.8, 1.2) if method == "larosa" else (1.0, 1.0)
    assert levels["inner"] / levels["input"] == pytest.approx(expected[1] / expected[0])
    with torch.no_grad():
        assert 0 < _relative(sparse(inputs), fp) < 1


def test_role_levels_meet_the_model_level_target():
    _, captured, _, _ = float_family("llama")
    for config in (SparsityConfig(target=0.3), SparsityConfig("teal", 0.5), SparsityConfig(target=0.4, ratios=(1.0, 3.0))):
        plan = plan_sparsity(captured, config)
        rows = {site: sum(captured.weights[n].numel() for n in site.linears) for site in plan.sites}
        assert sum(site.level * r for site, r in rows.items()) / sum(rows.values()) == pytest.approx(config.target)
    assert {s.level for s in plan_sparsity(captured, SparsityConfig(levels=(0.1, 0.7))).sites} == {0.1, 0.7}


def test_bad_sparsity_configs_and_graphs_are_refused_with_the_fix():
    _, captured, inputs, _ = float_family("llama")
    for kwargs, message in (
        ({"method": "cats"}, "'larosa' or 'teal'"),
        ({"target": 1.0}, r"\[0, 1\)"),
        ({"levels": (0.5, 1.0)}, r"\[0, 1\)"),
        ({"ratios": (0.0, 0.0)}, "not both zero"),
        ({"granularity": "head"}, "'layer' or 'block'"),
    ):
        with pytest.raises(InputError, match=message):
            SparsityConfig(**kwargs)
    with pytest.raises(InputError, match="lower the target"):
        plan_sparsity(captured, SparsityConfig(target=0.9, ratios=(0.0, 1.0)))
    with pytest.raises(InputError, match="before any rotation"):
        sparsify(rotate(captured, RotationConfig()), SparsityConfig(), [inputs], progress=False)
    with pytest.raises(InputError, match="calibration samples"):
        sparsify(captured, SparsityConfig(), [], progress=False)


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 96),
    out=st.integers(1, 40),
    fraction=st.floats(0.0, 0.95),
    bags=st.integers(1, 8),
    tokens=st.integers(1, 4),
    bias=st.booleans(),
    threshold=st.booleans(),
)
def test_sparse_input_kernel_equals_the_sparsified_linear(width, out, fraction, bags, tokens, bias, threshold):
    generator = torch.Generator().manual_seed(width * 1000 + out)
    weight = torch.randn(out, width, generator=generator)
    b = torch.randn(out, generator=generator) if bias else None
    x = torch.randn(1, tokens, width, generator=generator)
    keep = max(1, int((1 - fraction) * width))
    sparsifier = Threshold(float(x.abs().flatten().kthvalue(width * tokens - keep + 1).values)) if threshold else TopK(width, keep)
    kernel = SparseInputLinear(weight, b, sparsifier, bags)
    expected = F.linear(sparsifier(x), weight, b)
    assert torch.allclose(kernel(x), expected, atol=1e-5, rtol=1e-5)
    if not threshold:
        assert int((sparsifier(x) != 0).sum(-1).max()) <= keep
    flat = x[0, 0]
    kept = torch.zeros(width, dtype=torch.bool)
    kept[sparsifier.kept(flat)] = True
    assert torch.equal(kept, sparsifier(flat) != 0)


@settings(max_examples=30, deadline=None)
@given(q=st.floats(0.01, 0.99), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 1000))
def test_histogram_quantiles_are_within_one_percent(q, scale, seed):
    x = torch.randn(20000, generator=torch.Generator().manual_seed(seed)) * scale
    histogram = AbsHistogram()
    histogram.update(x)
    exact = float(torch.quantile(x.abs(), q))
    assert histogram.quantile(q) == pytest.approx(exact, rel=0.01)


@pytest.mark.parametrize("method", ["larosa", "teal"])
def test_sparsified_models_generate_what_their_prefill_graph_computes(method):
    tiny, captured, inputs, _ = float_family("qwen2.5-omni-thinker")
    sparse = sparsify(captured, SparsityConfig(method, 0.4), [inputs], progress=False)
    adapter = adapter_for(tiny.model)
    cached = capture_cached(tiny.model, batch_size=2, max_cache_len=32)
    transplant(sparse, cached)
    reference = prefix_greedy(sparse, adapter, inputs, 4)
    assert torch.equal(generate(cached, inputs, 4), reference)
    assert lower_sparse(cached.graph_module) == 7 * captured.num_layers  # q, k, v, o, gate, up, down
    assert torch.equal(generate(cached, inputs, 4), reference)


def test_compiled_sparse_kernels_decode_like_the_eager_graph():
    """Top-K and threshold kernels compile (fullgraph; a threshold keeps a data-dependent count) and generate the
    tokens of the uncompiled sparsified graph."""
    tiny, captured, inputs, _ = float_family("llama")
    row = replace(inputs, **{name: getattr(inputs, name)[:1] for name in ("inputs_embeds", "position_ids", "modality_ids", "attention_mask")})
    for method in ("larosa", "teal"):  # one row: decode steps take the single-token kernel
        cached = capture_cached(tiny.model, batch_size=1, max_cache_len=24)
        transplant(sparsify(captured, SparsityConfig(method, 0.4), [inputs], progress=False), cached)
        expected = generate(cached, row, 3)
        lower_sparse(cached.graph_module, bags=2)
        assert torch.equal(generate(cached, row, 3, run=compile_graph(cached.graph_module)), expected)


@pytest.fixture(scope="module")
def sparse_omni():
    """The tri-modal tiny model sparsified by the LaRoSA and TEAL presets and quantized W8A8 on a LaRoSA graph."""
    tiny = tiny_model("qwen2.5-omni-thinker", seed=0, batch_size=2)
    recipes = [PRESETS["larosa-40"], PRESETS["teal-40"], replace(preset("rtn", 8, 8), sparsity=SparsityConfig(target=0.25))]
    calibrated = calibrate(tiny.model, [tiny.batch], recipes, progress=False)
    return tiny, apply_all(calibrated, recipes, progress=False)


def test_sparsity_recipes_round_trip_and_label():
    recipe = replace(preset("rtn", 8, 8), sparsity=SparsityConfig("teal", 0.25, ratios=(1.0, 2.0)))
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert recipe.label == "rtn W8A8 +teal 25%" and PRESETS["larosa-40"].label == "fp +larosa 40%"
    with pytest.raises(InputError, match="drop one"):
        replace(recipe, rotation=RotationConfig())


def test_sparsified_checkpoints_load_bit_exactly(sparse_omni, tmp_path):
    tiny, models = sparse_omni
    for index, model in enumerate(models):
        model.save(tmp_path / str(index))
        manifest = json.loads((tmp_path / str(index) / "manifest.json").read_text())
        assert manifest["graph"]["sparsity"]["config"]["method"] == model.recipe.sparsity.method
        loaded = load(tmp_path / str(index), tiny.model)
        assert torch.equal(loaded.logits(tiny.batch), model.logits(tiny.batch))
        assert torch.equal(loaded.generate(tiny.batch, max_new_tokens=3), model.generate(tiny.batch, max_new_tokens=3))
    quantized = models[2].decoder
    assert sparsity_record(quantized.graph_module) is not None and any(True for _ in quant_linears(quantized.graph_module))


def test_run_report_shows_the_achieved_sparsity_per_modality(sparse_omni, tmp_path):
    tiny, models = sparse_omni
    report = build(models[0], title="tiny Omni thinker, LaRoSA 40%")
    summary = report.sparsity_summary()
    assert set(summary) == {Modality.TEXT, Modality.VISION, Modality.AUDIO}
    assert all(abs(value - 0.4) < 0.02 for value in summary.values())  # Top-K: the same count for every token
    text = report.markdown()
    assert "## Activation sparsity" in text and "larosa, target 0.4" in text
    assert len(report.sparsity) == 4 * tiny.model.config.text_config.num_hidden_layers


def test_cli_quantizes_evaluates_and_generates_a_sparsified_model(tmp_path, capsys):
    out = tmp_path / "teal"
    tiny = "tiny:qwen2.5-omni-thinker"
    assert main(["quantize", tiny, "--recipe", "teal-25", "--out", str(out), "--quiet"]) == 0
    ours = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("teal-25 "))
    assert "## Activation sparsity" in (out / "report.md").read_text()
    assert main(["eval", str(out), "--model", tiny]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].split()[-1] == ours.split()[-1]
    assert main(["generate", str(out), "--model", tiny, "--max-new-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_lowered_sparse_models_generate_the_same_tokens(sparse_omni):
    """(Last of the file: lowering changes the shared fixture's models.)"""
    tiny, models = sparse_omni
    for model in models[:2]:
        expected = model.generate(tiny.batch, max_new_tokens=3)
        model.lower()
        assert torch.equal(model.generate(tiny.batch, max_new_tokens=3), expected)
    with pytest.raises(InputError, match="before lower"):
        achieved_sparsity(models[0].decoder, [models[0].decoder_inputs(tiny.batch)], progress=False)
