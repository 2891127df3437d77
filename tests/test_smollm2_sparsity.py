"""Real SmolLM2-135M weights through LaRoSA and TEAL (loose bounds on 2 evaluation windows)."""

from __future__ import annotations

import pytest
import torch

from masq_fx.backends.sparse import lower_sparse
from masq_fx.data.text import token_windows
from masq_fx.eval.perplexity import perplexity
from masq_fx.generation import capture_cached, generate, transplant
from masq_fx.modality import Modality
from masq_fx.models import adapter_for
from masq_fx.transforms.sparsity import SparsityConfig, achieved_sparsity, model_sparsity, sparsify

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def windows(smollm2):
    model, tokenizer = smollm2
    adapter = adapter_for(model)
    calibration = token_windows(tokenizer, "calibration", window=256, count=4)
    samples = [adapter.decoder_inputs({"input_ids": w[None], "attention_mask": torch.ones_like(w[None])}) for w in calibration]
    return samples, token_windows(tokenizer, "evaluation", window=512, count=2)


def test_larosa_beats_teal_and_keeps_its_level_on_real_weights(smollm2, smollm2_captured, windows):
    """The measured ordering (benchmarks/sparsity.py): at 50%, TEAL +70%, LaRoSA +40%; at 25% both within a few percent."""
    model, _ = smollm2
    adapter = adapter_for(model)
    samples, evaluation = windows
    dense = perplexity(smollm2_captured, adapter, evaluation)  # the rotations alone are float-exact: tests/test_sparsity.py, every family
    larosa = sparsify(smollm2_captured, SparsityConfig("larosa", 0.5), samples, progress=False)
    teal = sparsify(smollm2_captured, SparsityConfig("teal", 0.5), samples, progress=False)
    assert dense < perplexity(larosa, adapter, evaluation) < perplexity(teal, adapter, evaluation)
    mild = sparsify(smollm2_captured, SparsityConfig("larosa", 0.25), samples, progress=False)
    assert perplexity(mild, adapter, evaluation) < 1.1 * dense
    sizes = {name: w.numel() for name, w in larosa.weights.items()}
    assert model_sparsity(achieved_sparsity(larosa, samples[:2], progress=False), sizes)[Modality.TEXT] == pytest.approx(0.5, abs=0.005)


def test_larosa_decodes_on_the_sparse_kernel_like_its_prefill_graph(smollm2, smollm2_captured, windows):
    model, tokenizer = smollm2
    samples, _ = windows
    sparse = sparsify(smollm2_captured, SparsityConfig("larosa", 0.4), samples, progress=False)
    ids = tokenizer(["The capital of France is"], return_tensors="pt")["input_ids"]
    prompt = adapter_for(model).decoder_inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    cached = capture_cached(model, batch_size=1, max_cache_len=ids.shape[1] + 8)
    transplant(sparse, cached)
    expected = generate(cached, prompt, 2)
    assert lower_sparse(cached.graph_module) == 7 * smollm2_captured.num_layers
    # the prefill token and one decode step on the kernel; later tokens may part at near-ties: the kernel
    # sums the kept rows in another order, and 30 layers of Top-K selections amplify 1e-7 differences
    assert torch.equal(generate(cached, prompt, 2), expected)
