"""The ``masq-fx`` commands end to end on a tiny model in a temporary folder."""

from __future__ import annotations

import pytest

from masq_fx.app.cli import main

TINY = "tiny:qwen2.5-omni-thinker"


def test_quantize_eval_generate_round_trip(tmp_path, capsys, one_thread):
    out = tmp_path / "w4a8"
    assert main(["quantize", TINY, "--recipe", "masquant-w4a8", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert (out / "manifest.json").is_file() and (out / "quantized.safetensors").is_file()
    *_, header, fp, ours, baseline, report = printed.strip().splitlines()
    assert report == f"report {out / 'report.md'}" and (out / "sqnr.png").is_file()
    assert "| vision |" in (out / "report.md").read_text() and "## Final metrics" in (out / "report.md").read_text()
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
    # the checkpoint is checked before the model loads (tiny's "no tokenizer": tests/test_first_hour.py)
    assert main(["generate", str(tmp_path / "taken"), "--model", TINY, "--prompt", "hi"]) == 1
    assert "manifest.json is missing" in capsys.readouterr().err


def test_every_option_is_documented(capsys):
    for command in ("quantize", "eval", "generate", "inspect", "bench"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "Example: masq-fx" in " ".join(text.split()) and "(default:" in text


def test_media_files_are_checked_with_a_fix(tmp_path):
    from masq_fx.data.media import read_image, read_wav

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


@pytest.fixture(scope="module")
def trimodal(one_thread):
    from masq_fx.builtin.trimodal import load_trimodal

    return load_trimodal()


def test_quantize_on_a_calibration_file_eval_refuses_its_samples_and_generate_reads_the_examples(trimodal, tmp_path, capsys, monkeypatch, one_thread):
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image

    import masq_fx.builtin.trimodal
    from masq_fx.builtin.trimodal import load_set
    from masq_fx.checkpoint import read_manifest
    from masq_fx.data.samples import read_samples

    monkeypatch.setattr(masq_fx.builtin.trimodal, "load_trimodal", lambda: trimodal)
    evaluation = load_set("evaluation")

    def write(name: str, indices: range) -> str:
        lines = []
        for i in indices:
            Image.fromarray(evaluation.vision_images[i]).save(tmp_path / f"{i}.png")
            lines.append({"image": f"{i}.png", "answer": str(int(evaluation.vision_numbers[i]))})
        lines.append({"text": "Write forty-two as a number.", "answer": "42"})
        (tmp_path / name).write_text("".join(json.dumps(line) + "\n" for line in lines))
        return str(tmp_path / name)

    calib, fresh, out = write("calib.jsonl", range(2)), write("eval.jsonl", range(2, 4)), tmp_path / "ckpt"
    args = ["quantize", "default", "--calib", calib, "--recipe", "rtn-w8a8", "--compare", "--no-eval", "--quiet"]
    assert main([*args, "--calib-samples", "2", "--out", str(out)]) == 0
    assert "3 calibration samples from" in capsys.readouterr().out
    hashes = read_manifest(out)["calibration"]["sample_sha256"]
    assert hashes == [s.sha256 for s in read_samples(calib)]

    assert main(["eval", str(out), "--data", calib]) == 1
    error = capsys.readouterr().err
    assert "3 of the 3 evaluation samples were calibration samples of" in error and "0.png" in error
    assert main(["eval", str(out), "--data", fresh]) == 1, "the text question is shared with calibration"
    assert "1 of the 3 evaluation samples" in capsys.readouterr().err

    (tmp_path / "eval.jsonl").write_text("".join(line + "\n" for line in Path(fresh).read_text().splitlines() if "image" in line))
    assert main(["eval", str(out), "--data", fresh]) == 0
    header, fp, quantized = capsys.readouterr().out.strip().splitlines()[-3:]
    assert header.split() == ["model", "vision", "exact", "match"] and fp.startswith("FP32") and quantized.startswith(str(out))
    assert np.isfinite(float(quantized.split()[-1].rstrip("%")))

    # the README's example media, as written: the quantized built-in model reads the number 7 in both
    examples = Path(__file__).resolve().parents[1] / "examples"
    for flag, name in (("--image", "seven.png"), ("--audio", "seven.wav")):
        assert main(["generate", str(out), flag, str(examples / name), "--max-new-tokens", "4"]) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1] == "7", name


def test_calibration_file_options_are_checked(tmp_path, capsys):
    assert main(["quantize", TINY, "--calib-tokens", "100", "--no-eval", "--out", str(tmp_path / "x")]) == 1
    assert "give one (--calib PATH) too" in capsys.readouterr().err
    (tmp_path / "c.jsonl").write_text('{"text": "hi"}\n')
    assert main(["quantize", TINY, "--calib", str(tmp_path / "c.jsonl"), "--no-eval", "--out", str(tmp_path / "x")]) == 1
    assert "cannot read sample files" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "x"), "--model", TINY, "--data", str(tmp_path / "c.jsonl")]) == 1
    assert "has an 'answer': exact match needs" in capsys.readouterr().err


def test_compare_captures_and_calibrates_once(tmp_path, capsys, monkeypatch, one_thread):
    import torch

    from masq_fx import sequential

    counts = {"export": 0, "float layer passes": 0}
    export, collect = torch.export.export, sequential.collect_stats

    def counted_export(*args, **kwargs):
        counts["export"] += 1
        return export(*args, **kwargs)

    def counted_collect(gm, layer=None):
        counts["float layer passes"] += 1
        return collect(gm, layer)

    monkeypatch.setattr(torch.export, "export", counted_export)
    monkeypatch.setattr(sequential, "collect_stats", counted_collect)
    out = tmp_path / "cmp"
    argv = ["quantize", TINY, "--recipe", "masquant-w4a8", "--compare", "smoothquant-w4a8-gptq", "rtn-w8a8", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    table = capsys.readouterr().out.strip().splitlines()[-5:-1]
    assert [row.split()[0] for row in table] == ["FP32", "masquant-w4a8", "smoothquant-w4a8-gptq", "rtn-w8a8"]
    # the tiny model's two layers, once for the plain recipes and once for masquant-w4a8's rotated float graph
    assert counts == {"export": 1, "float layer passes": 4}
