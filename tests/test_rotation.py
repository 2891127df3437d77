"""Rotations: the fast Hadamard equals its dense matrix, every rotation leaves the float model's logits unchanged
on every family (prefill and KV-cache graphs, mixed-modality inputs), and rotated quantized models generate,
lower, save and load like any other."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from helpers import float_family, prefix_greedy
from hypothesis import given, settings
from hypothesis import strategies as st

from masq_fx.api import apply_all, calibrate, load
from masq_fx.app.cli import main
from masq_fx.backends import compile_graph, lower_to_torchao
from masq_fx.capture.dataflow import SmoothingGroup, smoothing_groups
from masq_fx.capture.decoder import annotate
from masq_fx.errors import InputError
from masq_fx.generation import capture_cached, full_attention_mask, generate, transplant
from masq_fx.memory import estimate_calibration_memory
from masq_fx.models import adapter_for, rotatable_families
from masq_fx.models.tiny import TINY_FAMILIES, tiny_model
from masq_fx.nn.hadamard import Rotation, paley, sylvester
from masq_fx.nn.quant_linear import quantizers_off
from masq_fx.pipeline import Context, Pipeline
from masq_fx.recipes import Recipe, preset
from masq_fx.transforms.rotation import Rotate, RotationConfig, apply_rotation, plan_rotation, rotate, rotate_layer, rotation_record

FLOAT_RTOL = 1e-4
#: the tiny families whose residual stream can be rotated (Gemma 3's sandwich norms cannot be)
ROTATABLE = [f for f in TINY_FAMILIES if f in rotatable_families()]
#: widths of real models (SmolLM2, Qwen2.5-VL-3B/7B hidden and MLP), small Paley orders, odd parts with no Paley order
WIDTHS = [1, 2, 12, 16, 20, 28, 36, 44, 64, 96, 172, 576, 1536, 2048, 3584, 11008]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("order", [12, 20, 24, 28, 36, 44, 60, 76, 148])
def test_paley_matrices_are_hadamard(order):
    h = paley(order)
    assert h is not None and set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, order * torch.eye(order, dtype=torch.float64))


def test_sylvester_is_hadamard_and_refuses_other_orders():
    h = sylvester(64)
    assert torch.equal(h @ h.T, 64 * torch.eye(64, dtype=torch.float64))
    with pytest.raises(ValueError, match="power of two"):
        sylvester(12)


@settings(max_examples=30, deadline=None)
@given(width=st.sampled_from(WIDTHS), kind=st.sampled_from(["hadamard", "orthogonal"]), seed=st.integers(0, 2**31 - 1), blocks=st.integers(1, 3))
def test_fast_rotation_equals_its_dense_orthogonal_matrix(width, kind, seed, blocks):
    if kind == "orthogonal" and width > 2048:
        return  # a dense random matrix that wide is slow to draw and says nothing new
    rotation = Rotation(width, kind, seed)
    q = rotation.matrix()
    assert (q @ q.T - torch.eye(width, dtype=torch.float64)).abs().max() < 1e-6
    x = torch.randn(2, 3, blocks * width, dtype=torch.float64)
    expected = (x.reshape(2, 3, blocks, width) @ q).reshape(x.shape)
    assert (rotation(x.float()).double() - expected).abs().max() < 1e-5 * max(1.0, float(x.abs().max()))
    assert torch.equal(Rotation(width, kind, seed).matrix(), q)  # the seed alone decides


def test_hadamard_factors_stay_small():
    for width, sizes in {1536: (12, 16, 8), 3584: (28, 16, 8), 11008: (43, 16, 16), 2048: (64, 32)}.items():
        assert Rotation(width, "hadamard", 0).sizes == sizes


CONFIGS = st.builds(
    lambda kind, seed, parts: RotationConfig(kind, seed, *parts),
    st.sampled_from(["hadamard", "orthogonal"]),
    st.integers(0, 1000),
    st.tuples(st.booleans(), st.booleans(), st.booleans()).filter(any),
)


@pytest.mark.parametrize("family", ROTATABLE)
@settings(max_examples=2, deadline=None)
@given(config=CONFIGS)
def test_rotations_leave_the_float_logits_unchanged(family, config):
    tiny, captured, inputs, fp = float_family(family)
    rotated = rotate(captured, config)
    with torch.no_grad():
        logits = rotated(inputs)
        assert torch.equal(captured(inputs), fp)  # the float capture is left as it was
    assert _relative(logits, fp) <= FLOAT_RTOL
    plan = rotation_record(rotated.graph_module).plan
    changed = [name for name in rotated.decoder_linears() if not torch.equal(rotated.weights[name], captured.weights[name])]
    expected = set(plan.writers) if config.residual else {o for _, o in plan.heads} | set(plan.online)
    assert expected <= set(changed)
    down_projections = sum(site.kind == "activation" for site in captured.groups())  # one per MLP and per expert
    attentions = sum(site.kind == "attention" for site in captured.groups())  # ungated: Qwen3.5's layers have none
    assert (len(plan.heads), len(plan.online)) == (attentions * config.heads, down_projections * config.down)


@pytest.mark.parametrize("family", ROTATABLE)
def test_rotations_leave_the_cached_graph_unchanged(family):
    """The plan found on the prefill graph, applied to the KV-cache graph: the same logits, prefill and decode."""
    tiny, captured, inputs, _ = float_family(family)
    config = RotationConfig(seed=3)
    plan = plan_rotation(captured.graph_module, captured.sites, config, captured.hidden_size, captured.head_dim)
    plain = capture_cached(tiny.model, batch_size=2, max_cache_len=32, logits_to_keep=0)
    rotated = capture_cached(tiny.model, batch_size=2, max_cache_len=32, logits_to_keep=0)
    apply_rotation(rotated.graph_module, config, plan)
    prompt = replace(inputs, attention_mask=full_attention_mask(inputs.attention_mask, 32))
    length = inputs.attention_mask.shape[1]
    token = adapter_for(tiny.model).embed(torch.tensor([[3], [5]]))
    step = replace(prompt, inputs_embeds=token, position_ids=inputs.position_ids[..., -1:] + 1, modality_ids=torch.zeros(2, 1, dtype=torch.long))
    with torch.no_grad():
        for args, start in ((prompt, 0), (step, length)):  # prefill, then one decode step into the same cache slots
            assert _relative(rotated(args, start), plain(args, start)) <= FLOAT_RTOL


@pytest.mark.parametrize("family", sorted(set(TINY_FAMILIES) - set(ROTATABLE)))
def test_unrotatable_families_are_refused_a_rotation_with_the_reason(family):
    _, captured, _, _ = float_family(family)
    reason = "1 \\+ γ .* gated" if family.startswith("qwen3.5") else "sandwich norms"
    with pytest.raises(InputError, match=f"cannot rotate this {family} model: .*{reason}.*; quantize it without rotation"):
        rotate(captured, RotationConfig())


@pytest.mark.parametrize("family", ["qwen2.5-omni-thinker", "qwen3.5-moe"])
def test_a_lazy_rotation_made_layer_by_layer_equals_the_eager_one(family):
    tiny, captured, inputs, fp = float_family(family)
    config = RotationConfig("orthogonal", seed=5)
    eager = rotate(captured, config)
    lazy = rotate(captured, config, lazy=True)
    copy = lazy.copy()
    assert sorted(rotation_record(lazy.graph_module).pending) == list(range(captured.num_layers))
    head = next(name for name in lazy.linear_nodes() if name == "lm_head")
    assert torch.equal(lazy.weights[head], eager.weights[head])  # outside the layers: rotated at once
    first = captured.decoder_linears()[0]
    assert lazy.weights[first] is captured.weights[first]  # a layer's weights: when its turn comes
    for layer in range(captured.num_layers):
        rotate_layer(lazy, [copy], layer)
        rotate_layer(lazy, [copy], layer)  # nothing left to do
    expected = eager.graph_module.state_dict()
    for made in (lazy, copy):
        assert not rotation_record(made.graph_module).pending
        state = made.graph_module.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[key], value) for key, value in expected.items())
        with torch.no_grad():
            assert torch.equal(made(inputs), eager(inputs))
    assert all(copy.weights[name] is lazy.weights[name] for name in lazy.decoder_linears())  # shared, not copied
    assert set(map(id, rotation_record(copy.graph_module).produced.values())) == set(map(id, rotation_record(lazy.graph_module).produced.values()))


def test_rotate_step_in_a_whole_graph_pipeline_equals_rotate():
    _, captured, inputs, _ = float_family("qwen2.5-vl")
    config = RotationConfig(seed=5)
    context = Pipeline([Rotate(config)]).run(Context(captured.copy(), [inputs]), progress=False)
    with torch.no_grad():
        assert torch.equal(context.captured(inputs), rotate(captured, config)(inputs))
    with pytest.raises(InputError, match="already rotated"):
        Pipeline([Rotate(config)]).run(context, progress=False)


class _FusedAttention(torch.nn.Module):
    """An attention whose values are cut from a fused q/k/v projection (Phi-3's ``qkv_proj``)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv_proj = torch.nn.Linear(16, 48, bias=False)
        self.o_proj = torch.nn.Linear(16, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = (qkv[..., i * 16 : (i + 1) * 16].view(1, -1, 2, 8).transpose(1, 2) for i in range(3))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(1, -1, 16))


def test_values_cut_from_a_fused_projection_get_no_head_rotation():
    """The value heads of a fused q/k/v projection are a slice of its rows: rotating them would rotate q and k too,
    so the plan refuses the head rotation, naming the fix (GQA's whole-dim slices, ``x[:, :, None]``, still pass)."""
    gm = torch.export.export(_FusedAttention(), (torch.randn(1, 5, 16),)).module()
    annotate(gm)
    sites = smoothing_groups(gm)
    attention = next(site for site in sites if site.kind == "attention")
    assert attention.linears == ("o_proj",)
    with pytest.raises(InputError, match="cannot find the value projection.*rotation.heads"):
        plan_rotation(gm, [attention], RotationConfig(residual=False, down=False), 16, 8)


def test_unrotatable_graphs_are_refused_with_the_fix():
    _, captured, _, _ = float_family("llama")
    gm = captured.graph_module
    other = [SmoothingGroup("other", "x", ("layers.0.mlp.up_proj",), layer=0)]
    with pytest.raises(InputError, match="no norm before them.*without rotation"):
        plan_rotation(gm, other, RotationConfig(), 64, 16)
    layer_norm = [SmoothingGroup("norm", "x", ("lm_head",), "decoder.norm.weight", "decoder.norm.bias")]
    with pytest.raises(InputError, match="LayerNorm"):
        plan_rotation(gm, layer_norm, RotationConfig(), 64, 16)
    with pytest.raises(InputError, match="does nothing"):
        RotationConfig(residual=False, heads=False, down=False)
    with pytest.raises(InputError, match="rotation alone"):
        Recipe("fp", rotation=RotationConfig())


def test_recipe_rotation_round_trips_and_labels():
    recipe = replace(preset("mas-init", 4, 8), rotation=RotationConfig(kind="orthogonal", seed=7, heads=False))
    data = json.loads(json.dumps(recipe.to_dict()))
    assert Recipe.from_dict(data) == recipe
    assert recipe.label.endswith("+rot")
    with pytest.raises(InputError, match="rotation kind"):
        Recipe.from_dict({**data, "rotation": {"kind": "givens"}})


@pytest.fixture(scope="module")
def rotated_omni():
    """The tri-modal tiny model quantized W8A8 MAS-init, with and without rotation, from one calibration."""
    tiny = tiny_model("qwen2.5-omni-thinker", seed=0, batch_size=2)
    recipes = [preset("mas-init", 8, 8), replace(preset("mas-init", 8, 8), rotation=RotationConfig(seed=1))]
    calibrated = calibrate(tiny.model, [tiny.batch], recipes, progress=False)
    plain, rotated = apply_all(calibrated, recipes, progress=False)
    return tiny, calibrated, plain, rotated


def test_rotated_recipes_calibrate_on_the_rotated_graph(rotated_omni):
    tiny, calibrated, plain, rotated = rotated_omni
    assert rotation_record(rotated.decoder.graph_module) is not None and rotation_record(plain.decoder.graph_module) is None
    name = "layers.0.mlp.down_proj"  # its input is rotated online: other statistics, the same tokens
    a, b = plain.context.stats[name], rotated.context.stats[name]
    assert torch.equal(a.count, b.count) and not torch.allclose(a.all_tokens().absmax, b.all_tokens().absmax)
    fp = calibrated.captured(calibrated.samples[0])
    for quantized in (plain, rotated):
        assert _relative(quantized.logits(tiny.batch), fp) < 0.05


def test_rotated_model_generates_what_its_prefill_graph_computes(rotated_omni):
    tiny, _, _, rotated = rotated_omni
    prompt = rotated.decoder_inputs(tiny.batch)
    cached = capture_cached(tiny.model, batch_size=2, max_cache_len=32)
    transplant(rotated.decoder, cached)
    assert torch.equal(generate(cached, prompt, 4), prefix_greedy(rotated.decoder, adapter_for(tiny.model), prompt, 4))


def test_rotated_checkpoint_round_trips_bit_exactly(rotated_omni, tmp_path):
    tiny, _, _, rotated = rotated_omni
    rotated.save(tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["format_version"] == 5 and manifest["graph"]["rotation"]["config"]["seed"] == 1
    assert not [path for path in manifest["graph"]["replaced"] if path.startswith("lm_head")]  # re-derived, not stored
    loaded = load(tmp_path / "ckpt", tiny.model)
    assert torch.equal(loaded.logits(tiny.batch), rotated.logits(tiny.batch))
    assert torch.equal(loaded.generate(tiny.batch, max_new_tokens=3), rotated.generate(tiny.batch, max_new_tokens=3))


def test_lowered_rotated_model_stays_close_and_compiles(rotated_omni, one_thread):
    """The entry and online rotations are plain graph modules: they lower and compile (fullgraph) with the rest."""
    tiny, calibrated, _, rotated = rotated_omni
    lowered = rotated.decoder.copy()
    assert not lower_to_torchao(lowered).unlowered
    sample = calibrated.samples[0]
    with torch.no_grad():
        reference = rotated.decoder(sample)
        eager = lowered(sample)
        assert _relative(eager, reference) < 2e-2
        assert _relative(compile_graph(lowered.graph_module)(*sample.args()), eager) < 2e-2


def test_memory_estimate_counts_each_rotations_weight_copy():
    tiny, captured, _, _ = float_family("llama")
    plain = preset("rtn", 8, 8)
    rotated = [replace(plain, rotation=RotationConfig(seed=seed)) for seed in (0, 0, 1)]
    weights = sum(w.numel() * w.element_size() for w in captured.weights.values())
    base = estimate_calibration_memory(tiny.model, captured, [plain], [tiny.batch])
    both = estimate_calibration_memory(tiny.model, captured, [plain, *rotated], [tiny.batch])
    assert both.rotated_weights == 2 * weights and both.total == base.total + 2 * weights
    assert "rotated weights" in both.parts()


def test_cli_rotates_the_recipe_and_the_checkpoint_reloads(tmp_path, capsys):
    out = tmp_path / "rot"
    tiny = "tiny:qwen2.5-omni-thinker"
    assert main(["quantize", tiny, "--recipe", "rtn-w8a8", "--rotate", "3", "--compare", "--out", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["rotation"]["seed"] == 3 and manifest["graph"]["rotation"]["config"]["seed"] == 3
    quantized = float(capsys.readouterr().out.strip().splitlines()[-2].split()[-1])
    assert main(["eval", str(out), "--model", tiny]) == 0
    assert float(capsys.readouterr().out.strip().splitlines()[-1].split()[-1]) == pytest.approx(quantized, abs=1e-3)


def test_rotated_quantized_model_with_quantizers_off_is_the_float_model(rotated_omni):
    tiny, calibrated, _, rotated = rotated_omni
    sample = calibrated.samples[0]
    with torch.no_grad(), quantizers_off(rotated.decoder.graph_module):
        assert _relative(rotated.decoder(sample), calibrated.captured(sample)) <= FLOAT_RTOL
