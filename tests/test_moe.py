"""Mixture-of-experts decoders: unfused experts, per-expert and per-modality calibration over the routed tokens
only, float routers, experts no token reached, and the int8 backend compiled over data-dependent expert rows.

Capture and cached generation against HF run for the MoE families with every tiny family
(``test_capture_families.py``, ``test_generation.py``); quantize → save → load → lower → generate in
``test_family_round_trip.py``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from masq_fx.api import calibrate, quantize
from masq_fx.app.run_report import build
from masq_fx.calibration.coverage import expert_coverage
from masq_fx.errors import InputError
from masq_fx.modality import Modality
from masq_fx.models import adapter_for
from masq_fx.models.experts import RoutedExperts, routed_experts
from masq_fx.models.tiny import tiny_model, tiny_qwen3_vl_moe
from masq_fx.nn.quant_linear import QuantLinear
from masq_fx.quantizers import WeightQuantConfig, fake_quant_weight
from masq_fx.transforms.prepare import quant_linears


def _sparse_block(model: nn.Module) -> nn.Module:
    return adapter_for(model).layers()[1].mlp


def _routed_counts(tiny) -> torch.Tensor:
    """``[experts, modalities]``: the batch's real tokens the HF router sends to each expert, by modality."""
    block = _sparse_block(tiny.model)
    caught = {}
    handle = block.gate.register_forward_hook(lambda _m, _a, out: caught.update(indices=out[2]))
    try:
        with torch.no_grad():
            tiny.model(**tiny.batch)
    finally:
        handle.remove()
    inputs = adapter_for(tiny.model).decoder_inputs(tiny.batch)
    valid = inputs.attention_mask.reshape(-1).bool()
    modality = inputs.modality_ids.reshape(-1)
    counts = torch.zeros(block.experts.num_experts, len(Modality), dtype=torch.long)
    for token, experts in enumerate(caught["indices"]):
        if valid[token]:
            for expert in experts.tolist():
                counts[expert, modality[token]] += 1
    return counts


def test_unfused_experts_view_the_fused_tensors_and_compute_the_same():
    tiny = tiny_model("qwen3-vl-moe")
    hf_experts = tiny.model.model.language_model.layers[1].mlp.experts  # HF's fused module, before any adapter
    assert not isinstance(hf_experts, RoutedExperts)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 64, generator=gen)
    index = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(9)])
    weights = torch.rand(9, 2, generator=gen)
    with torch.no_grad():
        expected = hf_experts(hidden, index, weights)
        fp = tiny.model(**tiny.batch).logits

    block = _sparse_block(tiny.model)  # making the adapter unfuses the experts in place
    assert isinstance(block.experts, RoutedExperts) and len(block.experts) == 4
    assert block.experts[2].gate_proj.weight.shape == (64, 64) and block.experts[2].down_proj.weight.shape == (64, 64)
    assert block.experts[2].gate_proj.weight.data_ptr() == hf_experts.gate_up_proj[2].data_ptr()  # views, not copies
    assert block.experts[2].up_proj.weight.data_ptr() == hf_experts.gate_up_proj[2, 64:].data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(block.experts(hidden, index, weights), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(tiny.model(**tiny.batch).logits, fp, rtol=0, atol=0)


def test_a_fused_layout_it_does_not_cover_is_refused():
    experts = Qwen3MoeExperts(Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=8, num_experts=2))
    assert isinstance(routed_experts(experts), RoutedExperts)
    experts.has_bias = True
    with pytest.raises(InputError, match="layout masq_fx does not unfuse"):
        routed_experts(experts)


def test_each_expert_is_observed_on_its_routed_tokens_per_modality():
    tiny = tiny_qwen3_vl_moe(experts=8, top_k=2)
    expected = _routed_counts(tiny)
    calibrated = calibrate(tiny.model, [tiny.batch], progress=False)
    for expert in range(8):
        for projection in ("gate_proj", "down_proj"):
            stats = calibrated.stats[f"layers.1.mlp.experts.{expert}.{projection}"]
            assert stats.count.tolist() == expected[expert].tolist(), (expert, projection)
    assert "layers.1.mlp.gate" not in calibrated.stats  # the router is not observed
    assert calibrated.captured.routers == {"layers.1.mlp.gate"}


def test_experts_no_token_reached_keep_rtn_weights_and_the_report_counts_them():
    """16 experts, top 1: some see no token, some no vision token. masquant-w4a8 (MAS, CMC, GPTQ, rotation) runs;
    an expert without tokens is not smoothed and keeps its round-to-nearest codes; the router stays float."""
    tiny = tiny_qwen3_vl_moe(experts=16, top_k=1)
    counts = _routed_counts(tiny)
    unseen = [e for e in range(16) if counts[e].sum() == 0]
    without_vision = [e for e in range(16) if counts[e].sum() > 0 and counts[e, Modality.VISION] == 0]
    assert unseen and without_vision  # the seed gives both cases
    qm = quantize(tiny.model, "masquant-w8a8", [tiny.batch], progress=False)
    modules = {m.name: m for m in quant_linears(qm.decoder.graph_module)}
    assert "layers.1.mlp.gate" not in modules
    for expert in unseen:
        module = modules[f"layers.1.mlp.experts.{expert}.gate_proj"]
        assert module.scales is None
    seen = modules[f"layers.1.mlp.experts.{without_vision[0]}.gate_proj"]
    assert seen.scales is not None and seen.scales.shape[0] == 1  # vision falls back to the expert's text row
    with torch.no_grad():
        fp = tiny.model(**tiny.batch).logits
    logits = qm.logits(tiny.batch)
    assert torch.isfinite(logits).all() and (logits - fp).norm() < 0.05 * fp.norm()

    report = build(qm, title="moe")
    (layer,) = report.experts
    assert (layer.layer, layer.experts, layer.unseen) == (1, 16, len(unseen))
    assert layer.seen[Modality.VISION] == int((counts[:, Modality.VISION] > 0).sum())
    assert layer.seen[Modality.TEXT] == int((counts[:, Modality.TEXT] > 0).sum())
    assert "## Experts" in report.markdown() and all("experts" not in site for sites in report.uncovered.values() for site in sites)
    assert expert_coverage(qm.decoder.sites, qm.context.stats, qm.decoder.modalities) == list(report.experts)


def test_gptq_leaves_an_expert_without_tokens_at_round_to_nearest():
    tiny = tiny_qwen3_vl_moe(experts=16, top_k=1)
    unseen = next(e for e in range(16) if _routed_counts(tiny)[e].sum() == 0)
    qm = quantize(tiny.model, "smoothquant-w4a8-gptq", [tiny.batch], progress=False)
    module = next(m for m in quant_linears(qm.decoder.graph_module) if m.name == f"layers.1.mlp.experts.{unseen}.up_proj")
    assert isinstance(module, QuantLinear) and module.scales is None
    expected = fake_quant_weight(module.weight.detach().float(), WeightQuantConfig(bits=4))
    torch.testing.assert_close(module.quantized_weight(None).float(), expected, rtol=0, atol=1e-6)


def test_lowered_moe_generates_the_same_compiled(one_thread):
    """Expert rows are data-dependent (unbacked) in the compiled graph: the int8 GEMMs pad them without branching
    (a decode token leaves most experts with none)."""
    tiny = tiny_model("qwen3-moe")  # text only: no tower, a shorter compile
    qm = quantize(tiny.model, "smoothquant-w8a8", [tiny.batch], progress=False)
    assert not qm.lower().unlowered
    eager = qm.generate(tiny.batch, max_new_tokens=3)
    assert torch.equal(qm.generate(tiny.batch, max_new_tokens=3, compiled=True), eager)
