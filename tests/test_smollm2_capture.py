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
