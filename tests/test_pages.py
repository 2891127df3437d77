"""Giving back the pages of weights mapped from safetensors files (masq_fx.pages)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from masq_fx.pages import release

pytestmark = pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self")


def _resident_file_kib() -> int:
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("RssFile")))


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    """A float32 model saved as safetensors and loaded back in its stored dtype (so transformers maps it)."""
    folder = tmp_path_factory.mktemp("mapped")
    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)


def test_mapped_weights_are_given_back_and_read_again_unchanged(mapped):
    weights = [p for p in mapped.model.layers.parameters()]
    expected = [p.detach().clone() for p in weights]  # anonymous copies
    before = _resident_file_kib()
    assert sum(float(p.detach().sum()) for p in weights) != 0  # touched: resident
    touched = _resident_file_kib()
    given = release(weights)
    assert given >= 0.9 * sum(p.numel() * p.element_size() for p in weights)
    assert _resident_file_kib() < touched - given // 2048 and touched >= before
    assert all(torch.equal(p, e) for p, e in zip(weights, expected))  # read again from the file
    assert release(expected) == 0  # anonymous memory is never asked about


def test_a_page_written_to_is_kept(mapped):
    weight = mapped.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        weight[0, 0] = 123.0  # a private copy of that page now
    release([weight])
    assert float(weight.detach()[0, 0]) == 123.0
