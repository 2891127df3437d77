"""The one-call API on a tiny Qwen2.5-Omni thinker: quantize, generate, lower, save and load."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from masq_fx import PRESETS, QuantizedModel, apply, calibrate, load, quantize
from masq_fx.capture.positions import POSITION_INPUTS, position_placeholders
from masq_fx.errors import InputError, MissingFileError
from masq_fx.generation import full_attention_mask
from masq_fx.models.tiny import tiny_model
from masq_fx.recipes import RECIPE_VERSION, Recipe, preset, resolve_recipe
from masq_fx.transforms.cmc import CMCConfig


@pytest.fixture(scope="module")
def omni():
    tiny = tiny_model("qwen2.5-omni-thinker", seed=0, batch_size=2)
    return tiny.model, tiny.batch


@pytest.fixture(scope="module")
def quantized(omni) -> QuantizedModel:
    model, batch = omni
    return quantize(model, "masquant-w4a8", [batch], progress=False)


def test_quantize_generate_and_round_trip(omni, quantized, tmp_path, one_thread):
    model, batch = omni
    fp = model(**batch).logits
    logits = quantized.logits(batch)
    assert logits.shape == fp.shape and not torch.equal(logits, fp)
    tokens = quantized.generate(batch, max_new_tokens=4)
    assert tokens.shape == (2, 4)
    quantized.save(tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt", model)
    assert loaded.recipe == quantized.recipe
    assert torch.equal(loaded.logits(batch), logits)
    assert torch.equal(loaded.generate(batch, max_new_tokens=4), tokens)


def test_lowered_model_generates_compiled(omni, one_thread):
    """The lowered model (int8 GEMMs, indexed CMC branches) generates through one compiled KV-cache graph
    (``fullgraph=True``: a graph break raises), whose prefill and decode steps compute what the eager graph does;
    the HF model's tensors are left as they were."""
    model, batch = omni
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qm = quantize(model, replace(preset("mas-init", 8, 8), cmc=CMCConfig(rank=4)), [batch], progress=False)
    reference = qm.logits(batch)
    assert not qm.lower().unlowered
    assert (qm.logits(batch) - reference).abs().max() <= 2e-2 * reference.abs().max()
    assert qm.generate(batch, max_new_tokens=3, compiled=True).shape == (2, 3)
    key = (2, batch["input_ids"].shape[1] + 3)
    assert list(qm._cached) == [key], "one generation graph, reused"
    cached, compiled = qm._cached[key], qm._compiled[key]
    # the indexed CMC branches take the token positions in the cached graph too
    assert [n.name for n in position_placeholders(cached.graph_module)] == list(POSITION_INPUTS)
    prompt = qm.decoder_inputs(batch)
    mask = full_attention_mask(prompt.attention_mask, key[1])
    prefill = (*replace(prompt, attention_mask=mask).args(), torch.tensor([0]))
    token = qm.adapter.embed(torch.tensor([[3], [5]]))
    decode = (token, prompt.position_ids[..., -1:] + 1, torch.zeros(2, 1, dtype=torch.long), mask, torch.tensor([prompt.attention_mask.shape[1]]))
    for args in (prefill, decode):  # the same cache slots are written by both, in this order
        with torch.no_grad():
            eager = cached.graph_module(*args)
        # compiled int8 GEMMs (oneDNN) round differently from eager torchao: argmax may flip at near ties
        assert (compiled(*args) - eager).abs().max() <= 2e-2 * eager.abs().max()
    with pytest.raises(ValueError, match="save before lower"):
        qm.save("unused")
    after = model.state_dict()  # quantizing, lowering and compiling never touch the HF model's tensors
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_recipes_resolve_by_name_object_or_json(tmp_path):
    assert resolve_recipe("masquant-w8a8") is PRESETS["masquant-w8a8"]
    recipe = preset("smoothquant", 8, 8)
    assert resolve_recipe(recipe) is recipe
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe.to_dict()))
    assert resolve_recipe(path) == recipe
    with pytest.raises(ValueError, match="masquant-w4a8"):
        resolve_recipe("masquant-w3a3")


def test_yaml_recipes_may_name_only_what_differs_from_the_defaults(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("method: mas-init\nweight: {bits: 4}\ncmc: {rank_ratio: 0.05, factor_bits: 8}\nmodules:\n  exclude: ['layers\\.0\\..*']\n")
    recipe = resolve_recipe(path)
    assert recipe.method == "mas-init" and recipe.weight.bits == 4 and recipe.activation == Recipe().activation
    assert recipe.cmc.rank_ratio == 0.05 and recipe.cmc.factor_bits == 8
    assert recipe.modules.exclude == (r"layers\.0\..*",)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    path.write_text("method: mas\nweight: {bitz: 4}\n")
    with pytest.raises(ValueError, match="recipe weight: unknown field.*bitz.*the fields are bits"):
        resolve_recipe(path)
    path.write_text("methd: mas\n")
    with pytest.raises(ValueError, match="recipe: unknown field.*methd"):
        resolve_recipe(path)


def test_empty_calibration_is_refused(omni):
    with pytest.raises(ValueError, match="no calibration batches"):
        quantize(omni[0], "rtn-w8a8", [])


def test_weight_only_preset_round_trips_and_lowers_onto_the_int4_cpu_kernel(omni, tmp_path, one_thread):
    model, batch = omni
    qm = quantize(model, "masquant-w4a16", [batch], progress=False)
    assert qm.recipe.activation is None and qm.recipe.weight.group_size == 64
    qm.save(tmp_path / "w4a16")
    loaded = load(tmp_path / "w4a16", model)
    assert torch.equal(loaded.logits(batch), qm.logits(batch))
    report = loaded.lower()
    assert len(report.int4) == len(report.lowered) == 14 and not report.unlowered


def test_excluded_modules_stay_float_and_survive_save_and_load(omni, tmp_path, one_thread):
    from dataclasses import replace

    from masq_fx.transforms import quant_linears
    from masq_fx.transforms.quantize import ModuleFilter

    model, batch = omni
    recipe = replace(PRESETS["masquant-w4a8"], modules=ModuleFilter(exclude=(r"layers\.0\..*",)))
    qm = quantize(model, recipe, [batch], progress=False)
    quantized = {m.name for m in quant_linears(qm.decoder.graph_module) if m.weight_quant is not None}
    assert quantized and not any(name.startswith("layers.0.") for name in quantized)
    qm.save(tmp_path / "partial")
    loaded = load(tmp_path / "partial", model)
    assert loaded.recipe.modules == recipe.modules
    assert torch.equal(loaded.logits(batch), qm.logits(batch))


def test_calibrate_once_apply_many_equals_quantize(omni, quantized, one_thread):
    model, batch = omni
    calibrated = calibrate(model, [batch], recipes=["masquant-w4a8", "smoothquant-w4a8-gptq"], progress=False)
    inputs = calibrated.samples[0]
    with torch.no_grad():
        fp = calibrated.captured(inputs)
    first = apply(calibrated, "masquant-w4a8", progress=False)
    apply(calibrated, "smoothquant-w4a8-gptq", progress=False)
    again = apply(calibrated, "masquant-w4a8", progress=False)
    with torch.no_grad():
        assert torch.equal(calibrated.captured(inputs), fp)  # the float graph is left as it was
        assert torch.equal(first.logits(batch), quantized.logits(batch))  # same as the one-call path
        assert torch.equal(again.logits(batch), first.logits(batch))
    assert first.decoder.graph_module is not calibrated.captured.graph_module


def test_apply_collects_the_statistics_any_recipe_needs(omni, one_thread):
    model, batch = omni
    calibrated = calibrate(model, [batch], recipes=["rtn-w8a8"], progress=False)  # no second moments asked for
    late = apply(calibrated, "smoothquant-w4a8-gptq", progress=False)  # GPTQ needs them: apply collects them
    assert torch.equal(late.logits(batch), quantize(model, "smoothquant-w4a8-gptq", [batch], progress=False).logits(batch))


def test_recipes_are_versioned_and_files_are_checked(tmp_path):
    data = PRESETS["masquant-w4a8"].to_dict()
    assert data["version"] == RECIPE_VERSION and Recipe.from_dict(data) == PRESETS["masquant-w4a8"]
    with pytest.raises(InputError, match="upgrade masq_fx"):
        Recipe.from_dict({**data, "version": RECIPE_VERSION + 1})
    with pytest.raises(MissingFileError, match="does not exist"):
        resolve_recipe(tmp_path / "absent.yaml")
    upper = tmp_path / "recipe.YAML"
    upper.write_text("method: rtn\n")
    assert resolve_recipe(upper).method == "rtn"
    broken = tmp_path / "broken.yaml"
    broken.write_text("method: [rtn\nweight: {bits: 4}\n")
    with pytest.raises(InputError, match=r"invalid YAML at line \d+, column \d+"):
        resolve_recipe(broken)


def test_the_package_exports_resolve_lazily():
    import masq_fx

    assert set(masq_fx.__all__) == set(masq_fx._HOME_OF)
    assert all(getattr(masq_fx, name) is not None for name in masq_fx.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        masq_fx.nothing  # noqa: B018
