"""The real SmolLM2-135M weights: capture matches the eager model on real text."""

from __future__ import annotations

import pytest
import torch

from masq_fx.capture.decoder import PLACEHOLDERS
from masq_fx.data.text import token_windows
from masq_fx.models import adapter_for

pytestmark = pytest.mark.slow


def test_captured_logits_match_eager_on_real_text(smollm2, smollm2_captured):
    model, tokenizer = smollm2
    ids = token_windows(tokenizer, "evaluation", window=128, count=2)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs = adapter_for(model).decoder_inputs(batch)
    with torch.no_grad():
        eager = model(**batch).logits
        graph = smollm2_captured(inputs)
    torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)
    # real weights, real text: the model is a good language model on it
    loss = torch.nn.functional.cross_entropy(graph[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert torch.exp(loss) < 40


def test_smollm2_graph_structure(smollm2_captured):
    gm = smollm2_captured.graph_module
    names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    assert tuple(names) == PLACEHOLDERS
    assert len(smollm2_captured.decoder_linears()) == 7 * 30
    assert smollm2_captured.num_layers == 30 and smollm2_captured.hidden_size == 576
    assert "lm_head" in smollm2_captured.linear_nodes()


def test_converted_weights_are_kept_and_read_back_identical(smollm2, tmp_path):
    """The float weights converted from the GGUF file are kept in the cache folder, whole or not at all, and a
    later load reads the same model and tokenizer from there."""
    from masq_fx.builtin.smollm2 import _content_hash, _keep, load_smollm2, smollm2_gguf_path

    model, tokenizer = smollm2
    _keep(tmp_path / f"smollm2-{_content_hash(smollm2_gguf_path())}", model, tokenizer)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    again, tokens = load_smollm2(cache=tmp_path)
    assert again.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    assert again.lm_head.weight is again.model.embed_tokens.weight
    text = "<|im_start|>user\nWhat is 2+2? ünïcödé<|im_end|>"
    assert tokens(text)["input_ids"] == tokenizer(text)["input_ids"] and tokens.chat_template == tokenizer.chat_template
    blocked = tmp_path / "file"
    blocked.write_text("")
    _keep(blocked / "smollm2-x", model, tokenizer)  # a cache folder that cannot be made is skipped
