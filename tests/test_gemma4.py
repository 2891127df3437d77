"""Gemma 4's own mechanisms on its tiny models (the capture, KV-cache generation and round-trip tests run for every
family): per-layer inputs carried in ``inputs_embeds``, image blocks attending both ways, per-layer KV shapes and
shared KV layers in the static cache, and MAS learning on a layer whose keys and values later layers reuse."""

from __future__ import annotations

import torch
from helpers import GEMMA4_ERROR
from transformers.cache_utils import DummyLayer

from masq_fx.api import quantize
from masq_fx.capture.decoder import capture
from masq_fx.generation import static_cache
from masq_fx.models import adapter_for
from masq_fx.models.tiny import tiny_model
from masq_fx.transforms.mas import _token_major


def test_per_layer_inputs_ride_in_inputs_embeds_and_decoded_tokens_get_their_own():
    tiny = tiny_model("gemma4-text")
    adapter = adapter_for(tiny.model)
    assert adapter.embed_width() == 64 + 2 * 8
    inputs = adapter.decoder_inputs(tiny.batch)
    ids = tiny.batch["input_ids"]
    # a text token's packed embedding is what the decoder input holds for it: token and per-layer embeddings
    torch.testing.assert_close(adapter.embed(ids), inputs.inputs_embeds, rtol=0, atol=0)
    per_layer = inputs.inputs_embeds[..., 64:]
    assert per_layer.abs().sum() > 0 and not torch.equal(per_layer[0, -1], per_layer[0, -2])


def test_image_tokens_attend_both_ways_in_the_sliding_layer():
    """The graph builds the bidirectional image mask from modality ids: it matches HF's forward with
    ``mm_token_type_ids`` (the family tests), and that forward differs from the causal one."""
    tiny = tiny_model("gemma4")
    causal = {k: v for k, v in tiny.batch.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        both_ways, plain = tiny.model(**tiny.batch).logits, tiny.model(**causal).logits
    assert not torch.allclose(both_ways, plain, atol=1e-4)
    with torch.no_grad():
        ours = capture(tiny.model)(adapter_for(tiny.model).decoder_inputs(tiny.batch))
    torch.testing.assert_close(ours, both_ways, rtol=1e-5, atol=1e-5)


def test_cache_layers_take_their_own_kv_shapes_and_shared_layers_keep_none():
    mixed = adapter_for(tiny_model("gemma4").model)
    assert mixed.kv_shapes() == ([2, 1], [16, 32])  # the full layer: one KV head of 32
    shared = adapter_for(tiny_model("gemma4-text").model)
    cache = static_cache(shared.text_config(), 16, shared.family)
    assert [type(layer).__name__ for layer in cache.layers] == ["StaticLayer", "DummyLayer"]
    assert isinstance(cache.layers[1], DummyLayer)


def test_mas_learns_against_the_keys_and_values_shared_layers_reuse(one_thread):
    """Layer 0 of ``gemma4-text`` hands its keys and values (``[batch, heads, seq, d]``) to layer 1: MAS learning's
    loss takes them token by token beside the hidden states, and the result stays close to the float model."""
    keys = torch.randn(2, 3, 5, 4)
    valid = torch.ones(2, 5, dtype=torch.bool)
    assert torch.equal(_token_major(keys, valid), keys.transpose(1, 2).reshape(2, 5, 12))
    hidden = torch.randn(2, 5, 7)
    assert torch.equal(_token_major(hidden, valid), hidden)
    tiny = tiny_model("gemma4-text")
    qm = quantize(tiny.model, "masquant-w8a8", [tiny.batch], progress=False)
    with torch.no_grad():
        fp = tiny.model(**tiny.batch).logits
    logits = qm.logits(tiny.batch)
    assert not torch.equal(logits, fp) and (logits - fp).norm() < GEMMA4_ERROR * fp.norm()
