"""The families added after the first six, end to end: quantize → save → load → lower → generate (the capture
and cached-generation tests against HF run for every tiny family in ``test_capture_families.py`` and
``test_generation.py``)."""

from __future__ import annotations

import pytest
import torch
from helpers import GEMMA4_ERROR

from masq_fx.api import load, quantize
from masq_fx.eval.accuracy import greedy_decode
from masq_fx.models import adapter_for
from masq_fx.models.tiny import tiny_model

NEW_TOKENS = 4


@pytest.mark.parametrize("family", ["qwen3", "qwen3-vl", "mistral3", "idefics3", "internvl", "llava-onevision", "voxtral", "gemma3", "gemma3-text", "qwen3-moe", "qwen3-vl-moe", "qwen3-omni-moe-thinker", "gemma4", "gemma4-text", "qwen3.5-moe"])
def test_quantize_save_load_lower_generate(family, tmp_path, one_thread):
    tiny = tiny_model(family)
    qm = quantize(tiny.model, "masquant-w8a8", [tiny.batch], progress=False)
    logits = qm.logits(tiny.batch)
    with torch.no_grad():
        fp = tiny.model(**tiny.batch).logits
    bound, lowered = (GEMMA4_ERROR, 5e-2) if family.startswith("gemma4") else (0.1, 2e-2)  # int8 kernels against the reference
    assert not torch.equal(logits, fp) and (logits - fp).norm() < bound * fp.norm()
    qm.save(tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt", tiny.model)
    assert torch.equal(loaded.logits(tiny.batch), logits)
    assert not loaded.lower().unlowered
    assert (loaded.logits(tiny.batch) - logits).abs().max() <= lowered * logits.abs().max()
    # the KV-cache graph (lowered modules transplanted) generates what the cache-free graph does
    prompt = loaded.decoder_inputs(tiny.batch)
    expected = greedy_decode(loaded.decoder, adapter_for(tiny.model), prompt, NEW_TOKENS, None)
    assert torch.equal(loaded.generate(tiny.batch, max_new_tokens=NEW_TOKENS), expected)




def test_gemma3_image_masks_compile(one_thread):
    """Gemma 3's image-block masks (built from modality ids inside the graph) go through torch.compile: the
    compiled lowered KV-cache graph generates what the eager one does."""
    tiny = tiny_model("gemma3")
    qm = quantize(tiny.model, "smoothquant-w8a8", [tiny.batch], progress=False)
    qm.lower()
    eager = qm.generate(tiny.batch, max_new_tokens=NEW_TOKENS)
    assert torch.equal(qm.generate(tiny.batch, max_new_tokens=NEW_TOKENS, compiled=True), eager)
