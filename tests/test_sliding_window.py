"""Sliding-window attention in the KV-cache graph: greedy generation equals HF ``generate()`` (left-padded) for
windows shorter than the prompt, between prompt and cache, and longer than the cache; on Mistral text, LLaVA
on a Mistral decoder and Qwen3 with hybrid sliding/full layers; quantized graphs replay onto it; a cache layer
type the graph cannot hold is refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from masq_fx.api import quantize
from masq_fx.capture.decoder import capture
from masq_fx.errors import InputError
from masq_fx.eval.accuracy import greedy_decode
from masq_fx.generation import capture_cached, generate
from masq_fx.models import adapter_for
from masq_fx.models.tiny import TinyModel, tiny_llama, tiny_llava

NEW_TOKENS = 8
CACHE = 32
PROMPT = 12  # tokens of the longest tiny row (text and LLaVA alike)


def _hf_tokens(tiny: TinyModel, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    with torch.no_grad():
        out = tiny.model.generate(**tiny.batch, max_new_tokens=new_tokens, do_sample=False)
    return out[:, tiny.batch["input_ids"].shape[1]:]


def _cached_tokens(tiny: TinyModel) -> torch.Tensor:
    cached = capture_cached(tiny.model, batch_size=2, max_cache_len=CACHE)
    return generate(cached, adapter_for(tiny.model).decoder_inputs(tiny.batch), NEW_TOKENS)


@pytest.mark.parametrize("window", [5, 20, 4096], ids=["shorter-than-prompt", "longer-than-prompt", "longer-than-cache"])
def test_mistral_generation_equals_hf_generate(window, one_thread):
    tiny = tiny_llama(sliding_window=window)
    assert tiny.batch["input_ids"].shape[1] == PROMPT and int((tiny.batch["attention_mask"] == 0).sum()) > 0
    assert torch.equal(_cached_tokens(tiny), _hf_tokens(tiny))


@pytest.mark.parametrize("window", [5, 20], ids=["shorter-than-prompt", "longer-than-prompt"])
def test_llava_on_mistral_generation_equals_hf_generate(window, one_thread):
    tiny = tiny_llava(sliding_window=window)
    assert tiny.batch["input_ids"].shape[1] == PROMPT
    assert torch.equal(_cached_tokens(tiny), _hf_tokens(tiny))


def test_hybrid_sliding_and_full_layers_equal_hf_generate(one_thread):
    """Qwen3 with a sliding window on its second layer only: the model builds one mask per layer type."""
    llama = tiny_llama()
    config = Qwen3Config(**{**llama.model.config.to_diff_dict(), "head_dim": 16, "use_sliding_window": True,
                            "sliding_window": 5, "max_window_layers": 1})
    assert config.layer_types == ["full_attention", "sliding_attention"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config).eval()
    tiny = TinyModel("qwen3", model, llama.batch)
    assert torch.equal(_cached_tokens(tiny), _hf_tokens(tiny))


def test_prefill_capture_with_a_window_shorter_than_the_prompt_equals_hf(one_thread):
    tiny = tiny_llama(sliding_window=5)
    with torch.no_grad():
        logits = capture(tiny.model)(adapter_for(tiny.model).decoder_inputs(tiny.batch))
        torch.testing.assert_close(logits, tiny.model(**tiny.batch).logits, rtol=1e-5, atol=1e-5)


def test_quantized_sliding_graph_generates_what_its_prefill_graph_does(one_thread):
    tiny = tiny_llama(sliding_window=5)
    qm = quantize(tiny.model, "rtn-w8a8", [tiny.batch], progress=False)
    adapter = adapter_for(tiny.model)
    expected = greedy_decode(qm.decoder, adapter, qm.decoder_inputs(tiny.batch), NEW_TOKENS, None)
    assert torch.equal(qm.generate(tiny.batch, max_new_tokens=NEW_TOKENS), expected)


def test_cache_layers_the_graph_cannot_hold_are_refused():
    tiny = tiny_llama(sliding_window=5)
    tiny.model.config.layer_types = ["chunked_attention", "sliding_attention"]  # as Llama 4's chunked layers
    tiny.model.config.attention_chunk_size = 4
    with pytest.raises(InputError, match="chunked_attention.*cache-free graph"):
        capture_cached(tiny.model, batch_size=2, max_cache_len=CACHE)
