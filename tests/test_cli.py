"""The ``masq-fx`` commands end to end on a tiny model in a temporary folder."""

from __future__ import annotations

import pytest

from masq_fx.cli import main

TINY = "tiny:qwen2.5-omni-thinker"


def test_quantize_eval_generate_round_trip(tmp_path, capsys, one_thread):
    out = tmp_path / "w4a8"
    assert main(["quantize", TINY, "--recipe", "masquant-w4a8", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert (out / "manifest.json").is_file() and (out / "quantized.safetensors").is_file()
    header, fp, ours, baseline = printed.strip().splitlines()[-4:]
    assert "logit SQNR dB" in header and fp.startswith("FP32") and float(fp.split()[-1]) == float("inf")
    assert ours.startswith("masquant-w4a8") and baseline.startswith("smoothquant-w4a8")
    assert main(["eval", str(out), "--model", TINY]) == 0
    assert float(capsys.readouterr().out.strip().splitlines()[-1].split()[-1]) == pytest.approx(float(ours.split()[-1]), abs=1e-3)
    assert main(["generate", str(out), "--model", TINY, "--max-new-tokens", "3"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 2 and all(len(r.split()) == 3 for r in rows)


def test_quantize_refuses_an_existing_folder_and_bad_names(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert main(["quantize", TINY, "--out", str(tmp_path / "taken"), "--no-eval"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["quantize", TINY, "--recipe", "masquant-w3a3", "--out", str(tmp_path / "x")]) == 1
    assert "masquant-w4a8" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "taken"), "--model", TINY, "--prompt", "hi"]) == 1
    assert "no tokenizer" in capsys.readouterr().err


def test_every_option_is_documented(capsys):
    for command in ("quantize", "eval", "generate", "inspect"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "Example: masq-fx" in " ".join(text.split()) and "(default:" in text


def test_media_files_are_checked_with_a_fix(tmp_path):
    from masq_fx.sources import read_image, read_wav

    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_image(tmp_path / "missing.png", 56, 112)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="PNG or JPEG"):
        read_image(tmp_path / "text.png", 56, 112)
    import wave

    with wave.open(str(tmp_path / "8k.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000), w.writeframes(b"\0\0" * 800)
    with pytest.raises(ValueError, match="convert it to 16-bit PCM at 16000 Hz"):
        read_wav(tmp_path / "8k.wav", 16000)
    with wave.open(str(tmp_path / "ok.wav"), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(16000), w.writeframes(b"\0\x40" * 3200)
    audio = read_wav(tmp_path / "ok.wav", 16000)
    assert audio.shape == (1600,) and abs(float(audio.max()) - 0.5) < 1e-6
