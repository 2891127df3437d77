"""An interrupted layer-by-layer run continues from its progress folder and ends as an uninterrupted one would."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
import torch

import masq_fx.sequential
from masq_fx.api import apply_all, calibrate
from masq_fx.app.cli import main
from masq_fx.models import adapter_for
from masq_fx.models.tiny import tiny_model
from masq_fx.resume import ResumeError

#: rotated MAS + CMC (routers, branches, diagnostics) and SmoothQuant (norm weights replaced) in one pass
RECIPES = ["masquant-w4a8", "masquant-w8a8", "smoothquant-w8a8"]


@pytest.fixture(scope="module")
def calibrated():
    tiny = tiny_model("qwen2.5-omni-thinker", seed=1, batch_size=2)
    return tiny, calibrate(tiny.model, [tiny.batch], progress=False)


@pytest.fixture(scope="module")
def uninterrupted(calibrated, tmp_path_factory):
    tiny, cal = calibrated
    folder = tmp_path_factory.mktemp("uninterrupted")
    for index, quantized in enumerate(apply_all(cal, RECIPES, progress=False)):
        quantized.save(folder / str(index))
    return folder


def interrupt_at(layer: int, monkeypatch) -> list[int]:
    """Make the steps raise KeyboardInterrupt at ``layer``; returns the layers steps ran at."""
    run_step = masq_fx.sequential.run_step
    ran: list[int] = []

    def step(step, context, recompile=False):
        if context.layer == layer:
            raise KeyboardInterrupt
        ran.append(context.layer)
        return run_step(step, context, recompile=recompile)

    monkeypatch.setattr(masq_fx.sequential, "run_step", step)
    return ran


def test_an_interrupted_run_resumes_to_the_uninterrupted_results(calibrated, uninterrupted, tmp_path, monkeypatch):
    tiny, cal = calibrated
    progress = tmp_path / "progress"
    interrupt_at(1, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        apply_all(cal, RECIPES, progress=False, resume=progress)
    assert (progress / "recipe-0" / "layer-0000.safetensors").is_file()
    assert not (progress / "recipe-0" / "layer-0001.safetensors").exists()
    monkeypatch.undo()
    ran = interrupt_at(-1, monkeypatch)  # counts the layers whose steps run
    resumed = apply_all(cal, RECIPES, progress=False, resume=progress)
    # the rotated recipe's pass ran first and was interrupted; the other two share a later pass, never started
    assert ran[0] == 1, "layer 0 of the interrupted pass is replayed, not recomputed"
    assert 0 in ran, "the pass that never started runs from layer 0"
    inputs = adapter_for(tiny.model).decoder_inputs(tiny.batch)
    for index, quantized in enumerate(resumed):
        quantized.save(tmp_path / str(index))
        for name in ("quantized.safetensors", "manifest.json"):
            assert filecmp.cmp(uninterrupted / str(index) / name, tmp_path / str(index) / name, shallow=False), (RECIPES[index], name)
        with torch.no_grad():
            assert torch.isfinite(quantized.decoder(inputs)).all()
    reports = resumed[0].context.diagnostics["cmc"]
    assert {r.module.split(".")[1] for r in reports} == {"0", "1"}, "the replayed layer's CMC diagnostics are kept"


def test_a_progress_folder_of_another_run_is_refused(calibrated, tmp_path, monkeypatch):
    _, cal = calibrated
    interrupt_at(1, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        apply_all(cal, ["smoothquant-w8a8"], progress=False, resume=tmp_path)
    with pytest.raises(ResumeError, match=r"holds the progress of another run \(different recipes\).*delete .* to start over"):
        apply_all(cal, ["rtn-w8a8"], progress=False, resume=tmp_path)


def test_an_unreadable_layer_file_is_refused_with_the_fix(calibrated, tmp_path, monkeypatch):
    _, cal = calibrated
    interrupt_at(1, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        apply_all(cal, ["smoothquant-w8a8"], progress=False, resume=tmp_path)
    monkeypatch.undo()
    (tmp_path / "recipe-0" / "layer-0000.safetensors").write_bytes(b"truncated")
    with pytest.raises(ResumeError, match="layer-0000.safetensors is unreadable .*delete .* to start over"):
        apply_all(cal, ["smoothquant-w8a8"], progress=False, resume=tmp_path)


def test_quantize_continues_an_interrupted_run_and_then_removes_its_progress(tmp_path: Path, capsys, monkeypatch):
    args = ["quantize", "tiny:qwen2.5-omni-thinker", "--recipe", "masquant-w8a8", "--compare", "--no-eval", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    interrupt_at(1, monkeypatch)
    out = tmp_path / "ckpt"
    assert main([*args, "--out", str(out)]) == 130
    kept = tmp_path / "ckpt.progress"
    assert f"the finished layers are kept in {kept}: run the same command again to continue" in capsys.readouterr().err
    monkeypatch.undo()
    assert main([*args, "--out", str(out)]) == 0
    assert "continuing the interrupted run kept in" in capsys.readouterr().out
    assert not kept.exists()
    assert filecmp.cmp(tmp_path / "whole" / "quantized.safetensors", out / "quantized.safetensors", shallow=False)
