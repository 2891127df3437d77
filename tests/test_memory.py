"""The memory estimate of calibration + recipe, checked against what calibration really holds."""

from __future__ import annotations

import pytest
import torch

from masq_fx import memory
from masq_fx.api import calibration_inputs
from masq_fx.calibration.calibrate import observe
from masq_fx.capture.decoder import capture
from masq_fx.capture.layers import PRE, Segments, start
from masq_fx.memory import (
    CalibrationMemoryError,
    available_memory,
    estimate_calibration_memory,
    observed_channels,
    require_memory,
)
from masq_fx.models.tiny import tiny_model
from masq_fx.pipeline import Context
from masq_fx.recipes import PRESETS

GIB = 1024**3


@pytest.fixture(scope="module")
def omni():
    tiny = tiny_model("qwen2.5-omni-thinker", seed=0, batch_size=2)
    return tiny.model, tiny.batch, capture(tiny.model)


@pytest.mark.parametrize("recipe", ["masquant-w4a8", "rtn-w8a8"])
def test_inputs_and_statistics_are_estimated_exactly(omni, recipe, one_thread):
    model, batch, captured = omni
    recipe = PRESETS[recipe]
    estimate = estimate_calibration_memory(model, captured, recipe, [batch, batch])
    samples = calibration_inputs(model, [batch, batch])
    assert estimate.decoder_inputs == sum(t.numel() * t.element_size() for s in samples for t in s.args())
    assert estimate.tokens == 2 * batch["input_ids"].numel() and estimate.batches == 2
    context = observe(Context(captured, samples), moment_modalities=recipe.moment_modalities, progress=False)
    stats = {id(s): s for s in context.stats.values()}.values()
    assert len(observed_channels(captured)) == len(stats) == 4 * captured.num_layers  # q/k/v, o, gate/up, down
    # every layer's tables are kept; second moments only for the layer being transformed (the largest counts)
    tables = sum(t.numel() * t.element_size() for s in stats for t in s.without_moments().state_dict().values())
    moments: dict[int, int] = {}
    for site in captured.groups():
        held = context.stats[site.linears[0]].moments.values()
        moments[site.layer] = moments.get(site.layer, 0) + sum(m.numel() * m.element_size() for m in held)
    assert estimate.statistics == tables + max(moments.values())
    assert estimate.moment_sites == (len(stats) if recipe.moment_modalities else 0)
    stream = sum(s.inputs_embeds.numel() * s.inputs_embeds.element_size() for s in samples)
    assert estimate.streams == (3 if recipe.method == "mas" else 2) * stream
    # the mask and rotary tables the layers read, computed before the first layer, held for every batch
    segments = Segments(captured.graph_module, captured.num_layers)
    held = [segments(PRE).run(start(sample)) for sample in samples]
    read = segments.last_reader()
    assert estimate.layer_inputs == sum(t.numel() * t.element_size() for env in held for name, t in env.items() if isinstance(t, torch.Tensor) and read[name] >= 0)
    parts = (estimate.decoder_inputs, estimate.statistics, estimate.streams, estimate.layer_inputs, estimate.activations, estimate.rotated_weights)
    assert estimate.total == sum(parts) + estimate.layer_work
    # MAS learning, GPTQ and CMC work on the layer's weights; at least the largest float32 weight's worth
    largest = max(w.numel() for w in captured.weights.values()) * 4
    transforms = recipe.method == "mas" or recipe.gptq is not None or recipe.cmc is not None
    assert (estimate.layer_work >= largest) if transforms else estimate.layer_work == 0


def test_too_little_memory_is_refused_with_what_to_lower(omni):
    model, batch, captured = omni
    estimate = estimate_calibration_memory(model, captured, PRESETS["masquant-w4a8"], [batch])
    require_memory(estimate, estimate.total)
    require_memory(estimate, None)  # unknown: nothing to check
    with pytest.raises(CalibrationMemoryError) as error:
        require_memory(estimate, estimate.total - 1)
    message = str(error.value)
    assert f"need about {estimate.total / GIB:.2f} GiB" in message and "is available" in message
    assert "decoder inputs of 1 batches" in message and "float64 second moments of text, vision, audio at 8 sites" in message
    assert "fewer or shorter calibration samples" in message and "without CMC/GPTQ" in message
    assert "--calib" not in message  # the library names no command-line flag; the CLI adds them
    plain = estimate_calibration_memory(model, captured, PRESETS["rtn-w8a8"], [batch])
    with pytest.raises(CalibrationMemoryError) as error:
        require_memory(plain, 0)
    assert "CMC" not in str(error.value) and "second moments" not in str(error.value)


def test_available_memory_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\n")
    assert available_memory(meminfo) == 20000000 * 1024
    meminfo.write_text("MemTotal:       32000000 kB\n")
    assert available_memory(meminfo) is None
    assert available_memory(tmp_path / "absent") is None


def test_quantize_checks_memory_before_calibrating(omni, monkeypatch, capsys, tmp_path):
    from masq_fx import api
    from masq_fx.app.cli import main

    model, batch, _ = omni
    monkeypatch.setattr(api, "available_memory", lambda: 1000)
    monkeypatch.setattr(api, "calibration_inputs", lambda *_: pytest.fail("calibration ran despite the estimate"))
    with pytest.raises(CalibrationMemoryError, match="only 0.00 GiB of memory is available"):
        api.quantize(model, "masquant-w4a8", [batch], progress=False)
    assert main(["quantize", "tiny:qwen2.5-omni-thinker", "--no-eval", "--quiet", "--out", str(tmp_path / "out")]) == 1
    assert "lower --calib-samples, --calib-tokens or --seq-len" in capsys.readouterr().err


def test_weight_caches_are_not_kept_where_they_would_not_fit(omni, monkeypatch):
    """A model whose float32 weight caches would take more than half the free memory computes each linear's
    weights per forward and lets them go: the same logits, no cache held."""
    from masq_fx.api import apply, calibrate
    from masq_fx.nn.quant_linear import QuantLinear, cached_weight_bytes

    model, batch, _ = omni
    calibrated = calibrate(model, [batch], progress=False)
    roomy = apply(calibrated, "masquant-w8a8", progress=False)
    linears = [m for m in roomy.decoder.graph_module.modules() if isinstance(m, QuantLinear)]
    needed = cached_weight_bytes(roomy.decoder.graph_module)
    assert needed == sum(4 * len(m.stored_rows()) * m.weight.numel() for m in linears) > 0
    monkeypatch.setattr(memory, "available_memory", lambda: 2 * needed - 1)
    tight = apply(calibrated, "masquant-w8a8", progress=False)
    inputs = tight.decoder_inputs(batch)
    with torch.no_grad():
        expected, got = roomy.decoder(inputs), tight.decoder(inputs)
    assert torch.equal(got, expected)
    assert all(m.keep_cache for m in linears) and all(m.cached_weights is not None for m in linears)
    tight_linears = [m for m in tight.decoder.graph_module.modules() if isinstance(m, QuantLinear)]
    assert not any(m.keep_cache for m in tight_linears) and all(m.cached_weights is None for m in tight_linears)
