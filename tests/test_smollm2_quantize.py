"""Real SmolLM2-135M weights through the quantization recipes (loose bounds on 2 windows)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from masq_fx.backends import lower_to_torchao
from masq_fx.calibration.calibrate import observe
from masq_fx.data.text import token_windows
from masq_fx.eval.perplexity import perplexity
from masq_fx.generation import capture_cached, generate, transplant
from masq_fx.models import adapter_for
from masq_fx.pipeline import Context, Pipeline
from masq_fx.recipes import preset, recipe_steps
from masq_fx.transforms import quant_linears
from masq_fx.transforms.mas import MASLearningConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def calibrated(smollm2, smollm2_captured):
    model, tokenizer = smollm2
    adapter = adapter_for(model)
    calib = token_windows(tokenizer, "calibration", window=128, count=4)
    samples = [adapter.decoder_inputs({"input_ids": r[None], "attention_mask": torch.ones_like(r[None])}) for r in calib]
    stats = observe(Context(copy.deepcopy(smollm2_captured), samples), progress=False).stats
    evaluation = token_windows(tokenizer, "evaluation", window=512, count=2)
    fp = perplexity(smollm2_captured, adapter, evaluation)
    return adapter, samples, stats, evaluation, fp


def _quantized_ppl(captured, calibrated, recipe) -> tuple[float, object]:
    adapter, samples, stats, evaluation, _ = calibrated
    graph = copy.deepcopy(captured)
    context = Context(graph, samples, stats=stats, provided={"stats"})
    Pipeline(recipe_steps(recipe, progress=False)).run(context, progress=False)
    return perplexity(graph, adapter, evaluation), graph


def test_w8a8_methods_stay_close_to_fp(smollm2_captured, calibrated):
    fp = calibrated[-1]
    assert fp < 40
    for method in ("rtn", "smoothquant", "mas-init"):
        ppl, graph = _quantized_ppl(smollm2_captured, calibrated, preset(method, 8, 8))
        assert ppl < fp * 1.10, (method, ppl, fp)
        quantized = [m.name for m in quant_linears(graph.graph_module) if m.weight_quant is not None]
        assert len(quantized) == 7 * 30 and "lm_head" not in quantized


def test_mas_learning_on_real_weights(smollm2_captured, calibrated):
    fp = calibrated[-1]
    recipe = replace(preset("mas", 8, 8), learning=MASLearningConfig(epochs=1))
    ppl, _ = _quantized_ppl(smollm2_captured, calibrated, recipe)
    assert ppl < fp * 1.05, (ppl, fp)


PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Give three tips for staying healthy.",
)


def test_w8a8_on_int8_kernels_generates_like_fp(smollm2, smollm2_captured, calibrated):
    """First 16 greedy tokens of the lowered W8A8 model, through the KV-cache graph, vs HF generate() in FP32.

    down_proj's input is smoothed too: without it, SmolLM2's massive activations make the per-token
    quantization of the attention-sink token so coarse that a 1e-7 change of the inputs (the left padding
    of a batched prompt changes the attention's summation order) flips a code and derails the greedy
    continuation of a padded row (measured: 1 of 3 prompts equal without, 2 of 3 with).
    """
    model, tokenizer = smollm2
    adapter = calibrated[0]
    recipe = preset("mas-init", 8, 8)
    recipe = replace(recipe, smoothing=replace(recipe.smoothing, kinds=("norm", "attention", "activation")))
    _, graph = _quantized_ppl(smollm2_captured, calibrated, recipe)
    assert not lower_to_torchao(graph).unlowered
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in PROMPTS]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    length = batch["input_ids"].shape[1]
    cached = capture_cached(model, batch_size=len(PROMPTS), max_cache_len=length + 16)
    transplant(graph, cached)
    ours = generate(cached, adapter.decoder_inputs(batch), 16)
    with torch.no_grad():
        reference = model.generate(**batch, max_new_tokens=16, do_sample=False, min_new_tokens=16)[:, length:]
    same = [bool(torch.equal(a, b)) for a, b in zip(ours, reference)]
    assert sum(same) >= 2, [tokenizer.decode(r) for r in ours]
