"""Layer-sequential execution (masq_fx.sequential) against the whole-graph pipeline it replaces.

The whole-graph path (``Pipeline(recipe_steps(recipe)).run(calibrated.context())``) is kept as the
oracle: where the math is the same (statistics from the float model, no learning against a quantized
stream) the two agree bit for bit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import pytest
import torch

from masq_fx import sequential
from masq_fx.api import apply, apply_all, calibrate
from masq_fx.calibration.calibrate import STATS
from masq_fx.capture.layers import PRE, Segments, advance, start
from masq_fx.errors import CoverageWarning
from masq_fx.modality import Modality
from masq_fx.models.tiny import tiny_model
from masq_fx.nn.quant_linear import QuantLinear
from masq_fx.pipeline import Context, Pipeline
from masq_fx.recipes import PRESETS, preset, recipe_steps
from masq_fx.sequential import Job, run_layerwise
from masq_fx.transforms.cmc import CMCConfig
from masq_fx.transforms.gptq import GPTQConfig
from masq_fx.transforms.quantize import ModuleFilter

#: recipes whose statistics come from the float model only: the sequential result is the whole-graph one
SAME_MATH = {
    "rtn-w8a8": PRESETS["rtn-w8a8"],
    "smoothquant-w4a8": PRESETS["smoothquant-w4a8"],
    "smoothquant-tied-w8a8": preset("smoothquant", 8, 8, variant="tied"),
    "mas-init-w4a8+cmc": replace(preset("mas-init", 4, 8), cmc=CMCConfig(rank_ratio=0.1)),
    "smoothquant-w4a8-gptq": PRESETS["smoothquant-w4a8-gptq"],
    "mas-w4a8 (learning only)": preset("mas", 4, 8),
}


@pytest.fixture(scope="module", params=["qwen2.5-omni-thinker", "qwen2.5-vl"])
def calibrated(request):
    tiny = tiny_model(request.param, seed=0, batch_size=2)
    return calibrate(tiny.model, [tiny.batch], progress=False, moment_modalities=tuple(Modality))


def _states(gm: torch.fx.GraphModule) -> dict[str, dict]:
    return {m.name: m.state_dict() for m in gm.modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("label", list(SAME_MATH))
def test_sequential_equals_whole_graph_where_the_math_is_the_same(calibrated, label, one_thread):
    recipe = SAME_MATH[label]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CoverageWarning)
        layerwise = apply(calibrated, recipe, progress=False)
        whole = Pipeline(recipe_steps(recipe, progress=False)).run(calibrated.context(), progress=False)
    sample = calibrated.samples[0]
    assert torch.equal(layerwise.decoder(sample), whole.captured(sample))
    ours, theirs = _states(layerwise.decoder.graph_module), _states(whole.graph_module)
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        assert ours[name].keys() == theirs[name].keys(), name
        for key, tensor in ours[name].items():
            assert torch.equal(tensor, theirs[name][key]), (name, key)


def test_statistics_equal_the_whole_graph_ones_and_lose_only_their_moments(calibrated):
    layerwise = apply(calibrated, "smoothquant-w4a8-gptq", progress=False)
    assert layerwise.context is not None
    kept, whole = layerwise.context.stats, calibrated.stats
    assert kept.keys() == whole.keys()
    for name, stats in kept.items():
        assert not stats.moments, name
        for table in ("absmax", "min", "max", "count"):
            assert torch.equal(getattr(stats, table), getattr(whole[name], table)), (name, table)


@dataclass
class _Probe:
    """A layer-wise step that records, at each layer, which layers' second moments the context holds."""

    seen: list[tuple[int | None, set[int]]]
    name: str = "probe"
    requires: tuple = (STATS,)
    provides: tuple = ()

    def __call__(self, gm, context: Context):
        layers = {context.captured.linear_layers[name] for name, stats in context.stats.items() if stats.moments}
        self.seen.append((context.layer, layers))
        return gm


def test_only_the_current_layers_second_moments_are_held(calibrated):
    seen: list = []
    job = Job(Context(calibrated.captured.copy(), calibrated.samples), [_Probe(seen)])
    run_layerwise(calibrated.captured, calibrated.samples, [job], tuple(Modality), progress=False)
    layers = calibrated.captured.num_layers
    assert seen == [(i, {i}) for i in range(layers)]
    assert all(not s.moments for s in job.context.stats.values())
    assert job.context.layer is None and job.context.layer_data is None


def test_apply_all_computes_the_float_statistics_once(calibrated, monkeypatch, one_thread):
    calls = []
    real = sequential.collect_stats
    monkeypatch.setattr(sequential, "collect_stats", lambda gm, layer=None: calls.append(1) or real(gm, layer))
    recipes = ["rtn-w8a8", "smoothquant-w4a8", "masquant-w4a8"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CoverageWarning)
        together = apply_all(calibrated, recipes, progress=False)
    assert len(calls) == 2 * calibrated.captured.num_layers  # once per float graph: plain, and masquant-w4a8's rotated one
    sample = calibrated.samples[0]
    for recipe, quantized in zip(recipes, together):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CoverageWarning)
            alone = apply(calibrated, recipe, progress=False)
        assert torch.equal(quantized.decoder(sample), alone.decoder(sample)), recipe
    assert [q.recipe.label for q in together] == [PRESETS[r].label for r in recipes]


def test_second_moments_are_collected_only_of_modalities_the_calibration_has(calibrated, monkeypatch):
    collected: set = set()
    real = sequential.collect_stats

    def spy(gm, layer=None):
        stats = real(gm, layer)
        collected.update(m for s in stats.values() for m in s.moments)
        return stats

    monkeypatch.setattr(sequential, "collect_stats", spy)
    apply(calibrated, "smoothquant-w4a8-gptq", progress=False)  # GPTQ reads every modality's Hessian
    assert collected == set(calibrated.seen_modalities())
    assert (Modality.AUDIO in collected) == (Modality.AUDIO in calibrated.captured.modalities)  # the VL model has none


def test_offloaded_rotated_weights_are_mapped_and_change_nothing(calibrated, tmp_path, one_thread):
    from masq_fx.checkpoint import TENSORS
    from masq_fx.pages import _safetensors_mappings

    recipe = replace(PRESETS["masquant-w4a8"], learning=replace(PRESETS["masquant-w4a8"].learning, epochs=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CoverageWarning)
        kept = apply_all(calibrated, [recipe, "rtn-w8a8"], progress=False, offload=False)
        moved = apply_all(calibrated, [recipe, "rtn-w8a8"], progress=False, offload=True)
        resumable = apply_all(calibrated, [recipe], progress=False, offload=True, resume=tmp_path / "progress")
    assert not any((tmp_path / "progress" / "offload").iterdir())  # the files are mapped, their names gone
    mappings = _safetensors_mappings()
    rotated = [m for m in moved[0].decoder.graph_module.modules() if isinstance(m, QuantLinear)]
    assert rotated and all(any(r.start <= m.weight.data_ptr() < r.end for r in mappings) for m in rotated)
    sample = calibrated.samples[0]
    for ours, theirs, name in zip(moved, kept, ("rotated", "plain")):
        assert torch.equal(ours.decoder(sample), theirs.decoder(sample)), name
        ours.save(tmp_path / f"moved-{name}")
        theirs.save(tmp_path / f"kept-{name}")
        assert (tmp_path / f"moved-{name}" / TENSORS).read_bytes() == (tmp_path / f"kept-{name}" / TENSORS).read_bytes(), name
    assert torch.equal(resumable[0].decoder(sample), kept[0].decoder(sample))


def test_segments_run_in_turn_equal_the_whole_graph(calibrated):
    gm = calibrated.captured.graph_module
    segments = Segments(gm, calibrated.captured.num_layers)
    last = segments.last_reader()
    sample = calibrated.samples[0]
    env = start(sample)
    with torch.no_grad():
        for index in [PRE, *range(segments.num_layers), segments.num_layers]:
            env = advance(env, segments(index).run(env), index, last)
        final = [value for name, value in env.items() if last.get(name) == segments.num_layers + 1]
        assert len(final) == 1 and torch.equal(final[0], calibrated.captured(sample))


_PEAK = """
import sys, warnings
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from masq_fx.api import apply, calibrate
from masq_fx.modality import Modality

def peak_kib():
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")))

torch.manual_seed(0)
torch.set_num_threads(1)
config = LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=int(sys.argv[1]), num_attention_heads=8,
                     num_key_value_heads=8, vocab_size=256, max_position_embeddings=512)
model = LlamaForCausalLM(config).eval()
batches = [{"input_ids": torch.randint(0, 256, (2, 64)), "attention_mask": torch.ones(2, 64, dtype=torch.long)}]
calibrated = calibrate(model, batches, progress=False, moment_modalities=tuple(Modality))
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := current RSS
before = peak_kib()
warnings.simplefilter("ignore")
apply(calibrated, "rtn-w8a8", progress=False)
print(peak_kib() - before)
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_layers_beyond_their_own_share(tmp_path):
    """8 and 16 layers of the same width: second moments (of text, the one modality of the calibration: 40 MiB a
    layer) are held one layer at a time and finished layers keep no dequantized weights, so the peak does not grow
    with the layers (measured: under 1 MiB per extra layer; the whole-graph path adds each layer's moments)."""
    import subprocess
    import sys

    def growth(layers: int) -> float:
        run = subprocess.run([sys.executable, "-c", _PEAK, str(layers)], capture_output=True, text=True, timeout=300, check=True)
        return int(run.stdout.split()[-1]) / 1024  # MiB

    moments_per_layer = (3 * 512**2 + 2048**2) * 8 / 2**20
    per_extra_layer = (growth(16) - growth(8)) / 8
    assert per_extra_layer < 0.25 * moments_per_layer, (per_extra_layer, moments_per_layer)


@dataclass
class _MomentProbe:
    """A layer-wise step that records which modalities' second moments each of the layer's linears has."""

    seen: dict[str, tuple]
    name: str = "moment_probe"
    requires: tuple = (STATS,)
    provides: tuple = ()

    def __call__(self, gm, context: Context):
        self.seen.update({name: tuple(s.moments) for name, s in context.stats.items() if context.in_scope(name)})
        return gm


def test_second_moments_are_collected_only_where_a_recipe_reads_them(calibrated):
    """MAS-init + CMC reads vision/audio moments at the smoothed sites only (not down_proj); GPTQ every modality's
    at every quantized site; a module filter's unquantized linears need none."""
    cmc = replace(preset("mas-init", 4, 8), cmc=CMCConfig(rank=2), modules=ModuleFilter(exclude=(r"layers\.0\..*",)))
    seen: dict[str, tuple] = {}
    job = Job(Context(calibrated.captured.copy(), calibrated.samples), [_MomentProbe(seen)])
    run_layerwise(calibrated.captured, calibrated.samples, [job], (), progress=False, site_moments=cmc.site_moments)
    for name, moments in seen.items():
        wanted = () if name.startswith("layers.0.") or name.endswith("down_proj") else (Modality.VISION, Modality.AUDIO)
        assert moments == wanted, name
    gptq = replace(preset("rtn", 4, 8), gptq=GPTQConfig())
    assert all(gptq.site_moments(site) == tuple(Modality) for site in calibrated.captured.groups())
    assert preset("rtn", 8, 8).site_moments(calibrated.captured.groups()[0]) == ()
