"""Checkpoints: save → load replays every recipe bit for bit, refuses what it must, and writes atomically.

Each recipe quantizes a deep copy of one captured tiny Qwen2.5-Omni thinker (text + image + audio),
is saved, and is loaded into the same HF model (a fresh capture). "Identical" means ``torch.equal``
on the logits, and identical bytes when the loaded graph is saved again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from masq_fx import checkpoint
from masq_fx.backends import lower_to_torchao
from masq_fx.calibration.calibrate import observe
from masq_fx.capture.decoder import CapturedDecoder, capture
from masq_fx.checkpoint import (
    CheckpointError,
    linear_bytes,
    load,
    pack_int4,
    read_manifest,
    save,
    unpack_int4,
)
from masq_fx.modality import Modality
from masq_fx.models import DecoderInputs, adapter_for
from masq_fx.models.tiny import TINY_TOKENS, tiny_model
from masq_fx.nn.quant_linear import QuantLinear
from masq_fx.nn.routing import ModalityScale
from masq_fx.pipeline import Context, Pipeline
from masq_fx.quantizers import ActQuantConfig, WeightQuantConfig
from masq_fx.recipes import MASLearningConfig, Recipe, preset, recipe_steps
from masq_fx.replay import LinearRecord
from masq_fx.transforms import SmoothingConfig, quant_linears
from masq_fx.transforms.cmc import CMCConfig
from masq_fx.transforms.gptq import GPTQConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ONE_EPOCH = MASLearningConfig(epochs=1)
ROUTED = SmoothingConfig(variant="tied", per_modality=True, fold_into_norm=False)
RECIPES: dict[str, Recipe] = {
    "rtn-w8a8": preset("rtn", 8, 8),
    "rtn-w4a8-asymmetric-g16-static": Recipe(
        "rtn", WeightQuantConfig(bits=4, symmetric=False, group_size=16), ActQuantConfig(granularity="per_tensor")
    ),
    "smoothquant-folded-w8a8": preset("smoothquant", 8, 8),
    "smoothquant-folded-w4a8": preset("smoothquant", 4, 8),
    "smoothquant-routed-w8a8": replace(preset("smoothquant", 8, 8), smoothing=ROUTED),
    "mas-init-w8a8": preset("mas-init", 8, 8),
    "mas-w4a8": replace(preset("mas", 4, 8), learning=ONE_EPOCH),
    "mas-cmc-w4a8": replace(preset("mas", 4, 8), learning=ONE_EPOCH, cmc=CMCConfig()),
    "mas-init-cmc-w8a8": replace(preset("mas-init", 8, 8), cmc=CMCConfig()),
    "gptq-w4a8": replace(preset("mas-init", 4, 8), gptq=GPTQConfig()),
    "gptq-cmc-w8a8": replace(preset("mas-init", 8, 8), gptq=GPTQConfig(), cmc=CMCConfig()),
    "mas-clip-cmc-w4a8": replace(preset("mas", 4, 8), learning=replace(ONE_EPOCH, learn_clipping=True), cmc=CMCConfig()),
    "mas-clip-gptq-w4a8": replace(preset("mas", 4, 8), learning=replace(ONE_EPOCH, learn_clipping=True), gptq=GPTQConfig()),
}
#: recipes the torchao int8 backend lowers completely (W8A8, and W4A8 codes on the int8 kernel)
LOWERABLE = [
    "rtn-w8a8", "smoothquant-folded-w8a8", "smoothquant-routed-w8a8", "mas-init-w8a8", "mas-init-cmc-w8a8",
    "gptq-cmc-w8a8", "smoothquant-folded-w4a8", "mas-cmc-w4a8", "gptq-w4a8", "mas-clip-cmc-w4a8", "mas-clip-gptq-w4a8",
]  # fmt: skip


@dataclass
class Tiny:
    model: nn.Module
    captured: CapturedDecoder  # pristine: recipes run on deep copies
    inputs: DecoderInputs
    stats: dict
    state: dict[str, torch.Tensor]  # the HF model's weights before any test ran

    def quantize(self, recipe: Recipe, calibration: list[DecoderInputs] | None = None) -> Context:
        context = Context(copy.deepcopy(self.captured), calibration or [self.inputs], stats=self.stats, provided={"stats"})
        return Pipeline(recipe_steps(recipe, progress=False)).run(context, progress=False)

    def probes(self) -> list[DecoderInputs]:
        """The calibration batch, and unseen embeddings with the modality labels shuffled."""
        gen = torch.Generator().manual_seed(7)
        ids = self.inputs.modality_ids
        return [
            self.inputs,
            replace(
                self.inputs,
                inputs_embeds=torch.randn(self.inputs.inputs_embeds.shape, generator=gen) * 2,
                modality_ids=torch.where(self.inputs.attention_mask.bool(), (ids + 1) % len(Modality), 0),
            ),
        ]


@dataclass
class RoundTrip:
    recipe: Recipe
    context: Context
    directory: Path
    loaded: CapturedDecoder


@pytest.fixture(scope="module")
def omni() -> Tiny:
    tiny = tiny_model("qwen2.5-omni-thinker", seed=0, batch_size=2)
    inputs = adapter_for(tiny.model).decoder_inputs(tiny.batch)
    captured = capture(tiny.model)
    stats = observe(Context(captured, [inputs]), moment_modalities=tuple(Modality), progress=False).stats
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    return Tiny(tiny.model, captured, inputs, stats, state)


@pytest.fixture(scope="module")
def round_trip(omni, tmp_path_factory):
    """Recipe name → its quantized context, checkpoint directory and loaded graph (made once)."""
    done: dict[str, RoundTrip] = {}

    def get(name: str) -> RoundTrip:
        if name not in done:
            recipe = RECIPES[name]
            context = omni.quantize(recipe)
            directory = save(context, tmp_path_factory.mktemp(name) / "checkpoint", model=omni.model, recipe=recipe)
            done[name] = RoundTrip(recipe, context, directory, load(directory, omni.model))
        return done[name]

    return get


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@torch.no_grad()
def _assert_same_outputs(a: CapturedDecoder, b: CapturedDecoder, probes: list[DecoderInputs]) -> None:
    for inputs in probes:
        assert torch.equal(a(inputs), b(inputs))


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", RECIPES)
def test_loaded_graph_computes_exactly_what_the_saved_graph_computed(omni, round_trip, name):
    trip = round_trip(name)
    _assert_same_outputs(trip.context.captured, trip.loaded, omni.probes())
    with torch.no_grad():  # and it is quantized: not the float model
        assert not torch.equal(trip.loaded(omni.inputs), omni.captured(omni.inputs))


@pytest.mark.parametrize("name", RECIPES)
def test_saving_the_loaded_graph_again_gives_identical_bytes(omni, round_trip, name, tmp_path):
    trip = round_trip(name)
    again = save(Context(trip.loaded, [omni.inputs]), tmp_path / "again", model=omni.model, recipe=trip.recipe)
    assert _files(again) == _files(trip.directory)


@pytest.mark.parametrize("name", LOWERABLE)
def test_loaded_graph_lowers_to_torchao_like_the_saved_one(omni, round_trip, name):
    trip = round_trip(name)
    saved, loaded = copy.deepcopy(trip.context.captured), copy.deepcopy(trip.loaded)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every linear lowers
        reports = lower_to_torchao(saved), lower_to_torchao(loaded)
    assert reports[0].lowered == reports[1].lowered and len(reports[0].lowered) == 14
    _assert_same_outputs(saved, loaded, omni.probes())


def test_replayed_structure(round_trip):
    """Folded norms, routers with shared tables, CMC's single stored row and GPTQ's codes are replayed."""
    folded = round_trip("smoothquant-folded-w8a8")
    replaced = read_manifest(folded.directory)["graph"]["replaced"]
    assert replaced and all(path.endswith("layernorm.weight") for path in replaced)
    routed = round_trip("smoothquant-routed-w8a8").loaded.graph_module
    routers = [m for m in routed.modules() if isinstance(m, ModalityScale)]
    assert len(routers) == 4
    by_name = {m.name: m for m in quant_linears(routed)}
    assert routers[0].scales is by_name["layers.0.self_attn.q_proj"].scales is by_name["layers.0.self_attn.v_proj"].scales
    cmc = round_trip("mas-cmc-w4a8").loaded.graph_module
    module = next(m for m in quant_linears(cmc) if m.name == "layers.0.self_attn.k_proj")
    assert module.weight_rows == "text" and module.stored_rows() == [0] and sorted(module.branches) == [1, 2]


def test_hf_model_is_not_modified_by_save_and_load(omni, round_trip):
    for name in RECIPES:  # every recipe saved from and loaded into omni.model
        round_trip(name)
    after = omni.model.state_dict()
    assert omni.state.keys() == after.keys() and all(torch.equal(omni.state[k], after[k]) for k in after)


@settings(max_examples=30)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 3),
    bits=st.integers(2, 8),
    grid=st.sampled_from(["full", "restricted", "asymmetric"]),
    group=st.sampled_from([None, 8]),
    clip_search=st.booleans(),
    compensated=st.booleans(),
    static=st.booleans(),
    divide_input=st.booleans(),
)
def test_quant_linear_state_round_trips_through_the_file_format(
    seed, rows, bits, grid, group, clip_search, compensated, static, divide_input
):
    """Any QuantLinear state → safetensors bytes + JSON record → a fresh QuantLinear computing the same."""
    gen = torch.Generator().manual_seed(seed)
    weight, bias = torch.randn(12, 24, generator=gen), torch.randn(12, generator=gen)
    module = QuantLinear(weight, bias, "lin")
    module.set_scales(torch.rand(rows, 24, generator=gen) + 0.1, torch.tensor([0, min(1, rows - 1), rows - 1]))
    module.set_quantizers(
        weight=WeightQuantConfig(
            bits=bits, symmetric=grid != "asymmetric", grid="full" if grid == "asymmetric" else grid,
            group_size=group, clip_search=clip_search, clip_steps=4,
        ),
        activation=ActQuantConfig(granularity="per_tensor" if static else "per_token"),
        static_scale=0.03 if static else None,
    )  # fmt: skip
    if not divide_input:
        module.divide_upstream()
    if compensated:
        module.use_text_weight()
        for row in range(1, rows):
            module.set_branch(row, torch.randn(24, 3, generator=gen), torch.randn(3, 12, generator=gen) * 0.1)
    tensors: dict[str, torch.Tensor] = {}
    stored = checkpoint._store_linear("lin", LinearRecord.of(module), checkpoint._Tables(tensors), tensors, (12, 24))
    record = json.loads(json.dumps(stored))
    tensors = safetensors.torch.load(safetensors.torch.save(tensors))
    fresh = checkpoint._read_linear("lin", record, checkpoint._scale_tables(tensors), tensors).build(weight, bias, "lin")
    assert fresh.state == module.state
    x, ids = torch.randn(2, 5, 24, generator=gen), torch.randint(0, len(Modality), (2, 5), generator=gen)
    with torch.no_grad():
        assert torch.equal(fresh(x, ids), module(x, ids))
    for row in module.stored_rows():
        assert torch.equal(fresh.quantized_weight(row), module.quantized_weight(row))


# ----------------------------------------------------------------------------- determinism, manifest


@pytest.mark.parametrize("name", ["mas-cmc-w4a8", "gptq-w4a8"])
def test_same_inputs_give_identical_bytes(omni, name, tmp_path):
    recipe = RECIPES[name]
    first = save(omni.quantize(recipe), tmp_path / "a", model=omni.model, recipe=recipe)
    second = save(omni.quantize(recipe), tmp_path / "b", model=omni.model, recipe=recipe)
    assert _files(first) == _files(second)


def test_manifest_records_recipe_versions_model_tokens_and_calibration(omni, round_trip, tmp_path):
    trip = round_trip("mas-cmc-w4a8")
    manifest = read_manifest(trip.directory)
    assert manifest["format_version"] == checkpoint.FORMAT_VERSION
    assert Recipe.from_dict(manifest["recipe"]) == trip.recipe
    assert set(manifest["versions"]) == {"torch", "torchao", "transformers", "safetensors", "masq_fx"}
    assert manifest["model"]["family"] == "qwen2.5-omni-thinker"
    assert manifest["model"]["hf_class"].endswith("Qwen2_5OmniThinkerForConditionalGeneration")
    assert manifest["modality_tokens"] == {k: TINY_TOKENS[k] for k in ("image", "video", "audio")}
    calibration = manifest["calibration"]
    assert calibration["samples"] == 1 and calibration["tokens"]["vision"] > 0 and calibration["tokens"]["audio"] > 0
    other = replace(omni.inputs, inputs_embeds=omni.inputs.inputs_embeds + 1e-3)
    resaved = save(Context(trip.loaded, [other]), tmp_path / "c", model=omni.model, recipe=trip.recipe)
    assert read_manifest(resaved)["calibration"]["sha256"] != calibration["sha256"]


def test_recipes_round_trip_through_json():
    recipes = [*RECIPES.values(), replace(preset("mas", 4, 6), learning=MASLearningConfig(epochs=3, learn_clipping=True))]
    for recipe in recipes:
        assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


# ----------------------------------------------------------------------------- packing and sizes


@given(
    rows=st.integers(0, 5),
    columns=st.integers(1, 37),
    seed=st.integers(0, 2**31 - 1),
)
def test_int4_pack_unpack_round_trip(rows, columns, seed):
    codes = torch.randint(-8, 8, (rows, columns), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, (columns + 1) // 2)
    assert torch.equal(unpack_int4(packed, columns), codes)


def test_int4_pack_rejects_codes_outside_four_bits():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[8]], dtype=torch.int8))


def test_weight_codes_are_packed_and_sizes_are_counted_from_the_file(round_trip):
    trip = round_trip("smoothquant-folded-w4a8")
    tensors = safetensors.torch.load_file(trip.directory / checkpoint.TENSORS)
    codes = tensors["linear/layers.0.mlp.down_proj/weight/0/codes"]
    assert codes.dtype == torch.uint8 and codes.shape == (64, 64)  # [out, in / 2] of a 64 × 128 weight
    sizes = linear_bytes(trip.directory, bits=4)
    shapes = [(m.out_features, m.in_features) for m in quant_linears(trip.loaded.graph_module)]
    assert sizes.linears == len(shapes) == 14
    assert sizes.fp32_bytes == sum(4 * o * i for o, i in shapes)
    assert sizes.weight_bytes == sum(o * i // 2 + 4 * o for o, i in shapes)  # codes + per-channel scales
    assert sizes.weight_ratio == pytest.approx(0.125 + 4 * sum(o for o, _ in shapes) / sizes.fp32_bytes)
    w8 = linear_bytes(round_trip("rtn-w8a8").directory, bits=8)
    assert w8.weight_bytes == sum(o * i + 4 * o for o, i in shapes) and w8.smoothing_bytes == w8.branch_bytes == 0
    cmc = linear_bytes(round_trip("mas-cmc-w4a8").directory, bits=4)
    assert cmc.weight_bytes == sizes.weight_bytes and cmc.branch_bytes > 0 and cmc.total_ratio > cmc.weight_ratio
    with pytest.raises(CheckpointError, match="no decoder linears with 8-bit weights"):
        linear_bytes(trip.directory, bits=8)


# ----------------------------------------------------------------------------- refusals


@pytest.fixture
def copied(round_trip, tmp_path) -> Path:
    """A copy of a checkpoint that a test may damage."""
    return Path(shutil.copytree(round_trip("rtn-w8a8").directory, tmp_path / "copy"))


def test_load_refuses_a_model_with_other_weights(copied):
    other = tiny_model("qwen2.5-omni-thinker", seed=1, batch_size=2).model
    with pytest.raises(CheckpointError, match="float weights differ.*load the checkpoint into the model it was quantized from"):
        load(copied, other)


def test_load_refuses_a_model_with_another_config(omni, copied):
    other = copy.deepcopy(omni.model)
    other.config.get_text_config().rms_norm_eps = 1e-3
    with pytest.raises(CheckpointError, match="config differ"):
        load(copied, other)


def test_load_refuses_a_model_of_another_class(copied):
    with pytest.raises(CheckpointError, match="made from a .*Qwen2_5OmniThinker.*not a .*LlamaForCausalLM"):
        load(copied, tiny_model("llama", seed=0).model)


def test_load_refuses_a_truncated_tensor_file(omni, copied):
    path = copied / checkpoint.TENSORS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt.*copy the checkpoint again"):
        load(copied, omni.model)


def test_load_refuses_a_corrupt_tensor_file(omni, copied):
    path = copied / checkpoint.TENSORS
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is corrupt: its sha256"):
        load(copied, omni.model)


@pytest.mark.parametrize("file", [checkpoint.TENSORS, checkpoint.MANIFEST])
def test_load_refuses_a_missing_file(omni, copied, file):
    (copied / file).unlink()
    with pytest.raises(CheckpointError, match=f"{file} is missing"):
        load(copied, omni.model)


def test_load_refuses_a_newer_format_version(omni, copied):
    path = copied / checkpoint.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["format_version"] = checkpoint.FORMAT_VERSION + 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"format version {checkpoint.FORMAT_VERSION + 1}, newer than .*upgrade masq_fx"):
        load(copied, omni.model)


def as_format_v1(directory: Path, *, quantizers_enabled: bool = True) -> None:
    """Rewrite a saved checkpoint as format version 1 (with the fields early v1 writers left out dropped):
    each linear's flags and configs at its record's top level, its static scale as a tensor."""
    path = directory / checkpoint.MANIFEST
    manifest = json.loads(path.read_text())
    tensors = safetensors.torch.load_file(directory / checkpoint.TENSORS)
    for name, record in manifest["graph"]["linears"].items():
        state = record.pop("state")
        static = state.pop("act_static_scale")
        if static is not None:
            tensors[f"linear/{name}/act_static_scale"] = torch.tensor(static, dtype=torch.float32)
        record.update(state, quantizers_enabled=quantizers_enabled)
        assert record.pop("branch_bits") is None  # float factors: what a v1 record without the field means
    del manifest["calibration"]["sample_sha256"], manifest["model"]["dtype"]
    data = safetensors.torch.save(tensors)
    (directory / checkpoint.TENSORS).write_bytes(data)
    manifest["tensors"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest["format_version"] = 1
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


@pytest.mark.parametrize("name", ["rtn-w4a8-asymmetric-g16-static", "mas-cmc-w4a8", "smoothquant-routed-w8a8"])
def test_format_version_1_is_migrated(omni, round_trip, tmp_path, name):
    trip = round_trip(name)
    old = Path(shutil.copytree(trip.directory, tmp_path / "v1"))
    as_format_v1(old)
    manifest = read_manifest(old)
    assert manifest["format_version"] == checkpoint.FORMAT_VERSION and manifest["calibration"]["sample_sha256"] == []
    assert manifest["graph"] == read_manifest(trip.directory)["graph"]
    _assert_same_outputs(trip.context.captured, load(old, omni.model), omni.probes())


def test_format_version_1_with_quantizers_off_is_refused(omni, round_trip, tmp_path):
    old = Path(shutil.copytree(round_trip("rtn-w8a8").directory, tmp_path / "v1"))
    as_format_v1(old, quantizers_enabled=False)
    with pytest.raises(CheckpointError, match="format version 1.* quantizers of .* off.*quantize the model again"):
        load(old, omni.model)


def test_load_never_unpickles(omni, copied, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during load")

    for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(target, name, refuse)
    load(copied, omni.model)


def test_save_refuses_a_model_other_than_the_captured_one(round_trip, tmp_path):
    trip = round_trip("rtn-w8a8")
    other = tiny_model("qwen2.5-omni-thinker", seed=1, batch_size=2).model
    with pytest.raises(CheckpointError, match="float weight is not the given model's"):
        save(trip.context, tmp_path / "c", model=other, recipe=trip.recipe)
    assert not (tmp_path / "c").exists()


def test_save_refuses_a_lowered_graph(omni, round_trip, tmp_path):
    trip = round_trip("rtn-w8a8")
    lowered = copy.deepcopy(trip.context.captured)
    lower_to_torchao(lowered)
    with pytest.raises(CheckpointError, match="save the reference graph, before lower_to_torchao"):
        save(Context(lowered), tmp_path / "c", model=omni.model, recipe=trip.recipe)


# ----------------------------------------------------------------------------- atomic writes


def test_existing_directory_is_replaced_only_with_overwrite(omni, round_trip, tmp_path):
    rtn, sq = round_trip("rtn-w8a8"), round_trip("smoothquant-folded-w8a8")
    target = save(rtn.context, tmp_path / "c", model=omni.model, recipe=rtn.recipe)
    with pytest.raises(CheckpointError, match="already exists: pass overwrite=True"):
        save(sq.context, target, model=omni.model, recipe=sq.recipe)
    assert _files(target) == _files(rtn.directory)
    save(sq.context, target, model=omni.model, recipe=sq.recipe, overwrite=True)
    assert _files(target) == _files(sq.directory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_overwrite_never_replaces_something_that_is_not_a_checkpoint(omni, round_trip, tmp_path):
    rtn = round_trip("rtn-w8a8")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("keep me")
    (tmp_path / "file").write_text("keep me too")
    for target in (tmp_path / "data", tmp_path / "file"):
        with pytest.raises(CheckpointError, match="is not a masq_fx checkpoint directory: refusing to replace it"):
            save(rtn.context, target, model=omni.model, recipe=rtn.recipe, overwrite=True)
    assert (tmp_path / "data" / "notes.txt").read_text() == "keep me" and (tmp_path / "file").is_file()


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_save_leaves_no_checkpoint_and_keeps_the_old_one(omni, round_trip, tmp_path, monkeypatch, existing):
    rtn, sq = round_trip("rtn-w8a8"), round_trip("smoothquant-folded-w8a8")
    target = tmp_path / "c"
    if existing:
        save(rtn.context, target, model=omni.model, recipe=rtn.recipe)
    write = checkpoint.write_bytes_atomically

    def interrupted(path, data):
        write(path, data[: len(data) // 2])
        if path.name == checkpoint.MANIFEST:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_bytes_atomically", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(sq.context, target, model=omni.model, recipe=sq.recipe, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["c"] if existing else [])
    if existing:
        assert _files(target) == _files(rtn.directory)


def test_failed_rename_restores_the_old_checkpoint(omni, round_trip, tmp_path, monkeypatch):
    rtn, sq = round_trip("rtn-w8a8"), round_trip("smoothquant-folded-w8a8")
    target = save(rtn.context, tmp_path / "c", model=omni.model, recipe=rtn.recipe)
    rename = checkpoint.os.rename

    def failing(src, dst):
        if Path(src).name.endswith(".partial"):
            raise OSError("disk full")
        rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", failing)
    with pytest.raises(OSError, match="disk full"):
        save(sq.context, target, model=omni.model, recipe=sq.recipe, overwrite=True)
    assert _files(target) == _files(rtn.directory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
