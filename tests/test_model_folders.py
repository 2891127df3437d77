"""``masq-fx`` on local multimodal model folders, as published: config, sharded safetensors and processor.

The folders are the real-configuration fixtures (``benchmarks/fixtures/real_models.py``: published
token ids, tokenizer, chat template and processor files) narrowed to 2 decoder layers of width 64 and
one tower block, so the whole command line runs in seconds: quantize with the built-in data or a
calibration file with images and audio, eval, generate, and the clear refusals of broken folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import real_models as rm
import torch
import transformers

from masq_fx.app.cli import main
from masq_fx.app.folder import load_model
from masq_fx.app.sources import Sizes, load_source
from masq_fx.checkpoint import read_manifest
from masq_fx.errors import InputError, MissingFileError
from masq_fx.modality import Modality
from masq_fx.models import UnsupportedModelError, adapter_for
from masq_fx.models.tiny import tiny_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def write_narrow(spec: rm.Spec, folder: Path, max_shard_size: str = "5GB") -> Path:
    """``spec``'s published folder layout with 2 decoder layers of width 64 and 1 tower block of width 32."""
    config = rm.model_config(spec, layers=2, tower_layers=1)
    text = config.get("text_config", config)
    text.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    text["rope_scaling"]["mrope_section"] = [2, 3, 3]  # head_dim 16
    config["vision_config"].update(hidden_size=32, embed_dim=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    if "audio_config" in config:
        config["audio_config"].update(d_model=32, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=64)
    torch.manual_seed(0)
    model = getattr(transformers, spec.model_class)(rm.hf_config(spec, config)).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    rm.write_processor(folder, spec)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    return {name: write_narrow(rm.MODELS[name], root / name) for name in ("qwen2.5-vl-3b", "qwen2.5-omni-7b-thinker")}


def modality_tokens(source) -> dict[Modality, int]:
    adapter = adapter_for(source.model)
    counts = {m: 0 for m in Modality}
    for batch in source.calibration:
        ids = adapter.decoder_inputs(batch).modality_ids
        for m in Modality:
            counts[m] += int((ids == m).sum())
    return counts


def test_a_vision_folder_quantizes_evaluates_and_generates_from_the_command_line(folders, tmp_path, capsys, one_thread):
    folder, out = folders["qwen2.5-vl-3b"], tmp_path / "vl"
    quick = ["--calib-samples", "2", "--seq-len", "64", "--quiet"]
    assert main(["quantize", str(folder), "--recipe", "masquant-w8a8", "--compare", "--no-eval", "--out", str(out), *quick]) == 0
    printed = capsys.readouterr().out
    assert "Qwen2_5_VLForConditionalGeneration" in printed and "2 × 64 calibration tokens of reference text and as many digit images" in printed
    assert read_manifest(out)["source"] == str(folder.resolve())
    assert "| vision |" in (out / "report.md").read_text()  # the digit images reached the decoder
    assert main(["eval", str(out), "--eval-items", "1", "--quiet"]) == 0
    header, fp, ours = capsys.readouterr().out.strip().splitlines()[-3:]
    assert header.split()[1:] == ["vision", "exact", "match", "text", "perplexity"] and fp.startswith("FP32") and ours.startswith(str(out))
    assert float(ours.split()[-1]) == pytest.approx(float(fp.split()[-1]), rel=0.01)  # W8A8 of a random model: close to FP
    assert main(["generate", str(out), "--image", str(EXAMPLES / "seven.png"), "--prompt", "Which digit?", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--audio", str(EXAMPLES / "seven.wav")]) == 1
    assert "takes no audio: give it text or images" in capsys.readouterr().err


def test_a_calibration_file_brings_audio_images_and_text_through_the_folders_processor(folders, tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    for name in ("seven.png", "seven.wav"):
        shutil.copy(EXAMPLES / name, calib / name)
    lines = [{"text": "Which number?", "image": "seven.png", "answer": "7"}, {"audio": "seven.wav"}, {"text": "Explain decorators."}]
    (calib / "calib.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    source = load_source(str(folders["qwen2.5-omni-7b-thinker"]), Sizes(calibration=4, evaluation=1, eval_windows=1), calib / "calib.jsonl")
    assert "3 calibration samples" in source.title and "(1 vision, 1 audio, 1 text)" in source.title
    assert len(source.calibration_hashes) == 3
    counts = modality_tokens(source)
    assert counts[Modality.AUDIO] == 25 and counts[Modality.VISION] > 0 and counts[Modality.TEXT] > 0  # 1 s of audio: 25 tokens
    batch = source.calibration[0]
    assert (batch["attention_mask"][:, 0] == 0).any() and (batch["attention_mask"][:, -1] == 1).all()  # left-padded rows
    # the reply ends at the chat template's end of turn, whichever end-of-sequence ids the model lists
    assert source.stop_id == 151645


def test_broken_folders_are_refused_before_the_weights_load(folders, tmp_path):
    sharded = write_narrow(rm.MODELS["qwen2.5-vl-3b"], tmp_path / "sharded", max_shard_size="8MB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[-1].unlink()
    with pytest.raises(MissingFileError, match=f"lacks 1 of the {len(shards)} weight shards its index lists .*download those files again"):
        load_source(str(sharded))
    bare = tmp_path / "bare"
    shutil.copytree(folders["qwen2.5-vl-3b"], bare, ignore=shutil.ignore_patterns("preprocessor_config.json"))
    with pytest.raises(InputError, match="holds a multimodal Qwen2_5_VLForConditionalGeneration but no processor"):
        load_source(str(bare))
    alien = tmp_path / "alien"
    shutil.copytree(folders["qwen2.5-vl-3b"], alien)
    config = json.loads((alien / "config.json").read_text())
    (alien / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2_5_VLForConditionalGeneration_v9"]}))
    with pytest.raises(InputError, match="names no model class transformers"):
        load_source(str(alien))
    transformers.BertConfig(architectures=["BertForMaskedLM"]).save_pretrained(alien)
    with pytest.raises(UnsupportedModelError, match="no adapter for BertForMaskedLM"):
        load_source(str(alien))


@pytest.mark.parametrize("family", ["qwen2.5-omni-thinker", "qwen3-omni-moe-thinker"])
def test_a_full_omni_folder_loads_its_thinker_alone(family, tmp_path):
    thinker = tiny_model(family, seed=0).model
    wrapper = getattr(transformers, type(thinker).__name__.replace("Thinker", ""))
    config = wrapper.config_class(thinker_config=thinker.config.to_dict(), enable_audio_output=False)
    full = wrapper(config)
    full.thinker.load_state_dict(thinker.state_dict())
    full.save_pretrained(tmp_path / "omni")  # as published: the thinker's weights under "thinker."
    loaded = load_model(tmp_path / "omni")
    assert type(loaded) is type(thinker) and loaded.state_dict().keys() == thinker.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), thinker.state_dict().values()))
