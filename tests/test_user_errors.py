"""A new user's mistakes: each refused with a message that names the problem and the fix, before any long work."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from masq_fx import apply, calibrate
from masq_fx.app.cli import main
from masq_fx.errors import InputError, MasqFxError
from masq_fx.modality import Modality
from masq_fx.models import adapter_for
from masq_fx.models.tiny import tiny_model
from masq_fx.recipes import PRESETS, Recipe
from masq_fx.transforms.quantize import ModuleFilter

TINY = "tiny:llama"


@pytest.fixture(scope="module")
def llama():
    tiny = tiny_model("llama", seed=0, batch_size=2)
    return tiny, calibrate(tiny.model, [tiny.batch], recipes=["rtn-w8a8"], progress=False)


def test_a_module_filter_that_selects_nothing_is_refused_naming_linears(llama):
    _, calibrated = llama
    recipe = replace(PRESETS["rtn-w8a8"], modules=ModuleFilter(include=("nothing_matches",)))
    with pytest.raises(InputError, match=r"select none of the \d+ decoder linears \(e\.g\. layers\.0\.self_attn\.q_proj"):
        apply(calibrated, recipe, progress=False)


def test_an_invalid_module_regex_is_refused_at_once():
    with pytest.raises(InputError, match=r"'layers\.\[0-' is not a valid regular expression"):
        Recipe.from_dict({"modules": {"include": ["layers.[0-"]}})


def test_generation_past_the_context_is_refused_naming_the_limit(llama):
    tiny, calibrated = llama
    quantized = apply(calibrated, "rtn-w8a8", progress=False)
    limit = adapter_for(tiny.model).context_length()
    assert limit is not None
    with pytest.raises(InputError, match=f"longer than the model's context of {limit} tokens: shorten the prompt"):
        quantized.generate(tiny.batch, max_new_tokens=limit)


def test_calibration_past_the_context_is_refused(llama):
    tiny, _ = llama
    limit = adapter_for(tiny.model).context_length()
    long = {"input_ids": torch.ones(1, limit + 1, dtype=torch.long), "attention_mask": torch.ones(1, limit + 1, dtype=torch.long)}
    with pytest.raises(InputError, match=f"calibration batch 0 is {limit + 1} tokens, longer than the model's context of {limit}"):
        calibrate(tiny.model, [long], progress=False)


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "x", "--max-new-tokens", "0"],
        ["generate", "x", "--max-new-tokens", "-3"],
        ["inspect", TINY, "--top-k", "-1"],
        ["quantize", TINY, "--seq-len", "-5"],
        ["bench", "x", "--runs", "many"],
    ],
)
def test_bad_numbers_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert "must be at least 1" in error or "expected a whole number" in error


@pytest.mark.parametrize(
    "argv",
    [["eval", "x", "--calib-samples", "3"], ["eval", "x", "--seq-len", "64"], ["inspect", TINY, "--eval-items", "3"]],
)
def test_options_that_would_do_nothing_are_not_offered(argv, capsys):
    """eval does not calibrate, inspect does not evaluate: their data options are not taken silently."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    assert f"unrecognized arguments: {argv[2]}" in capsys.readouterr().err


def test_recipe_files_report_what_is_wrong(tmp_path, capsys):
    assert main(["quantize", TINY, "--recipe", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 1
    error = capsys.readouterr().err
    assert "recipe file" in error and "does not exist" in error
    broken = tmp_path / "broken.YAML"
    broken.write_text("method: mas\nweight: {bits: 4\n")
    assert main(["quantize", TINY, "--recipe", str(broken), "--out", str(tmp_path / "o")]) == 1
    assert "invalid YAML at line" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_list_names_presets_families_and_models(capsys):
    assert main(["list"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in PRESETS)
    assert "qwen2.5-omni-thinker" in printed and "tiny:llama" in printed


def test_metrics_as_json(tmp_path, capsys, one_thread):
    out = tmp_path / "j"
    assert main(["quantize", TINY, "--recipe", "rtn-w8a8", "--compare", "--out", str(out), "--quiet", "--json"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(printed[printed.index("{") : printed.rindex("}") + 1])
    assert set(rows) == {"FP32", "rtn-w8a8"} and "logit SQNR dB" in rows["rtn-w8a8"]


def test_unexpected_errors_are_not_swallowed(monkeypatch):
    import masq_fx.app.cli as cli

    def broken(args):
        raise TypeError("a bug")

    monkeypatch.setattr(cli, "_list", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["list"])
    assert issubclass(InputError, MasqFxError) and issubclass(InputError, ValueError)


def test_text_only_calibration_of_a_multimodal_model_is_said_plainly_and_reported(tmp_path):
    import warnings

    from masq_fx.app.run_report import build
    from masq_fx.errors import CoverageWarning

    tiny = tiny_model("qwen2.5-omni-thinker", seed=0, batch_size=2)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))  # text tokens only
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    calibrated = calibrate(tiny.model, [text], recipes=["masquant-w8a8"], progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = apply(calibrated, "masquant-w8a8", progress=False)
    coverage = [w for w in caught if issubclass(w.category, CoverageWarning)]
    assert len(coverage) == 1, [str(w.message) for w in coverage]  # once, before the pipeline runs
    assert "no vision or audio tokens" in str(coverage[0].message) and "calibrate with vision or audio samples" in str(coverage[0].message)
    report = build(quantized, title="text only", samples=calibrated.samples)
    assert set(report.uncovered) == {Modality.VISION, Modality.AUDIO}
    assert len(report.uncovered[Modality.VISION]) == len(calibrated.captured.groups())
    assert "## Calibration coverage" in report.markdown()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply(calibrated, "rtn-w8a8", progress=False)  # not modality-aware: nothing to say
    assert not [w for w in caught if issubclass(w.category, CoverageWarning)]


def test_threads_are_set_and_recorded(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert main(["quantize", TINY, "--recipe", "rtn-w8a8", "--compare", "--no-eval", "--quiet", "--threads", "1", "--out", str(tmp_path / "t")]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["threads"] == 1


def test_a_bfloat16_checkpoint_is_evaluated_in_bfloat16(tmp_path, capsys, one_thread):
    out = tmp_path / "bf16"
    assert main(["quantize", TINY, "--recipe", "rtn-w8a8", "--compare", "--dtype", "bfloat16", "--quiet", "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["model"]["dtype"] == "bfloat16"
    assert "BF16" in capsys.readouterr().out
    assert main(["eval", str(out)]) == 0  # the model the checkpoint records, in its dtype
    assert main(["generate", str(out), "--max-new-tokens", "2"]) == 0
