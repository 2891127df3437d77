"""Pipeline ordering, observer insertion and the calibration runner on real HF modelling code."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import fx

from masq_fx.calibration.calibrate import Calibrate, InsertObservers, observe, observer_nodes
from masq_fx.capture.decoder import capture
from masq_fx.modality import Modality
from masq_fx.models import adapter_for
from masq_fx.models.tiny import tiny_model
from masq_fx.pipeline import Context, Pipeline, PipelineError


@dataclass
class Step:
    name: str
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    calls: list | None = None

    def __call__(self, gm: fx.GraphModule, context: Context) -> fx.GraphModule:
        if self.calls is not None:
            self.calls.append(self.name)
        return gm


@pytest.fixture(scope="module")
def tiny_vl():
    tiny = tiny_model("qwen2.5-vl", seed=0, batch_size=2)
    adapter = adapter_for(tiny.model)
    return tiny, adapter.decoder_inputs(tiny.batch)


def test_validation_names_the_step_to_move():
    pipeline = Pipeline([Step("b", requires=("x",)), Step("a", provides=("x",))])
    with pytest.raises(PipelineError, match="step 1 'a' provides only later: move 'a' before 'b'"):
        pipeline.validate()


def test_validation_names_a_missing_capability():
    with pytest.raises(PipelineError, match="requires 'scales', which no earlier step provides"):
        Pipeline([Step("quantize", requires=("scales",))]).validate()


def test_an_order_that_discards_an_earlier_result_is_refused_before_running():
    from masq_fx.pipeline import Capability
    from masq_fx.recipes import PRESETS, recipe_steps
    from masq_fx.transforms.cmc import ProjectScales

    steps = recipe_steps(PRESETS["masquant-w4a8"], progress=False)
    names = [step.name for step in steps]
    assert names.index("project_scales") < names.index("gptq")
    calibrated = ("graph", "calibration_data", "stats")
    Pipeline(steps).validate(calibrated)
    late = [s for s in steps if not isinstance(s, ProjectScales)] + [ProjectScales(PRESETS["masquant-w4a8"].cmc)]
    with pytest.raises(PipelineError, match="invalidates 'solved_weights'.*move 'project_scales' before 'gptq'"):
        Pipeline(late).validate(calibrated)
    # re-providing the invalidated result later is a valid order
    calls: list[str] = []
    redo = [Step("solve", provides=(Capability.SOLVED_WEIGHTS,), calls=calls), Step("rescale", calls=calls), Step("solve", provides=(Capability.SOLVED_WEIGHTS,), calls=calls)]
    redo[1].invalidates = (Capability.SOLVED_WEIGHTS,)
    Pipeline(redo).validate()


def test_consumed_capabilities_leave_the_context():
    from masq_fx.pipeline import Capability

    consume = Step("use", requires=(Capability.OBSERVERS,))
    consume.consumes = (Capability.OBSERVERS,)
    with pytest.raises(PipelineError, match="requires 'observers'"):
        Pipeline([Step("add", provides=(Capability.OBSERVERS,)), consume, Step("again", requires=(Capability.OBSERVERS,))]).validate()


def test_non_transform_is_rejected():
    with pytest.raises(TypeError, match="is not a transform"):
        Pipeline([lambda gm, ctx: gm])


def test_steps_run_in_given_order_and_are_recorded(tiny_vl):
    tiny, inputs = tiny_vl
    calls: list[str] = []
    context = Context(capture(tiny.model), [inputs])
    steps = [Step("one", provides=("x",), calls=calls), Step("two", requires=("x", "graph"), calls=calls)]
    Pipeline(steps).run(context, progress=False)
    assert calls == ["one", "two"]
    assert [r.name for r in context.history] == ["one", "two"]
    assert {"graph", "calibration_data", "x"} <= context.provided


def test_calibrate_without_data_is_refused_before_running(tiny_vl):
    tiny, _ = tiny_vl
    context = Context(capture(tiny.model))
    with pytest.raises(PipelineError, match="calibration_data"):
        Pipeline([InsertObservers(), Calibrate(progress=False)]).run(context, progress=False)


def test_observers_see_exactly_the_linear_inputs_and_leave_the_graph_clean(tiny_vl):
    tiny, inputs = tiny_vl
    captured = capture(tiny.model)
    reference = captured(inputs).detach()
    context = observe(Context(captured, [inputs]), moment_modalities=(Modality.VISION,), progress=False)

    # the eager model's own linear inputs, caught by hooks, are the ground truth
    seen: dict[str, torch.Tensor] = {}
    adapter = adapter_for(tiny.model)
    decoder = adapter.language_model()
    hooks = [
        module.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0].detach()))
        for name, module in decoder.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    with torch.no_grad():
        decoder(inputs_embeds=inputs.inputs_embeds, position_ids=inputs.position_ids, attention_mask=inputs.attention_mask)
    for hook in hooks:
        hook.remove()

    assert set(context.stats) == set(captured.decoder_linears())
    valid = inputs.attention_mask.bool()
    for name, x in seen.items():
        stats = context.stats[name]
        for modality in (Modality.TEXT, Modality.VISION):
            rows = x[valid & (inputs.modality_ids == int(modality))]
            torch.testing.assert_close(stats.of(modality).absmax, rows.abs().amax(0))
            assert stats.of(modality).count == rows.shape[0]
        vision = x[valid & (inputs.modality_ids == int(Modality.VISION))].double()
        torch.testing.assert_close(stats.of(Modality.VISION).moment, vision.T @ vision)
        assert stats.of(Modality.TEXT).moment is None
    # q/k/v share one statistics object, gate/up another
    q = context.stats["layers.0.self_attn.q_proj"]
    assert q is context.stats["layers.0.self_attn.v_proj"]
    assert context.stats["layers.0.mlp.gate_proj"] is context.stats["layers.0.mlp.up_proj"]
    assert len({id(s) for s in context.stats.values()}) == 4 * captured.num_layers

    assert not observer_nodes(captured.graph_module)
    assert "observers" not in context.provided and "stats" in context.provided
    torch.testing.assert_close(captured(inputs), reference)


def test_interrupted_calibration_removes_observers(tiny_vl):
    tiny, inputs = tiny_vl
    captured = capture(tiny.model)

    class Interrupting(list):
        def __iter__(self):
            yield inputs
            raise KeyboardInterrupt

    context = Context(captured, Interrupting([inputs]))
    with pytest.raises(KeyboardInterrupt):
        Pipeline([InsertObservers(), Calibrate(progress=False)]).run(context, progress=False)
    assert not observer_nodes(captured.graph_module)
    assert "stats" not in context.provided and not context.stats


def test_non_finite_activations_stop_calibration_and_name_the_layer(tiny_vl):
    tiny, inputs = tiny_vl
    captured = capture(tiny.model)
    embeds = inputs.inputs_embeds.clone()
    embeds[0, 3, 5] = float("inf")
    broken = type(inputs)(embeds, inputs.position_ids, inputs.modality_ids, inputs.attention_mask)
    with pytest.raises(ValueError, match=r"NaN/Inf activations reach layers\.0\.self_attn\.q_proj.*float32"):
        observe(Context(captured, [broken]), progress=False)
    assert not observer_nodes(captured.graph_module)
