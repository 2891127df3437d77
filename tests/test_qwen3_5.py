"""Qwen3.5's own mechanisms (the capture, KV-cache generation and round-trip tests run for every family): the
exportable gated delta rule against HF's reference kernels, and the linear-attention state the KV-cache graph
carries from call to call."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule, torch_recurrent_gated_delta_rule

from masq_fx.api import quantize
from masq_fx.capture.decoder import capture
from masq_fx.generation import capture_cached, full_attention_mask
from masq_fx.models import DecoderInputs, adapter_for
from masq_fx.models.linear_attention import gated_delta_rule
from masq_fx.models.tiny import tiny_model
from masq_fx.nn.routing import routers
from masq_fx.replay import replaced_attributes


def _inputs(gen: torch.Generator, batch: int, tokens: int, key_heads: int, repeat: int, dim: int) -> tuple[torch.Tensor, ...]:
    heads = key_heads * repeat
    q = torch.randn(batch, tokens, key_heads, dim, generator=gen)
    k = torch.randn(batch, tokens, key_heads, dim, generator=gen)
    v = torch.randn(batch, tokens, heads, dim, generator=gen)
    decay = -torch.rand(batch, tokens, heads, generator=gen) * 2  # log space, ≤ 0
    beta = torch.rand(batch, tokens, heads, generator=gen)
    state = torch.randn(batch, heads, dim, dim, generator=gen)
    return q, k, v, decay, beta, state


@settings(max_examples=12, deadline=None)
@given(tokens=st.integers(1, 140), repeat=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_gated_delta_rule_equals_the_token_by_token_recurrence(tokens, repeat, seed):
    q, k, v, decay, beta, state = _inputs(torch.Generator().manual_seed(seed), 2, tokens, 2, repeat, 8)
    out, last = gated_delta_rule(q, k, v, decay, beta, state)
    expected, expected_last = torch_recurrent_gated_delta_rule(
        q, k, v, g=decay, beta=beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, expected_last, rtol=1e-4, atol=1e-4)


def test_gated_delta_rule_over_many_chunks_equals_hf_chunked_kernel():
    """150 tokens (two chunks of 64 and a padded one) with memory reaching across chunks: HF's chunked kernel."""
    q, k, v, decay, beta, state = _inputs(torch.Generator().manual_seed(0), 1, 150, 2, 2, 16)
    decay = decay * 0.05  # memory reaching across chunks
    out, last = gated_delta_rule(q, k, v, decay, beta, state)
    expected, expected_last = torch_chunk_gated_delta_rule(
        q, k, v, g=decay, beta=beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, expected_last, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def qwen35():
    tiny = tiny_model("qwen3.5")
    adapter = adapter_for(tiny.model)
    return tiny, adapter, adapter.decoder_inputs(tiny.batch)


def test_a_prompt_continued_across_calls_equals_one_call(qwen35, one_thread):
    """The KV-cache graph carries each linear-attention layer's convolution window and recurrent state: a prompt
    fed in two calls (3 tokens, then the rest at slot 3) gives the last logits of one call; a later call at slot 0
    starts afresh (the states are read as zeros, whatever the previous sequence left)."""
    tiny, adapter, inputs = qwen35
    cached = capture_cached(tiny.model, batch_size=2, max_cache_len=24)
    mask = full_attention_mask(inputs.attention_mask, 24)

    def call(start: int, stop: int) -> torch.Tensor:
        part = DecoderInputs(inputs.inputs_embeds[:, start:stop], inputs.position_ids[..., start:stop], inputs.modality_ids[:, start:stop], mask)
        with torch.no_grad():
            return cached(part, start)

    length = inputs.inputs_embeds.shape[1]
    whole = call(0, length)
    call(0, 3)
    split = call(3, length)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(call(0, length), whole, rtol=0, atol=0)
    with torch.no_grad():
        prefill = capture(tiny.model)(inputs)[:, -1:]
    torch.testing.assert_close(whole, prefill, rtol=1e-5, atol=1e-5)


def test_one_plus_gamma_norms_become_plain_norm_sites(qwen35):
    """The capture gives each ``x̂·(1 + γ)`` norm the sum as its weight (produced by the capture, the HF parameter
    untouched, not an edit); the layers' inputs then group as norm sites, and gated outputs as ``gated`` sites."""
    tiny, adapter, inputs = qwen35
    captured = capture(tiny.model)
    gm = captured.graph_module
    path = "decoder.layers.0.input_layernorm.weight"
    hf = tiny.model.get_parameter("model.language_model.layers.0.input_layernorm.weight")
    assert torch.equal(gm.get_parameter(path), hf.float() + 1) and not torch.equal(hf, gm.get_parameter(path))
    assert replaced_attributes(gm, adapter) == {}
    kinds = {site.linears[0]: (site.kind, site.norm_weight) for site in captured.sites}
    assert kinds["layers.0.linear_attn.in_proj_qkv"] == ("norm", path)
    assert kinds["lm_head"] == ("norm", "decoder.norm.weight")
    assert kinds["layers.0.linear_attn.out_proj"][0] == kinds["layers.1.self_attn.o_proj"][0] == "gated"


def test_smoothing_folds_into_a_norm_only_when_its_group_reads_it_alone(one_thread):
    """SmoothQuant folds a layer's scales into its input norm; an MoE block's post-attention norm is read by the
    router and the experts beside the shared expert, so the shared expert's scales are divided by a router node."""
    tiny = tiny_model("qwen3.5-moe")
    qm = quantize(tiny.model, "smoothquant-w8a8", [tiny.batch], progress=False)
    gm, float_gm = qm.decoder.graph_module, capture(tiny.model).graph_module
    for path, folded in (("decoder.layers.0.input_layernorm.weight", True), ("decoder.layers.0.post_attention_layernorm.weight", False)):
        assert torch.equal(gm.get_parameter(path), float_gm.get_parameter(path)) != folded
    assert [readers for _, readers in routers(gm) if "layers.0.mlp.shared_expert.gate_proj" in readers]
    with torch.no_grad():
        fp = tiny.model(**tiny.batch).logits
    assert (qm.logits(tiny.batch) - fp).norm() < 0.1 * fp.norm()


@pytest.mark.parametrize("family", ["qwen3.5", "qwen3.5-moe"])
def test_text_only_classes_capture_generate_and_round_trip_like_hf(family, tmp_path, one_thread):
    """``Qwen3_5ForCausalLM`` / ``Qwen3_5MoeForCausalLM``: the same hybrid decoder without its tower (every token text)."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM

    from masq_fx.api import load
    from masq_fx.generation import generate
    from masq_fx.recipes import PRESETS

    tiny = tiny_model(family)
    cls = Qwen3_5MoeForCausalLM if family == "qwen3.5-moe" else Qwen3_5ForCausalLM
    torch.manual_seed(0)
    model = cls(tiny.model.config.text_config).eval()
    batch = {k: tiny.batch[k] for k in ("input_ids", "attention_mask")}  # left-padded; its media ids are plain tokens here
    adapter = adapter_for(model)
    assert adapter.family == f"{family}-text" and int((batch["attention_mask"] == 0).sum()) > 0
    prompt = adapter.decoder_inputs(batch)
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(capture(model)(prompt), expected, rtol=1e-4, atol=1e-4)
        length = batch["input_ids"].shape[1]
        wanted = model.generate(**batch, max_new_tokens=4, do_sample=False, eos_token_id=None)[:, length:]
    cached = capture_cached(model, batch_size=2, max_cache_len=length + 4, logits_to_keep=0)
    assert torch.equal(generate(cached, prompt, 4), wanted)
    if family == "qwen3.5":
        return  # the round trip below is the same for both; the MoE one has the experts too
    quantized = quantize(model, PRESETS["masquant-w8a8"], [batch], progress=False)
    quantized.save(tmp_path / "q")
    assert torch.equal(load(tmp_path / "q", model).logits(batch), quantized.logits(batch))
