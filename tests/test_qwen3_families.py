"""Qwen3-VL's DeepStack features (images and video) reach the captured decoder through ``inputs_embeds``. Capture
and cached generation against HF run for every tiny family in ``test_capture_families.py`` and
``test_generation.py``; the quantize → save → load → lower → generate round trip in ``test_family_round_trip.py``."""

from __future__ import annotations

from dataclasses import replace

import torch

from masq_fx.capture.decoder import capture
from masq_fx.eval.accuracy import eager_decoder
from masq_fx.generation import capture_cached, generate
from masq_fx.modality import Modality
from masq_fx.models import adapter_for
from masq_fx.models.tiny import TINY_TOKENS, tiny_qwen3_vl

NEW_TOKENS = 4


def test_qwen3_vl_image_and_video_with_deepstack_equal_hf(one_thread):
    """Images and video in one row (HF joins their DeepStack features): the captured decoder fed by the eager
    towers equals the HF forward, cached generation equals HF generate(), and the features matter."""
    tiny = tiny_qwen3_vl(video=True)
    adapter = adapter_for(tiny.model)
    assert adapter.injection_layers() == (0, 1) and adapter.embed_width() == 3 * 64
    inputs = adapter.decoder_inputs(tiny.batch)
    ids = tiny.batch["input_ids"]
    vision = inputs.modality_ids == int(Modality.VISION)
    assert torch.equal(vision, (ids == TINY_TOKENS["image"]) | (ids == TINY_TOKENS["video"]))
    assert all(bool((row == TINY_TOKENS["video"]).any()) for row in ids)
    features = inputs.inputs_embeds[..., 64:].reshape(*ids.shape, 2, 64)
    assert bool(features[vision].abs().amax(-1).gt(0).all()) and not features[~vision].any()
    captured = capture(tiny.model)
    with torch.no_grad():
        hf = tiny.model(**tiny.batch).logits
        torch.testing.assert_close(eager_decoder(tiny.model)(inputs), hf, rtol=0, atol=0)
        torch.testing.assert_close(captured(inputs), hf, rtol=0, atol=0)
        without = replace(inputs, inputs_embeds=adapter.pack(inputs.inputs_embeds[..., :64]))
        assert (captured(without) - hf).abs().max() > 1e-2, "the features change the logits"
        expected = tiny.model.generate(**tiny.batch, max_new_tokens=NEW_TOKENS, do_sample=False)[:, ids.shape[1]:]
    cached = capture_cached(tiny.model, batch_size=2, max_cache_len=ids.shape[1] + NEW_TOKENS)
    assert torch.equal(generate(cached, inputs, NEW_TOKENS), expected)
    decoded = adapter.embed(torch.tensor([[5], [7]]))  # decoded text tokens carry no features
    assert decoded.shape == (2, 1, 3 * 64) and not decoded[..., 64:].any()
