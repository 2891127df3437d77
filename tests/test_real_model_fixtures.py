"""The real-configuration fixtures (``benchmarks/fixtures/real_models.py``).

The fast tests check the configurations, the weight plan and the tokenizer without writing weights.
The slow ones write each model with 1 decoder layer and 1 vision/audio block into ``tmp_path`` (the
full-width embeddings stay: 0.9 GB for the 3B, 2.8 GB for the 7B models), load it with
``from_pretrained`` and its processor, run it on a processed text + image (+ audio) batch, and hand it
to masq_fx's adapter and capture. Nothing is written under ``~/.cache``.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import real_models as rm
import torch
import transformers
from PIL import Image

from masq_fx.capture.decoder import capture
from masq_fx.data.processor import load_processor
from masq_fx.modality import Modality
from masq_fx.models import adapter_for

IMAGE_TOKEN = 151655
AUDIO_TOKEN = 151646

#: (hidden, intermediate, layers, heads, KV heads, vocab, tied embeddings, parameters in billions)
PUBLISHED = {
    "qwen2.5-vl-3b": (2048, 11008, 36, 16, 2, 151936, True, 3.75),
    "qwen2.5-vl-7b": (3584, 18944, 28, 28, 4, 152064, False, 8.29),
    "qwen2.5-omni-7b-thinker": (3584, 18944, 28, 28, 4, 152064, False, 8.93),
}


def test_published_shapes_and_parameter_counts():
    for name, (hidden, inter, layers, heads, kv, vocab, tied, billions) in PUBLISHED.items():
        spec = rm.MODELS[name]
        config = rm.model_config(spec)
        text = rm.hf_config(spec, config).get_text_config()
        assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (hidden, inter, layers)
        assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (heads, kv, vocab)
        assert text.rope_parameters["mrope_section"] == [16, 24, 24] and text.rope_parameters["rope_theta"] == 1e6
        plan = rm.tensor_plan(rm.skeleton(spec, config))
        names = {t.name for t in plan}
        assert ("lm_head.weight" in names) is not tied
        assert sum(t.nbytes for t in plan) / 2e9 == pytest.approx(billions, abs=0.01)
        assert {t.init for t in plan if t.name.endswith("norm.weight")} == {"ones"}
        assert {t.init for t in plan if t.name.endswith(".bias")} == {"zeros"}


def test_overrides_are_recorded_and_keep_a_full_attention_block():
    spec = rm.MODELS["qwen2.5-omni-7b-thinker"]
    config = rm.model_config(spec, layers=2, tower_layers=9)
    assert config["text_config"]["num_hidden_layers"] == 2
    assert config["vision_config"]["depth"] == 9 and config["vision_config"]["fullatt_block_indexes"] == [7]
    assert config["audio_config"]["encoder_layers"] == 9
    assert rm.model_config(spec, tower_layers=3)["vision_config"]["fullatt_block_indexes"] == [2]
    assert spec.config["text_config"]["num_hidden_layers"] == 28  # the published dict is untouched
    assert rm.folder_name(spec, 2, 9, seed=3) == "qwen2.5-omni-7b-thinker-L2-T9-seed3"
    assert rm.folder_name(rm.MODELS["qwen2.5-vl-3b"]) == "qwen2.5-vl-3b"
    with pytest.raises(ValueError, match="--layers"):
        rm.model_config(spec, layers=0)


def test_draws_are_seeded_per_name():
    t = rm.Tensor("a.weight", (64, 32), "normal")
    a, b = rm.draw(t, seed=0), rm.draw(t, seed=0)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    assert not torch.equal(a, rm.draw(t, seed=1))
    assert not torch.equal(a, rm.draw(rm.Tensor("b.weight", (64, 32), "normal"), seed=0))
    assert 0.015 < a.float().std().item() < 0.025
    assert torch.equal(rm.draw(rm.Tensor("n.weight", (8,), "ones"), 0), torch.ones(8, dtype=torch.bfloat16))


def test_shards_respect_the_limit():
    plan = [rm.Tensor(f"t{i}", (n,), "zeros") for i, n in enumerate([10, 20, 50, 5, 5])]  # 2 bytes each
    assert [[t.name for t in s] for s in rm.shards(plan, 60)] == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    assert len(rm.shards(plan, 10)) == 5  # each tensor above the limit gets a shard of its own


@pytest.mark.parametrize("name", ["qwen2.5-vl-3b", "qwen2.5-omni-7b-thinker"])
def test_tokenizer_special_tokens_sit_at_the_config_ids(name):
    spec = rm.MODELS[name]
    tokenizer = rm.build_tokenizer(spec)
    config = spec.config
    ids = {
        "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
        spec.specials[config.get("vision_start_token_id", 151652)]: 151652,
        spec.specials[config.get("image_token_id", config.get("image_token_index"))]: 151655,
        spec.specials[config.get("video_token_id", config.get("video_token_index"))]: 151656,
    }
    if spec.omni:
        ids.update({"<|AUDIO|>": config["audio_token_index"], "<|audio_bos|>": config["audio_start_token_id"], "<|audio_eos|>": config["audio_end_token_id"]})
        assert (tokenizer.image_token_id, tokenizer.audio_token_id, tokenizer.video_token_id) == (151655, 151646, 151656)
    for token, i in ids.items():
        assert tokenizer.convert_tokens_to_ids(token) == i
    text = "Hello, world! <|im_start|>"
    encoded = tokenizer(text).input_ids
    assert encoded[-1] == 151644 and max(encoded[:-1]) < 256  # byte-level text, then the special token
    assert tokenizer.decode(encoded) == text


def test_incomplete_folders_are_not_complete(tmp_path):
    folder = tmp_path / "qwen2.5-vl-3b-L1"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    assert not rm.is_complete(folder)  # no marker
    (folder / rm.MARKER).write_text(json.dumps({"format": rm.FORMAT_VERSION, "seed": 0}))
    assert rm.is_complete(folder) and not rm.is_complete(folder, {"seed": 1})


def _batch(processor, omni: bool) -> tuple[dict[str, torch.Tensor], int, int]:
    """A processed chat turn with a 56 x 84 image (and 1 s of audio): the batch and its expected pad counts."""
    content: list[dict[str, str]] = [{"type": "image"}, {"type": "text", "text": "What do you see and hear?"}]
    if omni:
        content.insert(1, {"type": "audio"})
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8))
    extra = {"audio": [rng.standard_normal(16000).astype(np.float32) * 0.1]} if omni else {}
    batch = dict(processor(text=[text], images=[image], return_tensors="pt", **extra))
    image_tokens = int(batch["image_grid_thw"].prod()) // 4  # 2 x 2 patches merge into one token
    audio_tokens = 0
    if omni:
        frames = int(batch["feature_attention_mask"].sum())
        assert frames == 100  # 10 ms hop
        audio_tokens = ((frames - 1) // 2 + 1 - 2) // 2 + 1  # conv stride 2, then pooling by 2
    return batch, image_tokens, audio_tokens


@pytest.fixture
def scratch(tmp_path):
    """``tmp_path``, emptied afterwards even on failure: pytest keeps the last runs' folders, 6 GB each here."""
    yield tmp_path
    for child in tmp_path.iterdir():
        shutil.rmtree(child, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-vl-3b", "qwen2.5-omni-7b-thinker"])  # the 7B VL is the 3B's class at the omni's widths
def test_one_layer_fixture_loads_runs_and_captures(name, scratch):
    tmp_path = scratch
    spec = rm.MODELS[name]
    max_shard = 300_000_000 if name == "qwen2.5-vl-3b" else rm.DEFAULT_MAX_SHARD_BYTES
    folder = rm.write_model(spec, tmp_path, layers=1, tower_layers=1, max_shard_bytes=max_shard)
    assert folder == tmp_path / f"{name}-L1-T1"
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no partial folder left
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)] and len(files) >= 2
    assert all((folder / f).stat().st_size <= max(max_shard, 1_100_000_000) for f in files)  # the embedding stands alone
    assert rm.is_complete(folder, {"seed": 0, "layers": 1, "tower_layers": 1})
    assert rm.verify(folder, spec) == len(index["weight_map"])
    stamp = os.stat(folder / files[0]).st_mtime_ns
    assert rm.write_model(spec, tmp_path, layers=1, tower_layers=1) == folder and os.stat(folder / files[0]).st_mtime_ns == stamp

    model, info = getattr(transformers, spec.model_class).from_pretrained(folder, dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    model.eval()
    assert set(index["weight_map"]) == {t.name for t in rm.tensor_plan(model)}
    embed = model.get_input_embeddings().weight
    assert (model.get_output_embeddings().weight is embed) == PUBLISHED[name][6]

    processor = load_processor(folder)
    batch, image_tokens, audio_tokens = _batch(processor, spec.omni)
    ids = batch["input_ids"][0].tolist()
    assert ids.count(IMAGE_TOKEN) == image_tokens == 6 and ids.count(AUDIO_TOKEN) == audio_tokens
    assert ids[0] == 151644 and ids.count(151652) == 1 and ids.count(151653) == 1
    if spec.omni:
        assert ids.count(151647) == 1 and ids.count(151648) == 1 and audio_tokens == 25
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, len(ids), PUBLISHED[name][5]) and torch.isfinite(logits.float()).all()

    adapter = adapter_for(model)
    assert adapter.family == ("qwen2.5-omni-thinker" if spec.omni else "qwen2.5-vl")
    inputs = adapter.decoder_inputs(batch)
    assert int((inputs.modality_ids == Modality.VISION).sum()) == image_tokens
    assert int((inputs.modality_ids == Modality.AUDIO).sum()) == audio_tokens
    captured = capture(model)
    assert captured.num_layers == 1 and captured.hidden_size == PUBLISHED[name][0]
    with torch.no_grad():
        graph_logits = captured(inputs)
    # equal here; the tolerance allows bfloat16 kernel noise, not wrong positions (1.4 off on logits of 5)
    torch.testing.assert_close(graph_logits.float(), logits.float(), atol=2e-2, rtol=2e-2)


def test_list_writes_nothing(tmp_path, capsys):
    assert rm.main(["--list", "--out", str(tmp_path), "--layers", "2"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-vl-7b-L2" in out and "qwen2.5-omni-7b-thinker-L2" in out
    assert list(tmp_path.iterdir()) == []
