"""bfloat16 models: quantize, logits, save/load, lower and generate work as on float32, and stay bfloat16.

Tiny text (Llama) and tri-modal (Qwen2.5-Omni thinker) models are converted with
``model.to(torch.bfloat16)``, calibrated on one batch and evaluated on another (seed 1). Quality is
judged against the float32 twin quantized with the same recipe: measured SQNR of the logits against
each dtype's own float model (dB, bf16 / fp32 twin)::

    family     rtn-w8a8       mas-init-w4a8 + CMC rank 4
    llama      38.7 / 39.9    15.7 / 15.8
    omni       42.0 / 44.0    17.6 / 17.7

so bfloat16 may lose at most :data:`TWIN_MARGIN_DB` against the twin, and never falls below :data:`FLOOR_DB`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import fx, nn

from masq_fx import QuantizedModel, load, quantize
from masq_fx.backends import Int8QuantLinear, lower_to_torchao
from masq_fx.calibration.calibrate import observe
from masq_fx.capture.decoder import CapturedDecoder, capture
from masq_fx.capture.positions import with_positions
from masq_fx.checkpoint import CheckpointError, read_manifest
from masq_fx.eval.sqnr import layer_outputs, sqnr_db
from masq_fx.models import adapter_for
from masq_fx.models.tiny import VOCAB, tiny_model
from masq_fx.nn.quant_linear import QuantLinear
from masq_fx.pipeline import Context
from masq_fx.recipes import preset
from masq_fx.transforms import quant_linears
from masq_fx.transforms.cmc import CMCConfig

FAMILIES = ("llama", "qwen2.5-omni-thinker")
RECIPES = {"rtn-w8a8": "rtn-w8a8", "mas-init-w4a8-cmc": replace(preset("mas-init", 4, 8), cmc=CMCConfig(rank=4))}
#: the least logits SQNR (dB) against the bf16 float model, per recipe (about 3 dB under the measured)
FLOOR_DB = {"rtn-w8a8": 35.0, "mas-init-w4a8-cmc": 13.0}
#: how much SQNR bf16 may lose against the fp32 twin with the same recipe (measured: at most 2.0 dB)
TWIN_MARGIN_DB = 3.0
#: lowered vs reference logits (measured: identical, or 76 dB where a bf16 rounding flips)
LOWERED_FLOOR_DB = 45.0


def _cast(batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {key: value.to(dtype) if value.is_floating_point() else value for key, value in batch.items()}


def _masked_sqnr(reference: torch.Tensor, test: torch.Tensor, mask: torch.Tensor) -> float:
    return sqnr_db(reference[mask.bool()], test[mask.bool()])


@dataclass
class Twins:
    """A tiny model in float32 and its bfloat16 copy, a calibration and an evaluation batch."""

    fp32: nn.Module
    bf16: nn.Module
    calibration: dict[str, torch.Tensor]
    evaluation: dict[str, torch.Tensor]

    def batch(self, dtype: torch.dtype, evaluation: bool = True) -> dict[str, torch.Tensor]:
        return _cast(self.evaluation if evaluation else self.calibration, dtype)

    @property
    def mask(self) -> torch.Tensor:
        return self.evaluation["attention_mask"]


@pytest.fixture(scope="module", params=FAMILIES)
def twins(request) -> Twins:
    tiny = tiny_model(request.param, seed=0, batch_size=2)
    bf16 = copy.deepcopy(tiny.model).to(torch.bfloat16)
    return Twins(tiny.model, bf16, tiny.batch, tiny_model(request.param, seed=1, batch_size=2).batch)


@pytest.fixture(scope="module", params=list(RECIPES))
def recipe_name(request) -> str:
    return request.param


def _quantize(twins: Twins, dtype: torch.dtype, recipe_name: str) -> QuantizedModel:
    model = twins.bf16 if dtype == torch.bfloat16 else twins.fp32
    return quantize(model, RECIPES[recipe_name], [twins.batch(dtype, evaluation=False)], progress=False)


def _copy(decoder: CapturedDecoder) -> CapturedDecoder:
    """``decoder`` with its own copy of the graph (to lower without touching the shared fixture)."""
    return replace(decoder, graph_module=copy.deepcopy(decoder.graph_module))


@pytest.fixture(scope="module")
def quantized(twins, recipe_name, one_thread) -> QuantizedModel:
    return _quantize(twins, torch.bfloat16, recipe_name)


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory):
    return quantized.save(tmp_path_factory.mktemp("bf16") / "ckpt")


def test_logits_are_bfloat16_finite_and_as_close_to_the_float_model_as_on_float32(twins, recipe_name, quantized):
    batch = twins.batch(torch.bfloat16)
    logits = quantized.logits(batch)
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())
    with torch.no_grad():
        bf16_db = _masked_sqnr(twins.bf16(**batch).logits, logits, twins.mask)
        fp32_batch = twins.batch(torch.float32)
        twin = _quantize(twins, torch.float32, recipe_name).logits(fp32_batch)
        fp32_db = _masked_sqnr(twins.fp32(**fp32_batch).logits, twin, twins.mask)
    assert bf16_db >= FLOOR_DB[recipe_name]
    assert bf16_db >= fp32_db - TWIN_MARGIN_DB, f"bf16 {bf16_db:.2f} dB vs fp32 twin {fp32_db:.2f} dB"


def test_the_graph_stays_bfloat16_between_linears(twins, quantized):
    """No silent upcast: every layer output and every (lowered) linear's output is bfloat16."""
    inputs = quantized.decoder_inputs(twins.batch(torch.bfloat16))
    lowered = _copy(quantized.decoder)
    lower_to_torchao(lowered)
    for decoder in (quantized.decoder, lowered):
        with torch.no_grad():
            assert {t.dtype for t in layer_outputs(decoder, inputs).values()} == {torch.bfloat16}
            linear_outputs = _module_output_dtypes(decoder.graph_module, inputs.args())
        assert linear_outputs == {torch.bfloat16}


def _module_output_dtypes(gm: fx.GraphModule, args: tuple[torch.Tensor, ...]) -> set[torch.dtype]:
    dtypes: set[torch.dtype] = set()

    class Recorder(fx.Interpreter):
        def call_module(self, target, args, kwargs):
            value = super().call_module(target, args, kwargs)
            if isinstance(self.module.get_submodule(target), (QuantLinear, Int8QuantLinear)):
                dtypes.add(value.dtype)
            return value

    Recorder(gm).run(*with_positions(gm, args))
    return dtypes


def test_save_then_load_gives_identical_outputs(twins, quantized, saved):
    batch = twins.batch(torch.bfloat16)
    loaded = load(saved, twins.bf16)
    assert read_manifest(saved)["model"]["dtype"] == "bfloat16"
    assert torch.equal(loaded.logits(batch), quantized.logits(batch))


def test_lowered_model_matches_the_reference_and_generates(twins, quantized):
    batch = twins.batch(torch.bfloat16)
    reference = quantized.logits(batch)
    lowered = QuantizedModel(twins.bf16, _copy(quantized.decoder), quantized.recipe)
    report = lowered.lower()
    assert report.lowered and not report.unlowered
    logits = lowered.logits(batch)
    assert logits.dtype == torch.bfloat16
    assert _masked_sqnr(reference, logits, twins.mask) >= LOWERED_FLOOR_DB
    tokens = lowered.generate(batch, max_new_tokens=4)
    assert tokens.shape[0] == 2 and 1 <= tokens.shape[1] <= 4
    assert tokens.dtype == torch.long and bool(((tokens >= 0) & (tokens < VOCAB)).all())


def test_load_refuses_the_float32_twin_of_a_bfloat16_checkpoint(twins, saved):
    expected = r"quantized from a bfloat16 model, not a float32 one: convert .* model\.to\(torch\.bfloat16\)"
    with pytest.raises(CheckpointError, match=expected):
        load(saved, twins.fp32)


@given(seed=st.integers(0, 2**16), magnitude=st.sampled_from([1e-2, 1.0, 30.0]))
def test_linears_compute_in_float32_and_round_once_to_bfloat16(quantized, seed, magnitude):
    """A linear's bf16 output is its float32 output on the same (bf16) input, rounded once."""
    module = max(quant_linears(quantized.decoder.graph_module), key=lambda m: (bool(m.branches), m.scales is not None))
    lowered = Int8QuantLinear.from_quant_linear(module)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 5, module.in_features, generator=gen) * magnitude).to(torch.bfloat16)
    modality_ids = torch.randint(0, 3, (2, 5), generator=gen)
    with torch.no_grad():
        for linear in (module, lowered):
            y = linear(x, modality_ids)
            assert y.dtype == torch.bfloat16
            assert torch.equal(y, linear(x.float(), modality_ids).to(torch.bfloat16))


def test_calibration_names_float16_when_the_float_model_overflows(one_thread):
    tiny = tiny_model("llama", seed=0, batch_size=1)
    model = tiny.model.to(torch.float16)
    captured = capture(model)
    inputs = adapter_for(model).decoder_inputs(tiny.batch)
    overflowing = replace(inputs, inputs_embeds=torch.full_like(inputs.inputs_embeds, math.inf))
    with pytest.raises(ValueError, match="overflows on the calibration data .*use bfloat16 or float32, not float16"):
        observe(Context(captured, [overflowing]), progress=False)
