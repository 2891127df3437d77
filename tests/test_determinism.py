"""The same command on the same data gives the same checkpoint bytes (at a given thread count)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from masq_fx import apply, calibrate, quantize
from masq_fx.data.text import token_windows
from masq_fx.models.tiny import tiny_model
from masq_fx.recipes import PRESETS
from masq_fx.transforms.quantize import ModuleFilter

FILES = ("quantized.safetensors", "manifest.json")


@pytest.fixture
def two_threads():
    """Learned scales reproduce at a fixed thread count; two threads make the atomic-add hazard real."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _bytes(folder) -> tuple[bytes, ...]:
    return tuple((folder / name).read_bytes() for name in FILES)


def _quantize_twice(model, recipe, batches, tmp_path) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    for run in ("a", "b"):
        quantize(model, recipe, batches, progress=False).save(tmp_path / run)
    return _bytes(tmp_path / "a"), _bytes(tmp_path / "b")


def test_learned_scales_reproduce_when_the_gradient_is_large(tmp_path, two_threads):
    # 4 × 160 tokens × 64 channels: the scale gradient of a linear has more than 32768 elements, where an
    # indexed gather's backward would add it with atomics across threads
    tiny = tiny_model("llama", seed=0, batch_size=2)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, tiny.model.config.vocab_size, (4, 160), generator=generator)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    recipe = PRESETS["masquant-w8a8"]
    learning = replace(recipe.learning, epochs=1, learn_clipping=True)
    first, second = _quantize_twice(tiny.model, replace(recipe, learning=learning), batches, tmp_path)
    assert first == second


@pytest.mark.slow
def test_smollm2_learned_recipe_gives_identical_checkpoint_bytes(smollm2, tmp_path, two_threads):
    model, tokenizer = smollm2
    windows = token_windows(tokenizer, "calibration", window=64, count=2)
    batches = [{"input_ids": w[None], "attention_mask": torch.ones_like(w[None])} for w in windows]
    recipe = PRESETS["masquant-w4a8"]  # MAS with learned clipping, GPTQ and CMC
    # on the first 2 of the 30 layers: the later ones repeat the same steps on the same kind of weights
    recipe = replace(recipe, learning=replace(recipe.learning, epochs=1), modules=ModuleFilter(include=(r"layers\.[01]\..*",)))
    calibrated = calibrate(model, batches, recipes=[recipe], progress=False)  # deterministic; the learning was not
    for run in ("a", "b"):
        apply(calibrated, recipe, progress=False).save(tmp_path / run)
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
