"""Generation with a static KV cache on captured graphs: float == HF generate(), transformed graphs replayed
onto the cached graph compute what the prefill graph computes (the compiled cached graph: ``test_api.py``)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from helpers import prefix_greedy

from masq_fx.backends import lower_to_torchao
from masq_fx.calibration.calibrate import observe
from masq_fx.capture.decoder import capture
from masq_fx.generation import capture_cached, full_attention_mask, generate, transplant
from masq_fx.modality import Modality
from masq_fx.models import adapter_for
from masq_fx.models.tiny import TINY_FAMILIES, tiny_model
from masq_fx.pipeline import Context, Pipeline
from masq_fx.recipes import Recipe, preset, recipe_steps
from masq_fx.transforms.cmc import CMCConfig

NEW_TOKENS = 5
CACHE = 32
LOGIT_RTOL = 2e-2


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_float_cached_generation_equals_hf_generate(family, one_thread):
    tiny = tiny_model(family, seed=0, batch_size=2)
    adapter = adapter_for(tiny.model)
    prompt = adapter.decoder_inputs(tiny.batch)
    assert int((prompt.attention_mask == 0).sum()) > 0, "the tiny batch should be left-padded"
    cached = capture_cached(tiny.model, batch_size=2, max_cache_len=CACHE, logits_to_keep=0)
    with torch.no_grad():
        hf_logits = tiny.model(**tiny.batch).logits
        logits = cached(replace(prompt, attention_mask=full_attention_mask(prompt.attention_mask, CACHE)), 0)
        prompt_len = tiny.batch["input_ids"].shape[1]
        expected = tiny.model.generate(**tiny.batch, max_new_tokens=NEW_TOKENS, do_sample=False)[:, prompt_len:]
    torch.testing.assert_close(logits, hf_logits, rtol=1e-4, atol=1e-4)
    ours = generate(cached, prompt, NEW_TOKENS)
    eos = tiny.model.generation_config.eos_token_id
    for row, wanted in zip(ours, expected):  # HF pads a row after its end-of-sequence token; we continue greedily
        ended = torch.isin(wanted, torch.as_tensor(eos)).nonzero()
        length = int(ended[0]) + 1 if len(ended) else NEW_TOKENS
        assert torch.equal(row[:length], wanted[:length])


@pytest.fixture(scope="module")
def omni():
    tiny = tiny_model("qwen2.5-omni-thinker", seed=0, batch_size=2)
    prompt = adapter_for(tiny.model).decoder_inputs(tiny.batch)
    assert {int(m) for m in prompt.modality_ids.unique()} == {int(m) for m in Modality}
    captured = capture(tiny.model)
    stats = observe(Context(captured, [prompt]), moment_modalities=tuple(Modality), progress=False).stats
    return tiny, captured, prompt, stats


def _quantized(omni, recipe: Recipe):
    tiny, captured, prompt, stats = omni
    context = Context(copy.deepcopy(captured), [prompt], stats=stats, provided={"stats"})
    return Pipeline(recipe_steps(recipe, progress=False)).run(context, progress=False).captured


RECIPES = {
    "rtn-w8a8": preset("rtn", 8, 8),
    "smoothquant-folded": preset("smoothquant", 8, 8),
    "mas-init-tied-router": preset("mas-init", 8, 8, variant="tied"),
    "mas-init-w4a8-cmc": replace(preset("mas-init", 4, 8), cmc=CMCConfig(rank=4)),
}


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("lowered", [False, True])
def test_transplanted_cache_graph_computes_the_prefill_graph(omni, name, lowered, one_thread):
    tiny, _, prompt, _ = omni
    quantized = _quantized(omni, RECIPES[name])
    if lowered:
        assert not lower_to_torchao(quantized).unlowered
    cached = capture_cached(tiny.model, batch_size=2, max_cache_len=CACHE, logits_to_keep=0)
    assert transplant(quantized, cached) == 14
    with torch.no_grad():
        reference = quantized(prompt)
        logits = cached(replace(prompt, attention_mask=full_attention_mask(prompt.attention_mask, CACHE)), 0)
        fp = omni[1](prompt)
    # same modules, same integers; the cache's attention (over masked slots) rounds differently, which
    # can move an activation code by one step in a later layer (as in the backend tests)
    assert (logits - reference).abs().max() <= LOGIT_RTOL * reference.abs().max()
    assert (logits - reference).norm() < (reference - fp).norm()
    adapter = adapter_for(tiny.model)
    assert torch.equal(generate(cached, prompt, NEW_TOKENS), prefix_greedy(quantized, adapter, prompt, NEW_TOKENS))


def test_bad_requests_name_the_fix(omni):
    tiny, captured, prompt, _ = omni
    cached = capture_cached(tiny.model, batch_size=1, max_cache_len=CACHE)
    with pytest.raises(ValueError, match="batch_size=2"):
        generate(cached, prompt, 2)
    small = capture_cached(tiny.model, batch_size=2, max_cache_len=prompt.attention_mask.shape[1] + 1)
    with pytest.raises(ValueError, match="larger max_cache_len"):
        generate(small, prompt, 2)
    with pytest.raises(ValueError, match="nothing to transplant"):
        transplant(captured, small)


def test_head_runs_on_the_kept_positions_only(one_thread):
    tiny = tiny_model("llama", seed=0, batch_size=2)
    prompt = adapter_for(tiny.model).decoder_inputs(tiny.batch)
    step = replace(prompt, attention_mask=full_attention_mask(prompt.attention_mask, CACHE))
    every = capture_cached(tiny.model, batch_size=2, max_cache_len=CACHE, logits_to_keep=0)
    last = capture_cached(tiny.model, batch_size=2, max_cache_len=CACHE)
    with torch.no_grad():
        full, tail = every(step, 0), last(step, 0)
    assert tail.shape == (2, 1, full.shape[-1])
    torch.testing.assert_close(tail, full[:, -1:])
    assert torch.equal(generate(last, prompt, NEW_TOKENS), generate(every, prompt, NEW_TOKENS))
    with pytest.raises(ValueError, match="logits_to_keep must be >= 0"):
        capture_cached(tiny.model, batch_size=2, max_cache_len=CACHE, logits_to_keep=-1)
