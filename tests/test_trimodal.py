"""The built-in trimodal model: shipped splits, preprocessing, SmolLM2 equality, capture, and FP accuracy.

Loading needs no network and no espeak-ng (the towers and the calibration/evaluation sets ship in
``masq_fx/builtin/trimodal/assets``). Nothing here trains.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from trimodal_data import AUDIO_VOICES

from masq_fx.builtin.trimodal import accuracy, load_set, load_trimodal
from masq_fx.builtin.trimodal.data import (
    MAX_ITEMS_PER_SPLIT,
    SPLIT_SEED_BASE,
    VISION_EVAL_NUMBERS,
    VISION_TRAIN_NUMBERS,
    item_seed,
    number_words,
    text_item,
)
from masq_fx.builtin.trimodal.processing import IM_END, SPECIAL_TOKENS, AudioSpec, ImageSpec, image_patches, log_mel
from masq_fx.capture.decoder import capture
from masq_fx.eval.accuracy import eager_decoder, greedy_decode
from masq_fx.modality import Modality
from masq_fx.models import adapter_for

ACCURACY_ITEMS = 64  # per modality, the first items of the shipped evaluation split


@pytest.fixture(scope="module")
def shipped():
    return {split: load_set(split) for split in ("calibration", "evaluation")}


# ------------------------------------------------------------------------------------ splits


def test_vision_numbers_are_split_and_every_digit_is_seen_in_every_position():
    assert set(VISION_EVAL_NUMBERS).isdisjoint(VISION_TRAIN_NUMBERS)
    assert set(VISION_EVAL_NUMBERS) | set(VISION_TRAIN_NUMBERS) == set(range(100))
    two_digit = [n for n in VISION_TRAIN_NUMBERS if n >= 10]
    assert {n // 10 for n in two_digit} == set(range(1, 10))
    assert {n % 10 for n in two_digit} == set(range(10))


def test_audio_evaluation_voices_are_unseen():
    train, calibration, evaluation = (AUDIO_VOICES[s] for s in ("train", "calibration", "evaluation"))
    for seen in (train, calibration):
        assert set(evaluation.variants).isdisjoint(seen.variants)
        assert set(evaluation.speeds).isdisjoint(seen.speeds)
        assert set(evaluation.pitches).isdisjoint(seen.pitches)


def test_item_seeds_of_the_splits_never_meet():
    ranges = sorted((base, base + MAX_ITEMS_PER_SPLIT) for base in SPLIT_SEED_BASE.values())
    assert all(hi <= lo for (_, hi), (lo, _) in zip(ranges, ranges[1:]))
    assert item_seed("evaluation", 0) != item_seed("train", 0)
    with pytest.raises(ValueError):
        item_seed("train", MAX_ITEMS_PER_SPLIT)


def test_shipped_sets_are_disjoint(shipped):
    calibration, evaluation = shipped["calibration"], shipped["evaluation"]
    assert set(evaluation.vision_numbers.tolist()) <= set(VISION_EVAL_NUMBERS)
    assert set(calibration.vision_numbers.tolist()) <= set(VISION_TRAIN_NUMBERS)
    for seeds, split in (
        (calibration.vision_seeds, "calibration"),
        (calibration.audio_seeds, "calibration"),
        (evaluation.vision_seeds, "evaluation"),
        (evaluation.audio_seeds, "evaluation"),
    ):
        base = SPLIT_SEED_BASE[split]
        assert ((seeds >= base) & (seeds < base + MAX_ITEMS_PER_SPLIT)).all()
        assert len(set(seeds.tolist())) == len(seeds)
    eval_variants = set(AUDIO_VOICES["evaluation"].variants)
    for voice in evaluation.audio_voices.tolist():
        assert voice.split()[0].split("+")[1] in eval_variants
    for voice in calibration.audio_voices.tolist():
        assert voice.split()[0].split("+")[1] not in eval_variants


def test_shipped_sets_are_small_and_well_formed(shipped):
    spec = AudioSpec()
    for data in shipped.values():
        assert data.vision_images.dtype == np.uint8 and data.vision_images.shape[1:] == (56, 112, 3)
        frames = data.audio_frames
        assert (frames >= spec.frames(int(spec.min_seconds * spec.sample_rate))).all()
        assert (frames <= spec.max_frames).all()
        assert len(data.samples("text")) == len(data.vision_numbers)


def test_text_questions_follow_the_vision_split():
    assert number_words(42) == "forty-two" and number_words(13) == "thirteen" and number_words(70) == "seventy"
    assert text_item("evaluation", 5).number in VISION_EVAL_NUMBERS
    assert text_item("calibration", 5).number in VISION_TRAIN_NUMBERS


# ----------------------------------------------------------------------------- preprocessing


def test_image_patches_match_the_hf_qwen2_vl_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = np.random.default_rng(0).integers(0, 256, (2, 56, 112, 3), dtype=np.uint8)
    reference = Qwen2VLImageProcessorPil()(list(images), return_tensors="pt")
    ours = image_patches(images)
    torch.testing.assert_close(ours["pixel_values"], reference["pixel_values"], rtol=1e-5, atol=1e-5)
    assert ours["image_grid_thw"].tolist() == reference["image_grid_thw"].tolist() == [[1, 4, 8]] * 2
    assert ImageSpec().tokens == 8


def test_log_mel_shape_and_tokens():
    spec = AudioSpec()
    wav = np.sin(np.linspace(0, 2000 * np.pi, 24000)).astype(np.float32)
    feats = log_mel(wav, spec)
    assert feats.shape == (spec.mel_bins, 24000 // spec.hop_length)
    assert torch.isfinite(feats).all()
    with pytest.raises(ValueError):
        log_mel(np.zeros((2, 100), dtype=np.float32))


# ------------------------------------------------------------------------- the shipped model

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def trimodal(smollm2):
    return load_trimodal(smollm2=smollm2)


@slow
def test_processor_batches_every_modality(trimodal, shipped):
    model, processor = trimodal
    data = shipped["calibration"]
    samples = [data.samples("vision", 1)[0], data.samples("audio", 1)[0], data.samples("text", 1)[0]]
    batch = processor(samples)
    ids = batch["input_ids"]
    assert int((ids[0] == SPECIAL_TOKENS["image"]).sum()) == processor.image.tokens
    frames = int(data.audio_frames[0])
    assert int((ids[1] == SPECIAL_TOKENS["audio"]).sum()) == processor.audio.tokens(frames)
    assert not bool(torch.isin(ids[2], torch.tensor([SPECIAL_TOKENS["image"], SPECIAL_TOKENS["audio"]])).any())
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding
    raw = processor.sample(waveform=np.zeros(16000, dtype=np.float32) + 1e-3, answer="1")
    assert raw.modality == "audio" and raw.features.shape[0] == processor.audio.mel_bins
    with pytest.raises(ValueError):
        processor.sample(text="a", image=data.vision_images[0])


@slow
def test_text_logits_equal_smollm2(trimodal, smollm2):
    model, _ = trimodal
    llm, tokenizer = smollm2
    ids = tokenizer(["The capital of France is Paris, and the capital of Italy is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        reference = llm(input_ids=ids).logits
    assert (ours - reference).abs().max().item() <= 1e-4
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


@slow
def test_adapter_and_capture_work_on_the_shipped_model(trimodal, shipped):
    model, processor = trimodal
    adapter = adapter_for(model)
    assert adapter.family == "qwen2.5-omni-thinker"
    data = shipped["calibration"]
    batch = processor(data.samples("vision", 2) + data.samples("audio", 2))
    inputs = adapter.decoder_inputs(batch)
    mods = inputs.modality_ids
    assert int((mods == Modality.VISION).sum()) == 2 * processor.image.tokens
    assert int((mods == Modality.AUDIO).sum()) == int((batch["input_ids"] == SPECIAL_TOKENS["audio"]).sum())
    assert inputs.position_ids.shape[0] == 3
    captured = capture(model)
    assert set(captured.modalities) == {Modality.TEXT, Modality.VISION, Modality.AUDIO}
    with torch.no_grad():
        eager = model(**batch).logits
    torch.testing.assert_close(captured(inputs), eager, rtol=1e-4, atol=1e-4)
    # greedy decoding on the captured graph equals HF generate() with its KV cache
    prompt_len = batch["input_ids"].shape[1]
    reference = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, prompt_len:]
    ours = greedy_decode(captured, adapter, inputs, max_new_tokens=3, stop_id=IM_END)
    assert [processor.decode_answer(r) for r in ours.tolist()] == [processor.decode_answer(r) for r in reference.tolist()]
@slow
@pytest.mark.parametrize("modality", ["vision", "audio"])
def test_fp_accuracy_on_the_evaluation_split(trimodal, shipped, modality):
    model, processor = trimodal
    samples = shipped["evaluation"].samples(modality, ACCURACY_ITEMS)
    acc = accuracy(eager_decoder(model), adapter_for(model), processor, samples)
    assert acc.total == ACCURACY_ITEMS
    assert acc.value >= 0.85, f"{modality}: {acc}, misses {acc.misses[:10]}"
