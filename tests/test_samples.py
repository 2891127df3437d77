"""User calibration / evaluation files: reading, errors, content hashes, token balancing, processing."""

from __future__ import annotations

import hashlib
import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from masq_fx.data.samples import (
    FileSample,
    SampleFileError,
    balance,
    content_sha256,
    first_per_kind,
    read_samples,
    require_unseen,
)


def write_png(path: Path, seed: int = 0, size: tuple[int, int] = (112, 56)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_wav(path: Path, seconds: float = 1.5, seed: int = 0, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = (np.random.default_rng(seed).normal(0, 0.1, int(seconds * rate)) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate), w.writeframes(pcm.tobytes())
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def jsonl(tmp_path) -> Path:
    write_png(tmp_path / "img" / "7.png")
    write_wav(tmp_path / "wav" / "12.wav")
    return write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"text": "What number is in the image?", "image": "img/7.png", "answer": "7"},
            "",
            {"audio": "wav/12.wav"},
            {"text": "Explain Python decorators."},
        ],
    )


# ----------------------------------------------------------------------------- reading


def test_jsonl_samples_resolve_paths_relative_to_the_file(jsonl):
    image, audio, text = read_samples(jsonl)
    assert (image.kind, audio.kind, text.kind) == ("vision", "audio", "text")
    assert image.image == jsonl.parent / "img" / "7.png" and image.answer == "7" and image.text == "What number is in the image?"
    assert audio.audio == jsonl.parent / "wav" / "12.wav" and audio.text is None and audio.answer is None
    assert text.text == "Explain Python decorators." and text.image is None
    assert image.origin == f"{jsonl} line 1" and audio.origin == f"{jsonl} line 3", "blank lines keep the numbering"
    assert image.where.endswith("(" + str(jsonl.parent / "img" / "7.png") + ")")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "hi"', "line 2 is not valid JSON"),
        ('["hi"]', "line 2 is a JSON list, not an object"),
        ('{"text": "hi", "prompt": "x"}', "line 2 has unknown key(s) 'prompt'; the keys are text, image, audio, answer"),
        ('{"text": "hi", "answer": 7}', "line 2: 'answer' must be a non-empty string, got 7"),
        ('{"text": ""}', "line 2: 'text' must be a non-empty string"),
        ('{"answer": "7"}', "line 2 has no prompt: give 'text', 'image' or 'audio'"),
        ('{"image": "img/7.png", "audio": "wav/12.wav"}', "line 2 has both 'image' and 'audio'"),
        ('{"image": "wav/12.wav"}', "line 2: image 'wav/12.wav' is not a .png/.jpg/.jpeg file"),
        ('{"audio": "img/7.png"}', "line 2: audio 'img/7.png' is not a .wav file"),
    ],
)
def test_malformed_jsonl_lines_are_named(jsonl, line, message):
    jsonl.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(SampleFileError) as error:
        read_samples(jsonl)
    assert str(error.value).startswith(f"{jsonl} ") and message in str(error.value)


def test_missing_media_names_the_path_and_the_line(jsonl):
    write_jsonl(jsonl, [{"text": "ok"}, {"image": "img/8.png", "answer": "8"}])
    with pytest.raises(FileNotFoundError, match=r"line 2: image 'img/8\.png' not found \(looked for .*img/8\.png; paths are relative"):
        read_samples(jsonl)


def test_empty_or_absent_inputs_are_refused(tmp_path):
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(SampleFileError, match="holds no samples"):
        read_samples(tmp_path / "blank.jsonl")
    with pytest.raises(FileNotFoundError, match="give a JSONL file or a folder"):
        read_samples(tmp_path / "nothing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SampleFileError, match=r"empty: put \*\.png, \*\.jpg, \*\.jpeg, \*\.wav, \*\.txt files in it"):
        read_samples(tmp_path / "empty")


def test_folder_samples_by_extension_sorted_by_name(tmp_path):
    folder = tmp_path / "calib"
    write_wav(folder / "b.wav")
    write_png(folder / "a.PNG")
    write_png(folder / "c.jpg")
    (folder / "d.txt").write_text("  What is a decorator?\n")
    (folder / ".hidden").write_text("skipped")
    samples = read_samples(folder)
    assert [(Path(s.origin).name, s.kind) for s in samples] == [("a.PNG", "vision"), ("b.wav", "audio"), ("c.jpg", "vision"), ("d.txt", "text")]
    assert samples[3].text == "What is a decorator?" and all(s.answer is None for s in samples)


def test_folder_with_other_files_says_which_extensions_are_accepted(tmp_path):
    folder = tmp_path / "calib"
    write_png(folder / "a.png")
    (folder / "notes.md").write_text("x")
    (folder / "sub").mkdir()
    with pytest.raises(SampleFileError, match=r"2 entries that are no samples \(notes\.md, sub\).*only \*\.png, \*\.jpg, \*\.jpeg, \*\.wav, \*\.txt files"):
        read_samples(folder)
    (folder / "notes.md").unlink(), (folder / "sub").rmdir()
    (folder / "empty.txt").write_text("  \n")
    with pytest.raises(SampleFileError, match="empty.txt is empty"):
        read_samples(folder)


# ----------------------------------------------------------------------------- hashes


def test_content_hash_is_fixed_and_ignores_paths_and_answers(jsonl, tmp_path):
    assert content_sha256("hi", None) == hashlib.sha256(b"text:2:hi").hexdigest(), "stable across machines: a fixed recipe"
    data = b"\x89PNG..."
    assert content_sha256(None, ("image", data)) == hashlib.sha256(b"image:7:" + data).hexdigest()
    image, audio, text = read_samples(jsonl)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "renamed.png").write_bytes((jsonl.parent / "img" / "7.png").read_bytes())
    write_jsonl(moved / "eval.jsonl", [{"text": "What number is in the image?", "image": "renamed.png", "answer": "seven"}, {"text": "Explain Python decorators."}])
    again, text_again = read_samples(moved / "eval.jsonl")
    assert again.sha256 == image.sha256 and text_again.sha256 == text.sha256
    (moved / "calib").mkdir()
    (moved / "calib" / "q.txt").write_text("Explain Python decorators.\n")
    assert read_samples(moved / "calib")[0].sha256 == text.sha256, "a JSONL prompt and the same .txt prompt hash alike"
    write_png(moved / "renamed.png", seed=1)
    assert read_samples(moved / "eval.jsonl")[0].sha256 != image.sha256, "other bytes, other hash"
    assert len({image.sha256, audio.sha256, text.sha256}) == 3


def test_evaluation_refuses_calibration_samples(jsonl):
    samples = read_samples(jsonl)
    require_unseen(samples, {"0" * 64}, "runs/x")
    with pytest.raises(ValueError, match=r"2 of the 3 evaluation samples were calibration samples of runs/x \(e\.g\. .*line 1 \(.*7\.png\)\)"):
        require_unseen(samples, {samples[0].sha256, samples[2].sha256}, "runs/x")


# ----------------------------------------------------------------------------- selection


def fake(kind: str, i: int) -> FileSample:
    media = {"vision": {"image": Path(f"{i}.png")}, "audio": {"audio": Path(f"{i}.wav")}, "text": {"text": f"t{i}"}}[kind]
    return FileSample(origin=f"s{i}", sha256=f"{i:064x}", **media)


def test_first_per_kind_keeps_file_order():
    samples = [fake(k, i) for i, k in enumerate(["text", "vision", "vision", "audio", "text", "vision"])]
    assert [s.origin for s in first_per_kind(samples, 1)] == ["s0", "s1", "s3"]
    assert [s.origin for s in first_per_kind(samples, 2)] == ["s0", "s1", "s2", "s3", "s4"]


def test_balance_splits_the_budget_equally_and_passes_on_what_a_modality_cannot_use():
    kinds = ["text"] * 6 + ["vision"] * 6 + ["audio"] * 2
    samples = [fake(k, i) for i, k in enumerate(kinds)]
    tokens = [100] * 6 + [20] * 6 + [10] * 2
    chosen = balance(samples, tokens, 300)
    # audio (20 tokens) and vision (120) fit in their shares of 100 and 140; text gets the other 160
    assert chosen.tokens == {"text": 100, "vision": 120, "audio": 20}
    assert [s.origin for s in chosen.samples] == ["s0"] + [f"s{i}" for i in range(6, 14)]
    assert balance(samples, tokens, 300) == chosen, "deterministic"
    assert balance(samples, tokens, 10_000).tokens == {"text": 600, "vision": 120, "audio": 20}


def test_a_budget_too_small_for_a_modality_names_the_least_that_works():
    samples = [fake("text", 0), fake("vision", 1), fake("audio", 2)]
    with pytest.raises(ValueError, match=r"leaves 20 for text, less than its smallest sample \(50 tokens\); raise it to 150 tokens"):
        balance(samples, [50, 10, 10], 40)
    assert balance(samples, [50, 10, 10], 150).tokens == {"text": 50, "vision": 10, "audio": 10}


@given(
    st.lists(st.tuples(st.sampled_from(["text", "vision", "audio"]), st.integers(1, 60)), min_size=1, max_size=30),
    st.integers(1, 2000),
)
def test_balance_stays_in_budget_and_shares_equally(items, budget):
    samples = [fake(kind, i) for i, (kind, _) in enumerate(items)]
    tokens = [n for _, n in items]
    try:
        chosen = balance(samples, tokens, budget)
    except ValueError as error:
        assert "raise it to" in str(error)
        return
    assert sum(chosen.tokens.values()) <= budget
    assert set(chosen.tokens) == {kind for kind, _ in items}, "every modality present gets samples"
    assert list(chosen.samples) == sorted(chosen.samples, key=samples.index), "original order"
    totals = {kind: sum(n for k, n in items if k == kind) for kind in chosen.tokens}
    biggest = max(tokens)
    for a in (kind for kind in chosen.tokens if chosen.tokens[kind] < totals[kind]):
        # a modality cut by the budget holds its equal share (at least budget / modalities) up to one
        # sample's tokens, and no other modality holds more than that share
        assert chosen.tokens[a] > budget // len(totals) - biggest
        assert all(chosen.tokens[a] + biggest > n for n in chosen.tokens.values())


# ----------------------------------------------------------------------------- processing


@pytest.fixture(scope="module")
def trimodal(one_thread):
    from masq_fx.builtin.trimodal import load_trimodal

    return load_trimodal()


@pytest.fixture
def default_source(trimodal, monkeypatch):
    """``load_source("default", ...)`` with the module's already loaded tri-modal model."""
    from masq_fx.app import sources
    from masq_fx.builtin import trimodal as package

    monkeypatch.setattr(package, "load_trimodal", lambda: trimodal)

    def load(calibration: Path | None = None, calibration_tokens: int | None = None):
        sizes = sources.Sizes(evaluation=1, eval_windows=1, calibration_tokens=calibration_tokens)
        return sources.load_source("default", sizes, calibration=calibration)

    return load


def shipped_files(folder: Path, count: int) -> list[dict]:
    """The first ``count`` shipped evaluation images written as PNG files, with their answers."""
    from masq_fx.builtin.trimodal import load_set

    evaluation = load_set("evaluation")
    records = []
    for i in range(count):
        Image.fromarray(evaluation.vision_images[i]).save(folder / f"eval{i}.png")
        records.append({"image": f"eval{i}.png", "answer": str(int(evaluation.vision_numbers[i]))})
    return records


def test_trimodal_processing_of_file_samples(default_source, trimodal, jsonl):
    _, processor = trimodal
    source = default_source(calibration=jsonl)
    image, audio, text = read_samples(jsonl)
    assert "3 calibration samples from" in source.title and source.calibration_hashes == (image.sha256, audio.sha256, text.sha256)
    (batch,) = source.calibration
    assert batch["input_ids"].shape[0] == 3 and batch["pixel_values"].shape[0] == 32 and batch["input_features"].shape[0] == 1
    expected = processor([processor.sample(image=np.asarray(Image.open(image.image).convert("RGB")))])
    alone = source.process([image])
    assert all(torch.equal(alone[k], expected[k]) for k in expected)
    write_jsonl(jsonl, [{"text": "What colour is it?", "image": "img/7.png"}])
    with pytest.raises(ValueError, match=r"line 1 \(.*7\.png\): the built-in model asks 'What number is in the image\?' about every image; drop the 'text'"):
        default_source(calibration=jsonl)


def test_token_budget_balances_the_calibration_samples(default_source, tmp_path):
    write_wav(tmp_path / "a.wav")
    records = [{"image": f"{i}.png"} for i in range(4)] + [{"audio": "a.wav"}] + [{"text": "Hi " * (5 * i + 1)} for i in range(4)]
    for i in range(4):
        write_png(tmp_path / f"{i}.png", seed=i)
    write_jsonl(tmp_path / "c.jsonl", records)
    from masq_fx.app.sources import Sizes, calibration_selection

    source = default_source(calibration=tmp_path / "c.jsonl", calibration_tokens=200)
    selection = calibration_selection(source.process, tmp_path / "c.jsonl", Sizes(calibration_tokens=200))
    assert source.calibration_hashes == tuple(s.sha256 for s in selection.samples)
    assert set(selection.tokens) == {"vision", "audio", "text"} and sum(selection.tokens.values()) <= 200
    assert selection.tokens["audio"] < 200 // 3, "one short clip: its unused share goes to the others"
    assert abs(selection.tokens["vision"] - selection.tokens["text"]) <= 30


def test_file_exact_match_agrees_with_the_trimodal_accuracy_helper(default_source, trimodal, tmp_path):
    from masq_fx.app.sources import exact_match_per_kind as exact_match
    from masq_fx.builtin.trimodal import accuracy, load_set
    from masq_fx.eval.accuracy import eager_decoder
    from masq_fx.models import adapter_for

    model, processor = trimodal
    write_jsonl(tmp_path / "eval.jsonl", shipped_files(tmp_path, 3))
    source = default_source()
    scores = exact_match(source, eager_decoder(model), read_samples(tmp_path / "eval.jsonl"), batch_size=2)
    reference = accuracy(eager_decoder(model), adapter_for(model), processor, load_set("evaluation").samples("vision", 3))
    assert list(scores) == ["vision"] and scores["vision"] == reference
    with pytest.raises(ValueError, match="has no 'answer'"):
        exact_match(source, eager_decoder(model), read_samples(tmp_path / "eval.jsonl")[:1] + [fake("text", 9)])


def test_text_models_take_text_samples_only(trimodal, tmp_path, jsonl):
    from transformers import LlamaConfig, LlamaForCausalLM

    from masq_fx.app.sources import Sizes, load_source

    _, processor = trimodal
    folder = tmp_path / "tiny-llm"
    config = LlamaConfig(vocab_size=len(processor.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    with pytest.raises(ValueError, match=r"line 1 \(.*7\.png\) is a vision sample, but tiny-llm is a text-only model: give it text samples only"):
        load_source(str(folder), Sizes(eval_windows=1), calibration=jsonl)
    write_jsonl(jsonl, [{"text": "Hi"}, {"text": "Explain Python decorators in one long sentence."}])
    source = load_source(str(folder), Sizes(eval_windows=1), calibration=jsonl)
    (batch,) = source.calibration
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all(), "prompts are left-padded"
    assert len(source.calibration_hashes) == 2


def test_budget_without_a_file_and_files_for_a_tiny_model_are_refused(jsonl):
    from masq_fx.app.sources import Sizes, load_source

    with pytest.raises(ValueError, match=r"balances calibration files: give one \(--calib PATH\) too"):
        load_source("tiny:llama", Sizes(calibration_tokens=100))
    with pytest.raises(ValueError, match="no tokenizer or processor, so it cannot read sample files"):
        load_source("tiny:llama", calibration=jsonl)
