"""The README's example media work as written: the built-in model reads ``examples/seven.png`` and ``seven.wav``."""

from __future__ import annotations

from pathlib import Path

import pytest

from masq_fx.app.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.slow


def test_a_quantized_default_model_answers_the_example_media(tmp_path, capsys):
    out = tmp_path / "w8a8"
    argv = ["quantize", "default", "--recipe", "rtn-w8a8", "--compare", "--no-eval", "--calib-samples", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    for flag, name in (("--image", "seven.png"), ("--audio", "seven.wav")):
        assert main(["generate", str(out), "--model", "default", flag, str(EXAMPLES / name), "--max-new-tokens", "4"]) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1] == "7", name
