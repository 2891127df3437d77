"""Capture of every supported family on its tiny random-weight model (real HF classes, no download)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from masq_fx.capture.decoder import LAYER_KEY, MODULE_KEY, PLACEHOLDERS, CapturedDecoder, capture
from masq_fx.modality import Modality
from masq_fx.models import ModelAdapter, UnsupportedModelError, adapter_for, supported_families
from masq_fx.models.tiny import TINY_FAMILIES, TINY_TOKENS, TinyModel, tiny_model

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
#: the tiny MoE families' layer 1 is sparse: 4 experts of 3 projections each, and a float router
EXPERTS = 4


def _experts(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}experts.{e}.{p}" for e in range(EXPERTS) for p in ("gate_proj", "up_proj", "down_proj"))


def layer_linears(i: int, family: str = "llama") -> set[str]:
    """The quantized linears of layer ``i`` (a sparse MoE layer's experts; its router is not one).

    Gemma 4: every layer gates in its per-layer input; layer 1 has no ``v_proj`` (its values are its keys in
    ``gemma4``; it reuses layer 0's keys and values, so it has no ``k_proj`` either, in ``gemma4-text``, whose
    layers have a dense MLP beside their experts).

    Qwen3.5: layer 0 is linear attention (its four input projections and ``out_proj``); in ``qwen3.5-moe`` both
    layers are sparse, with a shared expert and its gate beside the experts."""
    if family.startswith("qwen3.5"):
        mixer = [f"linear_attn.{p}" for p in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")] if i == 0 else PROJECTIONS[:4]
        shared = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj", "mlp.shared_expert_gate")
        mlp = (*_experts("mlp."), *shared) if family == "qwen3.5-moe" else PROJECTIONS[4:]
        return {f"layers.{i}.{p}" for p in (*mixer, *mlp)}
    if "-moe" in family and i == 1:
        return {f"layers.{i}.{p}" for p in PROJECTIONS[:4] + _experts("mlp.")}
    if family.startswith("gemma4"):
        dropped = {"self_attn.v_proj"} | ({"self_attn.k_proj"} if family == "gemma4-text" else set()) if i == 1 else set()
        moe = _experts("") if family == "gemma4-text" else ()
        return {f"layers.{i}.{p}" for p in (*PROJECTIONS, "per_layer_input_gate", "per_layer_projection", *moe) if p not in dropped}
    return {f"layers.{i}.{p}" for p in PROJECTIONS}


def float_linears(family: str) -> set[str]:
    """The linears of the graph that stay float: the head, MoE routers, Gemma 4's per-layer input projection."""
    routers = {"layers.0.mlp.gate", "layers.1.mlp.gate"} if family == "qwen3.5-moe" else {"layers.1.mlp.gate"} if "-moe" in family else {"layers.0.router.proj", "layers.1.router.proj"} if family == "gemma4-text" else set()
    return {"lm_head"} | routers | ({"per_layer_model_projection"} if family.startswith("gemma4") else set())


def hf_logits(tiny: TinyModel, batch: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    with torch.no_grad():
        return tiny.model(**(tiny.batch if batch is None else batch)).logits


def run(captured: CapturedDecoder, inputs) -> torch.Tensor:
    with torch.no_grad():
        return captured(inputs)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family(request) -> tuple[TinyModel, ModelAdapter, CapturedDecoder]:
    """A tiny model, its adapter and its captured decoder, built once per family."""
    tiny = tiny_model(request.param)
    return tiny, adapter_for(tiny.model), capture(tiny.model)


def test_adapter_matches_family(family):
    tiny, adapter, captured = family
    assert adapter.family == tiny.family == captured.family
    assert tiny.family in supported_families()
    assert captured.num_layers == 2 and captured.hidden_size == 64
    assert adapter.lm_head() is tiny.model.get_output_embeddings()


def test_placeholders(family):
    _, _, captured = family
    names = [n.name for n in captured.graph_module.graph.find_nodes(op="placeholder")]
    assert names == list(PLACEHOLDERS)


def test_decoder_linears_are_tagged(family):
    _, _, captured = family
    expected = set().union(*(layer_linears(i, captured.family) for i in range(captured.num_layers)))
    floats = float_linears(captured.family)
    names = captured.decoder_linears()
    assert len(names) == len(expected)
    assert set(names) == expected
    assert captured.routers == floats - {"lm_head", "per_layer_model_projection"}
    assert set(captured.linear_nodes()) == expected | floats
    assert set(captured.weights) == expected | floats


def test_matches_hf_logits_on_multimodal_batch(family):
    tiny, adapter, captured = family
    inputs = adapter.decoder_inputs(tiny.batch)
    bsz, seq = tiny.batch["input_ids"].shape
    assert tiny.batch["attention_mask"].min() == 0, "the tiny batch should exercise left padding"
    expected_pos = (3, bsz, seq) if adapter.position_rows == 3 else (bsz, seq)
    assert tuple(inputs.position_ids.shape) == expected_pos
    close(run(captured, inputs), hf_logits(tiny))


def test_modality_ids_mark_placeholders(family):
    tiny, adapter, _ = family
    ids = tiny.batch["input_ids"]
    mods = adapter.decoder_inputs(tiny.batch).modality_ids
    expected = torch.full_like(ids, int(Modality.TEXT))
    expected[(ids == TINY_TOKENS["image"]) | (ids == TINY_TOKENS["video"])] = int(Modality.VISION)
    expected[ids == TINY_TOKENS["audio"]] = int(Modality.AUDIO)
    assert torch.equal(mods, expected)
    present = {Modality(int(v)) for v in mods.unique()}
    assert present == set(tiny.modalities)
    for row in mods:  # every row holds every modality of the family
        assert {Modality(int(v)) for v in row.unique()} == set(tiny.modalities)


def test_dynamic_sequence_length_and_batch(family):
    tiny, adapter, captured = family
    ref = hf_logits(tiny)
    inputs = adapter.decoder_inputs(tiny.batch)

    # a causal prefix of the multimodal inputs gives the prefix of the logits
    k = inputs.inputs_embeds.shape[1] - 3
    prefix = type(inputs)(
        inputs_embeds=inputs.inputs_embeds[:, :k],
        position_ids=inputs.position_ids[..., :k],
        modality_ids=inputs.modality_ids[:, :k],
        attention_mask=inputs.attention_mask[:, :k],
    )
    close(run(captured, prefix), ref[:, :k])

    # a text-only batch of another batch size and length, left-padded
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 240, (3, 5), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = TINY_TOKENS["pad"]
    text = {"input_ids": ids, "attention_mask": mask}
    close(run(captured, adapter.decoder_inputs(text)), hf_logits(tiny, text))

    # one unpadded multimodal row (same seed, so the same weights as the captured model)
    single = tiny_model(tiny.family, batch_size=1)
    assert torch.equal(single.model.get_output_embeddings().weight, tiny.model.get_output_embeddings().weight)
    close(run(captured, adapter_for(single.model).decoder_inputs(single.batch)), hf_logits(single))


def test_layer_nodes(family):
    _, _, captured = family
    seen: set[int] = set()
    for i in range(captured.num_layers):
        nodes = captured.layer_nodes(i)
        assert nodes, f"layer {i} has no nodes"
        assert all(n.meta[LAYER_KEY] == i for n in nodes)
        assert {n.meta[MODULE_KEY] for n in nodes if MODULE_KEY in n.meta} - captured.routers == layer_linears(i, captured.family)
        ids = {id(n) for n in nodes}
        assert not ids & seen
        seen |= ids
    assert captured.linear_nodes()["lm_head"].meta.get(LAYER_KEY) is None


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(nn.Linear(4, 4), id="linear"),
        pytest.param(
            GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)), id="gpt2"
        ),
    ],
)
def test_unsupported_model(model):
    with pytest.raises(UnsupportedModelError) as info:
        adapter_for(model)
    message = str(info.value)
    assert type(model).__name__ in message
    for name in supported_families():
        assert f"- {name}:" in message
    assert "ModelAdapter" in message and "register_adapter" in message
    with pytest.raises(UnsupportedModelError):
        capture(model)


def test_tiny_models_are_seeded():
    a, b, c = tiny_model("llava", seed=3), tiny_model("llava", seed=3), tiny_model("llava", seed=4)
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    for key in a.batch:
        assert torch.equal(a.batch[key], b.batch[key]), key
    assert not torch.equal(a.model.lm_head.weight, c.model.lm_head.weight)
    assert set(TINY_FAMILIES) <= set(supported_families())
    with pytest.raises(ValueError, match="qwen2-audio"):
        tiny_model("gpt2")


def test_qwen2_audio_refuses_unexpanded_audio_placeholders():
    tiny = tiny_model("qwen2-audio", batch_size=1)
    ids = torch.tensor([[5, 6, TINY_TOKENS["audio_start"], TINY_TOKENS["audio"], TINY_TOKENS["audio_end"], 7]])
    legacy = {**tiny.batch, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with pytest.raises(ValueError, match="legacy"):
        adapter_for(tiny.model).decoder_inputs(legacy)
