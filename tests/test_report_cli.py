"""The activation report and the `masq-fx inspect` command."""

from __future__ import annotations

import pytest
import torch

from masq_fx.app.cli import main
from masq_fx.app.inspect import activation_report, format_report
from masq_fx.calibration import ModalityStats
from masq_fx.modality import Modality


def _stats() -> ModalityStats:
    stats = ModalityStats.empty(8)
    text = torch.ones(4, 8)
    text[:, 0] = 50.0  # text outlier in channel 0
    vision = torch.ones(3, 8)
    vision[:, 5] = 20.0  # vision outlier in channel 5
    x = torch.cat([text, vision])
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    stats.update(x, ids)
    return stats


def test_report_shows_misaligned_outliers():
    site = _stats()
    rows = activation_report({"layers.0.self_attn.q_proj": site, "layers.0.self_attn.k_proj": site}, top_k=1)
    assert [r.modality for r in rows] == [Modality.TEXT, Modality.VISION]
    text, vision = rows
    assert text.linears == ("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj")
    assert text.top == ((0, 50.0),) and text.tokens == 4
    assert vision.top == ((5, 20.0),)
    assert vision.overlap_with_text == 0.0
    assert vision.max_ratio_to_text == pytest.approx(50.0)
    table = format_report(rows, "demo")
    assert "layers.0.self_attn.{q_proj,k_proj}" in table and "5:20" in table


def test_cli_inspect_on_a_tiny_model(capsys):
    assert main(["inspect", "tiny:qwen2.5-omni-thinker", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "layers.1.mlp.down_proj" in out
    for modality in ("text", "vision", "audio"):
        assert f" {modality} " in out


def test_cli_rejects_an_unknown_model(capsys, tmp_path):
    assert main(["inspect", str(tmp_path / "nope"), "--quiet"]) == 1
    assert "neither 'default', 'smollm2', 'tiny:FAMILY' nor a local model folder" in capsys.readouterr().err
    assert main(["inspect", "tiny:gpt2", "--quiet"]) == 1
    assert "unknown tiny family 'gpt2'" in capsys.readouterr().err
