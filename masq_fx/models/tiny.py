"""Tiny random-weight models of the real HF classes, one per supported family, for tests and demos.

Every builder makes its config in code (no download), seeds the weights and the example batch, and
returns a :class:`TinyModel`: the model in eval mode plus a ``batch`` shaped like its processor's
output, ready for ``model(**batch)`` and ``adapter.decoder_inputs(batch)``. Decoders are 2 layers
of width 64 with a 256-token vocabulary; each build takes well under a second on a CPU.

By default a batch holds two rows of different lengths, left-padded (``attention_mask`` has zeros
at the start of row 1); ``batch_size=1`` gives one unpadded row. Every row holds the family's
modalities:

==========================  ======================
family                      modalities in a row
==========================  ======================
``llama``                   text
``llava``                   text + image
``qwen2-vl``                text + image
``qwen2.5-vl``              text + image
``qwen2-audio``             text + audio
``qwen2.5-omni-thinker``    text + image + audio
``qwen3``                   text
``qwen3-vl``                text + image
``qwen3-moe``               text
``qwen3-vl-moe``            text + image
``qwen3-omni-moe-thinker``  text + image + audio
``mistral3``                text + image
``idefics3``                text + image
``internvl``                text + image
``llava-onevision``         text + image + video
``voxtral``                 text + audio
``gemma3``                  text + image
``gemma3-text``             text
``gemma4``                  text + image + audio
``gemma4-text``             text
``qwen3.5``                 text + image
``qwen3.5-moe``             text + image
==========================  ======================

Token ids shared by all tiny configs: pad 0, text 1..239, and the special ids in :data:`TINY_TOKENS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3OmniMoeThinkerConfig,
    Qwen3OmniMoeThinkerForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    VoxtralConfig,
    VoxtralForConditionalGeneration,
)

from masq_fx.errors import InputError
from masq_fx.modality import Modality
from masq_fx.models.qwen_omni import thinker_token_fields

VOCAB = 256
HIDDEN = 64
LAYERS = 2
#: special token ids used by every tiny config (text tokens are drawn from 1..239)
TINY_TOKENS: dict[str, int] = {
    "pad": 0,
    "bos": 245,
    "eos": 246,
    "audio_start": 247,
    "audio_end": 248,
    "image": 250,
    "video": 251,
    "vision_start": 252,
    "vision_end": 253,
    "audio": 254,
}
_TEXT_MAX = 240

# Qwen-style vision towers: a 1x4x4 patch grid merges (2x2) into 4 image tokens.
_GRID = (1, 4, 4)
_PATCH, _TEMPORAL_PATCH, _MERGE = 14, 2, 2
_IMAGE_TOKENS = _GRID[0] * _GRID[1] * _GRID[2] // _MERGE**2
# Audio encoders: 16 mel bins, clips of 40 (even rows) or 32 (odd rows) frames -> 10 or 8 tokens.
_MEL_BINS = 16
_AUDIO_FRAMES = 40
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # head_dim 16
# Qwen3-VL: frequencies of the three rows interleaved (T H W T H W ...), 8 per head of 16
_MROPE_INTERLEAVED = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True}


@dataclass
class TinyModel:
    """A tiny model of one family and an example processed batch for it."""

    family: str
    model: nn.Module
    #: what the model's processor would return (``input_ids``, ``attention_mask``, pixel/audio tensors, ...)
    batch: dict[str, torch.Tensor]
    #: the modalities present in ``batch``, text included
    modalities: tuple[Modality, ...] = (Modality.TEXT,)


def _text_decoder(**extra: Any) -> dict[str, Any]:
    """Shared decoder sizes: hidden 64, 2 layers, 4 query / 2 KV heads (head_dim 16), vocab 256."""
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=TINY_TOKENS["pad"],
        bos_token_id=TINY_TOKENS["bos"],
        eos_token_id=TINY_TOKENS["eos"],
        **extra,
    )


def _qwen_vision_tower() -> dict[str, Any]:
    """Qwen2.5-VL / Omni vision tower: 1 block of width 32, projecting to the decoder width."""
    return dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=HIDDEN,
        patch_size=_PATCH,
        spatial_merge_size=_MERGE,
        temporal_patch_size=_TEMPORAL_PATCH,
        window_size=56,
        fullatt_block_indexes=[0],
    )


def _build(config: Any, cls: type[nn.Module], seed: int) -> nn.Module:
    """``cls(config)`` with weights drawn from ``seed``, leaving the global RNG untouched; eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.eval()


class _Rows:
    """Token rows of a batch: row ``i`` is long for even ``i`` and short for odd ``i``."""

    def __init__(self, seed: int, batch_size: int) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.gen = torch.Generator().manual_seed(seed)

    def text(self, row: int, long: int, short: int) -> list[int]:
        n = long if row % 2 == 0 else short
        return torch.randint(1, _TEXT_MAX, (n,), generator=self.gen).tolist()

    @staticmethod
    def left_pad(rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` of ``rows``, left-padded to one length."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), TINY_TOKENS["pad"], dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        return {"input_ids": ids, "attention_mask": mask}


def _image_span(placeholders: int) -> list[int]:
    t = TINY_TOKENS
    return [t["vision_start"]] + [t["image"]] * placeholders + [t["vision_end"]]


def _audio_frames(row: int) -> int:
    return _AUDIO_FRAMES if row % 2 == 0 else _AUDIO_FRAMES - 8


def _audio_tokens(frames: int) -> int:
    """Placeholder tokens of a clip of ``frames`` mel frames (conv stride 2, then avg-pool 2)."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def _audio_span(frames: int, tokens: Callable[[int], int] = _audio_tokens) -> list[int]:
    t = TINY_TOKENS
    return [t["audio_start"]] + [t["audio"]] * tokens(frames) + [t["audio_end"]]


def _audio_encoder(**extra: Any) -> dict[str, Any]:
    """A Whisper-style audio encoder of 1 layer of width 32 (2 heads) on 16 mel bins, projecting to the decoder width."""
    return dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=_MEL_BINS, output_dim=HIDDEN, **extra)


def _omni_batch(seed: int, batch_size: int, audio_tokens: Callable[[int], int] = _audio_tokens) -> dict[str, torch.Tensor]:
    """Per row text, one image (4 tokens), text, one audio clip (of ``_audio_frames(row)`` frames), text."""
    rows = _Rows(seed, batch_size)
    frames = [_audio_frames(i) for i in range(batch_size)]
    image = _image_span(_IMAGE_TOKENS)
    audio = [_audio_span(n, audio_tokens) for n in frames]
    batch = rows.left_pad([rows.text(i, 3, 2) + image + rows.text(i, 2, 2) + audio[i] + rows.text(i, 3, 2) for i in range(batch_size)])
    batch.update(_qwen_image_inputs(rows.gen, batch_size))
    batch.update(_audio_inputs(rows.gen, frames))
    return batch


def _audio_inputs(gen: torch.Generator, frames: Sequence[int]) -> dict[str, torch.Tensor]:
    """``input_features`` ``[clips, mel, 40]`` (zero after each clip) and ``feature_attention_mask`` ``[clips, 40]``."""
    feats = torch.randn(len(frames), _MEL_BINS, _AUDIO_FRAMES, generator=gen)
    fmask = torch.zeros(len(frames), _AUDIO_FRAMES, dtype=torch.long)
    for i, n in enumerate(frames):
        fmask[i, :n] = 1
        feats[i, :, n:] = 0
    return {"input_features": feats, "feature_attention_mask": fmask}


def _qwen_image_inputs(gen: torch.Generator, images: int) -> dict[str, torch.Tensor]:
    """Flattened patches ``[images * 16, 3 * 2 * 14 * 14]`` and ``image_grid_thw`` ``[images, 3]``."""
    patches = _GRID[0] * _GRID[1] * _GRID[2]
    return {
        "pixel_values": torch.randn(images * patches, 3 * _TEMPORAL_PATCH * _PATCH * _PATCH, generator=gen),
        "image_grid_thw": torch.tensor([_GRID] * images),
    }


def _mm_token_types(ids: torch.Tensor) -> torch.Tensor:
    """The Qwen-VL processors' ``mm_token_type_ids``: 0 text, 1 image, 2 video, 3 audio."""
    types = torch.zeros_like(ids)
    types[ids == TINY_TOKENS["image"]] = 1
    types[ids == TINY_TOKENS["video"]] = 2
    types[ids == TINY_TOKENS["audio"]] = 3
    return types


def tiny_llama(seed: int = 0, batch_size: int = 2, sliding_window: int | None = None) -> TinyModel:
    """``LlamaForCausalLM``; text-only rows of 12 and 9 tokens. With a ``sliding_window``, ``MistralForCausalLM``
    (the same family) attending over windows of that many tokens."""
    if sliding_window is None:
        model = _build(LlamaConfig(**_text_decoder()), LlamaForCausalLM, seed)
    else:
        model = _build(MistralConfig(**_text_decoder(sliding_window=sliding_window)), MistralForCausalLM, seed)
    rows = _Rows(seed, batch_size)
    batch = rows.left_pad([rows.text(i, 12, 9) for i in range(batch_size)])
    return TinyModel("llama", model, batch)


def tiny_llava(seed: int = 0, batch_size: int = 2, sliding_window: int | None = None) -> TinyModel:
    """``LlavaForConditionalGeneration`` (CLIP tower, Llama decoder); one 28x28 image (4 tokens) per row. With a
    ``sliding_window``, the decoder is Mistral's, attending over windows of that many tokens."""
    image_size, patch = 28, 14
    image_tokens = (image_size // patch) ** 2  # the CLS token is dropped ("default" feature strategy)
    if sliding_window is None:
        text = dict(model_type="llama", **_text_decoder())
    else:
        text = dict(model_type="mistral", **_text_decoder(sliding_window=sliding_window))
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
            projection_dim=32,
        ),
        text_config=text,
        image_token_index=TINY_TOKENS["image"],
        image_seq_length=image_tokens,
    )
    model = _build(config, LlavaForConditionalGeneration, seed)
    rows = _Rows(seed, batch_size)
    image = [TINY_TOKENS["image"]] * image_tokens
    batch = rows.left_pad([rows.text(i, 3, 2) + image + rows.text(i, 5, 3) for i in range(batch_size)])
    batch["pixel_values"] = torch.randn(batch_size, 3, image_size, image_size, generator=rows.gen)
    return TinyModel("llava", model, batch, (Modality.TEXT, Modality.VISION))


def _qwen_vl(
    family: str,
    config_cls: type,
    model_cls: type[nn.Module],
    vision: dict,
    seed: int,
    batch_size: int,
    text: dict | None = None,
    video: bool = False,
) -> TinyModel:
    t = TINY_TOKENS
    config = config_cls(
        text_config=text or _text_decoder(rope_parameters=dict(_MROPE)),
        vision_config=vision,
        image_token_id=t["image"],
        video_token_id=t["video"],
        vision_start_token_id=t["vision_start"],
        vision_end_token_id=t["vision_end"],
    )
    model = _build(config, model_cls, seed)
    rows = _Rows(seed, batch_size)
    image = _image_span(_IMAGE_TOKENS)
    tokens = [rows.text(i, 3, 2) + image + rows.text(i, 4, 2) for i in range(batch_size)]
    if video:  # then a one-frame clip (4 merged tokens) and text
        clip = [t["vision_start"]] + [t["video"]] * _IMAGE_TOKENS + [t["vision_end"]]
        tokens = [row + clip + rows.text(i, 2, 1) for i, row in enumerate(tokens)]
    batch = rows.left_pad(tokens)
    batch.update(_qwen_image_inputs(rows.gen, batch_size))
    if video:
        clips = _qwen_image_inputs(rows.gen, batch_size)
        batch.update(pixel_values_videos=clips["pixel_values"], video_grid_thw=clips["image_grid_thw"])
    batch["mm_token_type_ids"] = _mm_token_types(batch["input_ids"])
    return TinyModel(family, model, batch, (Modality.TEXT, Modality.VISION))


def tiny_qwen2_vl(seed: int = 0, batch_size: int = 2) -> TinyModel:
    """``Qwen2VLForConditionalGeneration``; one 1x4x4-patch image (4 merged tokens) per row."""
    vision = dict(
        depth=1,
        embed_dim=32,
        hidden_size=HIDDEN,
        mlp_ratio=2,
        num_heads=2,
        patch_size=_PATCH,
        spatial_merge_size=_MERGE,
        temporal_patch_size=_TEMPORAL_PATCH,
    )
    return _qwen_vl("qwen2-vl", Qwen2VLConfig, Qwen2VLForConditionalGeneration, vision, seed, batch_size)


def tiny_qwen25_vl(seed: int = 0, batch_size: int = 2) -> TinyModel:
    """``Qwen2_5_VLForConditionalGeneration``; one 1x4x4-patch image (4 merged tokens) per row."""
    return _qwen_vl(
        "qwen2.5-vl", Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, _qwen_vision_tower(), seed, batch_size
    )


def tiny_qwen3(seed: int = 0, batch_size: int = 2) -> TinyModel:
    """``Qwen3ForCausalLM``; text-only rows of 12 and 9 tokens."""
    model = _build(Qwen3Config(**_text_decoder(head_dim=16)), Qwen3ForCausalLM, seed)
    rows = _Rows(seed, batch_size)
    batch = rows.left_pad([rows.text(i, 12, 9) for i in range(batch_size)])
    return TinyModel("qwen3", model, batch)


def _moe(experts: int, top_k: int) -> dict[str, Any]:
    """A sparse MoE decoder: layer 0 keeps a dense MLP, layer 1 routes each token to ``top_k`` of ``experts``."""
    return dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=64, mlp_only_layers=[0], norm_topk_prob=True)


def tiny_qwen3_moe(seed: int = 0, batch_size: int = 2) -> TinyModel:
    """``Qwen3MoeForCausalLM`` (layer 1 sparse, 4 experts, top 2); text-only rows of 12 and 9 tokens."""
    model = _build(Qwen3MoeConfig(**_text_decoder(head_dim=16, **_moe(4, 2))), Qwen3MoeForCausalLM, seed)
    rows = _Rows(seed, batch_size)
    batch = rows.left_pad([rows.text(i, 12, 9) for i in range(batch_size)])
    return TinyModel("qwen3-moe", model, batch)


def tiny_qwen3_vl(seed: int = 0, batch_size: int = 2, video: bool = False) -> TinyModel:
    """``Qwen3VLForConditionalGeneration``; one 1x4x4-patch image (4 merged tokens) per row, and with ``video``
    a one-frame clip after it. Its 2-block tower's DeepStack features of both blocks are added after decoder
    layers 0 and 1."""
    return _qwen3_vl("qwen3-vl", Qwen3VLConfig, Qwen3VLForConditionalGeneration, seed, batch_size, video)


def tiny_qwen3_vl_moe(seed: int = 0, batch_size: int = 2, experts: int = 4, top_k: int = 2) -> TinyModel:
    """``Qwen3VLMoeForConditionalGeneration``: :func:`tiny_qwen3_vl` with a sparse layer 1 (``top_k`` of ``experts``;
    with many experts some see no tokens of a modality, or none at all)."""
    return _qwen3_vl("qwen3-vl-moe", Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, seed, batch_size, moe=_moe(experts, top_k))


def tiny_qwen3_omni_moe_thinker(seed: int = 0, batch_size: int = 2) -> TinyModel:
    """``Qwen3OmniMoeThinkerForConditionalGeneration`` (layer 1 sparse, 4 experts, top 2); per row one image
    (4 tokens, DeepStack features after layers 0 and 1), then one audio clip (5 or 4 tokens)."""
    t = TINY_TOKENS
    config = Qwen3OmniMoeThinkerConfig(
        text_config=_text_decoder(head_dim=16, rope_parameters=dict(_MROPE_INTERLEAVED), **_moe(4, 2)),
        vision_config=_qwen3_vision_tower(),
        audio_config=_audio_encoder(downsample_hidden_size=8),
        image_token_id=t["image"],
        video_token_id=t["video"],
        audio_token_id=t["audio"],
        audio_start_token_id=t["audio_start"],
    )
    config.vision_start_token_id = t["vision_start"]  # read by its position code, not declared by the config class
    model = _build(config, Qwen3OmniMoeThinkerForConditionalGeneration, seed)
    batch = _omni_batch(seed, batch_size, _qwen3_audio_tokens)
    return TinyModel("qwen3-omni-moe-thinker", model, batch, (Modality.TEXT, Modality.VISION, Modality.AUDIO))


def _qwen3_audio_tokens(frames: int) -> int:
    """Placeholder tokens of a clip shorter than one 100-frame window: three stride-2 convolutions."""
    for _ in range(3):
        frames = (frames - 1) // 2 + 1
    return frames


def _qwen3_vision_tower() -> dict[str, Any]:
    """Qwen3-VL's tower: 2 blocks of width 32, a learned 4x4 position grid, DeepStack features of both blocks."""
    return dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=HIDDEN,
        patch_size=_PATCH,
        spatial_merge_size=_MERGE,
        temporal_patch_size=_TEMPORAL_PATCH,
        num_position_embeddings=_GRID[1] * _GRID[2],  # a 4x4 learned grid, interpolated to each image's
        deepstack_visual_indexes=[0, 1],
    )


def _qwen3_5_decoder(**extra: Any) -> dict[str, Any]:
    """Qwen3.5's hybrid decoder: layer 0 Gated DeltaNet linear attention (2 key / 4 value heads of 16, a 4-tap
    convolution), layer 1 full attention with an output gate; rotary on half of each head, 3-row M-RoPE interleaved."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True, "partial_rotary_factor": 0.5}
    return _text_decoder(
        head_dim=16,
        rope_parameters=rope,
        layer_types=["linear_attention", "full_attention"],
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        **extra,
    )


def tiny_qwen3_5(seed: int = 0, batch_size: int = 2, video: bool = False) -> TinyModel:
    """``Qwen3_5ForConditionalGeneration``: a Qwen3-VL-style tower (no DeepStack) and the hybrid decoder of
    :func:`_qwen3_5_decoder`; one 1x4x4-patch image (4 merged tokens) per row."""
    vision = {k: v for k, v in _qwen3_vision_tower().items() if k != "deepstack_visual_indexes"}
    return _qwen_vl("qwen3.5", Qwen3_5Config, Qwen3_5ForConditionalGeneration, vision, seed, batch_size, _qwen3_5_decoder(), video)


def tiny_qwen3_5_moe(seed: int = 0, batch_size: int = 2) -> TinyModel:
    """``Qwen3_5MoeForConditionalGeneration``: :func:`tiny_qwen3_5` whose layers route each token to 2 of 4 experts
    beside a gated shared expert."""
    vision = {k: v for k, v in _qwen3_vision_tower().items() if k != "deepstack_visual_indexes"}
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    return _qwen_vl("qwen3.5-moe", Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration, vision, seed, batch_size, _qwen3_5_decoder(**moe))


def _qwen3_vl(
    family: str, config_cls: type, model_cls: type[nn.Module], seed: int, batch_size: int, video: bool = False, moe: dict[str, Any] | None = None
) -> TinyModel:
    vision = _qwen3_vision_tower()
    text = _text_decoder(head_dim=16, rope_parameters=dict(_MROPE_INTERLEAVED), **(moe or {}))
    return _qwen_vl(family, config_cls, model_cls, vision, seed, batch_size, text, video)


def tiny_qwen2_audio(seed: int = 0, batch_size: int = 2) -> TinyModel:
    """``Qwen2AudioForConditionalGeneration``; one audio clip per row (10 or 8 tokens)."""
    t = TINY_TOKENS
    config = Qwen2AudioConfig(
        audio_config=dict(
            model_type="qwen2_audio_encoder",
            d_model=32,
            encoder_layers=1,
            encoder_attention_heads=2,
            encoder_ffn_dim=64,
            num_mel_bins=_MEL_BINS,
            max_source_positions=_AUDIO_FRAMES // 2,  # the encoder takes exactly 2 * max_source_positions frames
        ),
        text_config=dict(model_type="qwen2", **_text_decoder()),
        audio_token_index=t["audio"],
    )
    model = _build(config, Qwen2AudioForConditionalGeneration, seed)
    rows = _Rows(seed, batch_size)
    frames = [_audio_frames(i) for i in range(batch_size)]
    batch = rows.left_pad([rows.text(i, 3, 2) + _audio_span(frames[i]) + rows.text(i, 4, 3) for i in range(batch_size)])
    batch.update(_audio_inputs(rows.gen, frames))
    return TinyModel("qwen2-audio", model, batch, (Modality.TEXT, Modality.AUDIO))


def tiny_qwen25_omni_thinker(seed: int = 0, batch_size: int = 2) -> TinyModel:
    """``Qwen2_5OmniThinkerForConditionalGeneration``; per row one image (4 tokens), then one audio clip (10 or 8)."""
    t = TINY_TOKENS
    config = Qwen2_5OmniThinkerConfig(
        text_config=_text_decoder(rope_parameters=dict(_MROPE)),
        vision_config=_qwen_vision_tower(),
        audio_config=_audio_encoder(max_source_positions=_AUDIO_FRAMES // 2, n_window=_AUDIO_FRAMES // 4),  # chunks of 2 * n_window frames
        **thinker_token_fields(t),
    )
    model = _build(config, Qwen2_5OmniThinkerForConditionalGeneration, seed)
    return TinyModel("qwen2.5-omni-thinker", model, _omni_batch(seed, batch_size), (Modality.TEXT, Modality.VISION, Modality.AUDIO))


def _vision_tower(**extra: Any) -> dict[str, Any]:
    """A ViT of 1 block of width 32 (2 heads) on 14-pixel patches."""
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, **extra)


def _one_image_per_row(family: str, model: nn.Module, seed: int, batch_size: int, span: list[int], pixels: torch.Tensor, **extra: torch.Tensor) -> TinyModel:
    """Rows of text around one image's token ``span``, with the processor's image tensors ``pixels`` and ``extra``."""
    rows = _Rows(seed, batch_size)
    batch = rows.left_pad([rows.text(i, 3, 2) + span + rows.text(i, 5, 3) for i in range(batch_size)])
    batch["pixel_values"] = pixels
    batch.update(extra)
    return TinyModel(family, model, batch, (Modality.TEXT, Modality.VISION))


def tiny_mistral3(seed: int = 0, batch_size: int = 2) -> TinyModel:
    """``Mistral3ForConditionalGeneration`` (Pixtral tower, Mistral decoder); one 56x56 image per row: 4x4 patches
    merged 2x2 into 4 image tokens."""
    size, patch, merge = 56, 14, 2
    config = Mistral3Config(
        vision_config=dict(model_type="pixtral", head_dim=16, image_size=size, patch_size=patch, **_vision_tower()),
        text_config=dict(model_type="mistral", **_text_decoder(head_dim=16)),
        image_token_index=TINY_TOKENS["image"],
        spatial_merge_size=merge,
    )
    model = _build(config, Mistral3ForConditionalGeneration, seed)
    pixels = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    span = [TINY_TOKENS["image"]] * (size // patch // merge) ** 2 + [TINY_TOKENS["vision_end"]]  # [IMG_END]
    return _one_image_per_row("mistral3", model, seed, batch_size, span, pixels, image_sizes=torch.tensor([[size, size]] * batch_size))


def tiny_idefics3(seed: int = 0, batch_size: int = 2) -> TinyModel:
    """``Idefics3ForConditionalGeneration`` (SigLIP tower, pixel shuffle, Llama decoder); one 56x56 image per row:
    16 patches shuffled (scale 2) into 4 image tokens between two markers."""
    size, patch, scale = 56, 14, 2
    config = Idefics3Config(
        vision_config=_vision_tower(image_size=size, patch_size=patch),
        text_config=dict(model_type="llama", **_text_decoder()),
        image_token_id=TINY_TOKENS["image"],
        scale_factor=scale,
    )
    model = _build(config, Idefics3ForConditionalGeneration, seed)
    pixels = torch.randn(batch_size, 1, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return _one_image_per_row("idefics3", model, seed, batch_size, _image_span((size // patch) ** 2 // scale**2), pixels)


def tiny_internvl(seed: int = 0, batch_size: int = 2) -> TinyModel:
    """``InternVLForConditionalGeneration`` (InternViT tower, pixel shuffle, Qwen2 decoder); one 56x56 tile per
    row: 16 patches downsampled (ratio 0.5) into 4 image tokens between two markers."""
    size, patch = 56, 14
    config = InternVLConfig(
        vision_config=_vision_tower(image_size=[size, size], patch_size=[patch, patch]),
        text_config=dict(model_type="qwen2", **_text_decoder()),
        image_token_id=TINY_TOKENS["image"],
        downsample_ratio=0.5,
    )
    model = _build(config, InternVLForConditionalGeneration, seed)
    pixels = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return _one_image_per_row("internvl", model, seed, batch_size, _image_span((size // patch) ** 2 // 4), pixels)


def tiny_llava_onevision(seed: int = 0, batch_size: int = 2) -> TinyModel:
    """``LlavaOnevisionForConditionalGeneration`` (SigLIP tower, Qwen2 decoder); per row one 28x28 image, any-res
    with a 1x1 grid: a base tile (2x2 tokens) and a grid tile (2x2 tokens and 2 row newlines), 10 image tokens;
    then a video of 2 frames, each pooled from 2x2 to 1 token, and a newline: 3 video tokens."""
    size, patch, frames = 28, 14, 2
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=size, patch_size=patch, **_vision_tower()),
        text_config=dict(model_type="qwen2", **_text_decoder()),
        image_token_index=TINY_TOKENS["image"],
        video_token_index=TINY_TOKENS["video"],
        image_grid_pinpoints=[[size, size]],
        vision_feature_layer=-1,
    )
    model = _build(config, LlavaOnevisionForConditionalGeneration, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randn(batch_size, 2, 3, size, size, generator=gen)
    videos = torch.randn(batch_size, frames, 3, size, size, generator=gen)
    image = [TINY_TOKENS["image"]] * (2 * (size // patch) ** 2 + size // patch)
    video = [TINY_TOKENS["video"]] * (frames + 1)
    rows = _Rows(seed, batch_size)
    batch = rows.left_pad([rows.text(i, 3, 2) + image + rows.text(i, 4, 2) + video + rows.text(i, 3, 1) for i in range(batch_size)])
    batch.update(
        pixel_values=pixels,
        pixel_values_videos=videos,
        image_sizes=torch.tensor([[size, size]] * batch_size),
        batch_num_images=torch.ones(batch_size, dtype=torch.long),
    )
    return TinyModel("llava-onevision", model, batch, (Modality.TEXT, Modality.VISION))


def tiny_gemma3(seed: int = 0, batch_size: int = 2) -> TinyModel:
    """``Gemma3ForConditionalGeneration`` (SigLIP tower, pooling projector, Gemma 3 decoder of a sliding layer with a
    window of 4 and a full one); one 56x56 image per row: 4x4 patches pooled to 4 image tokens between two markers,
    attending to each other both ways."""
    size, patch, tokens = 56, 14, 4
    text = dict(model_type="gemma3_text", **_text_decoder(head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"]))
    config = Gemma3Config(
        text_config=text,
        vision_config=dict(model_type="siglip_vision_model", image_size=size, patch_size=patch, **_vision_tower()),
        mm_tokens_per_image=tokens,
        image_token_index=TINY_TOKENS["image"],
        boi_token_index=TINY_TOKENS["vision_start"],
        eoi_token_index=TINY_TOKENS["vision_end"],
    )
    model = _build(config, Gemma3ForConditionalGeneration, seed)
    pixels = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    tiny = _one_image_per_row("gemma3", model, seed, batch_size, _image_span(tokens), pixels)
    tiny.batch["token_type_ids"] = (tiny.batch["input_ids"] == TINY_TOKENS["image"]).long()  # as Gemma 3's processor marks them
    return tiny


def tiny_gemma3_text(seed: int = 0, batch_size: int = 2) -> TinyModel:
    """``Gemma3ForCausalLM``; text-only rows of 12 and 9 tokens through a sliding layer (window 4) and a full one."""
    config = Gemma3TextConfig(**_text_decoder(head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"]))
    model = _build(config, Gemma3ForCausalLM, seed)
    rows = _Rows(seed, batch_size)
    return TinyModel("gemma3-text", model, rows.left_pad([rows.text(i, 12, 9) for i in range(batch_size)]))


def _gemma4_decoder(layer_types: list[str], **extra: Any) -> dict[str, Any]:
    """A Gemma 4 decoder with per-layer inputs (8 wide a layer; Gemma 4 E2B has them)."""
    return _text_decoder(head_dim=16, layer_types=layer_types, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB, **extra)


def tiny_gemma4(seed: int = 0, batch_size: int = 2) -> TinyModel:
    """``Gemma4ForConditionalGeneration`` (vision tower, audio encoder, Gemma 4 decoder of a sliding layer with a window of
    4 and a full one whose values are its keys, with their own head size of 32 and one KV head; per-layer inputs; image
    tokens attending to each other both ways in the sliding layer). Per row text, one image (a 4x4 grid of 14-pixel
    patches pooled 2x2 into 4 tokens), text, one audio clip (40 or 32 mel frames, 4 to a token), text."""
    t = TINY_TOKENS
    text = dict(
        model_type="gemma4_text",
        **_gemma4_decoder(["sliding_attention", "full_attention"], sliding_window=4, attention_k_eq_v=True, use_bidirectional_attention="vision"),
        global_head_dim=32,
        num_global_key_value_heads=1,
    )
    config = Gemma4Config(
        text_config=text,
        vision_config=dict(model_type="gemma4_vision", head_dim=16, num_key_value_heads=2, patch_size=_PATCH, pooling_kernel_size=2, position_embedding_size=8, **_vision_tower()),
        audio_config=dict(model_type="gemma4_audio", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[_MEL_BINS, 4], output_proj_dims=48, conv_kernel_size=3, attention_chunk_size=4, attention_context_left=5),
        image_token_id=t["image"], video_token_id=t["video"], audio_token_id=t["audio"],
        boi_token_id=t["vision_start"], eoi_token_id=t["vision_end"], boa_token_id=t["audio_start"], eoa_token_index=t["audio_end"],
    )
    model = _build(config, Gemma4ForConditionalGeneration, seed)
    rows = _Rows(seed, batch_size)
    frames = [_audio_frames(i) for i in range(batch_size)]
    audio = [_audio_span(n, lambda frames: frames // 4) for n in frames]
    batch = rows.left_pad([rows.text(i, 3, 2) + _image_span(_IMAGE_TOKENS) + rows.text(i, 2, 2) + audio[i] + rows.text(i, 3, 2) for i in range(batch_size)])
    grid = torch.cartesian_prod(torch.arange(4), torch.arange(4)).flip(-1)  # (x, y) of a 4x4 patch grid, row by row
    batch["pixel_values"] = torch.rand(batch_size, len(grid), 3 * _PATCH * _PATCH, generator=rows.gen)
    batch["image_position_ids"] = grid.expand(batch_size, *grid.shape).clone()
    batch["input_features"] = torch.randn(batch_size, _AUDIO_FRAMES, _MEL_BINS, generator=rows.gen)
    batch["input_features_mask"] = torch.arange(_AUDIO_FRAMES) < torch.tensor(frames)[:, None]
    batch["mm_token_type_ids"] = _mm_token_types(batch["input_ids"])
    return TinyModel("gemma4", model, batch, (Modality.TEXT, Modality.VISION, Modality.AUDIO))


def tiny_gemma4_text(seed: int = 0, batch_size: int = 2) -> TinyModel:
    """``Gemma4ForCausalLM`` with the 26B-A4B model's layer: a dense MLP beside 4 experts (top 2) with Gemma 4's router;
    per-layer inputs; layer 1 reuses layer 0's keys and values (shared KV). Text-only rows of 12 and 9 tokens."""
    config = Gemma4TextConfig(
        **_gemma4_decoder(["full_attention", "full_attention"], num_kv_shared_layers=1),
        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
    )
    model = _build(config, Gemma4ForCausalLM, seed)
    rows = _Rows(seed, batch_size)
    return TinyModel("gemma4-text", model, rows.left_pad([rows.text(i, 12, 9) for i in range(batch_size)]))


def tiny_voxtral(seed: int = 0, batch_size: int = 2) -> TinyModel:
    """``VoxtralForConditionalGeneration`` (Whisper-style encoder, Llama decoder); per row one audio chunk of 32 mel
    frames: 16 encoder positions, four to a token, 4 audio tokens between two markers."""
    t = TINY_TOKENS
    width, positions = 32, 16
    config = VoxtralConfig(
        audio_config=dict(
            model_type="voxtral_encoder",
            hidden_size=width,
            intermediate_size=4 * width,  # the projector reads four encoder positions per token
            num_hidden_layers=1,
            num_attention_heads=2,
            num_mel_bins=_MEL_BINS,
            max_source_positions=positions,  # the encoder takes exactly 2 * max_source_positions frames
        ),
        text_config=dict(model_type="llama", **_text_decoder()),
        audio_token_id=t["audio"],
    )
    model = _build(config, VoxtralForConditionalGeneration, seed)
    rows = _Rows(seed, batch_size)
    span = [t["audio_start"]] + [t["audio"]] * (positions // 4) + [t["audio_end"]]
    batch = rows.left_pad([rows.text(i, 3, 2) + span + rows.text(i, 4, 3) for i in range(batch_size)])
    batch["input_features"] = torch.randn(batch_size, _MEL_BINS, 2 * positions, generator=rows.gen)
    return TinyModel("voxtral", model, batch, (Modality.TEXT, Modality.AUDIO))


_BUILDERS: dict[str, Callable[[int, int], TinyModel]] = {
    "llama": tiny_llama,
    "llava": tiny_llava,
    "qwen2-vl": tiny_qwen2_vl,
    "qwen2.5-vl": tiny_qwen25_vl,
    "qwen2-audio": tiny_qwen2_audio,
    "qwen2.5-omni-thinker": tiny_qwen25_omni_thinker,
    "qwen3": tiny_qwen3,
    "qwen3-vl": tiny_qwen3_vl,
    "qwen3-moe": tiny_qwen3_moe,
    "qwen3-vl-moe": tiny_qwen3_vl_moe,
    "qwen3-omni-moe-thinker": tiny_qwen3_omni_moe_thinker,
    "mistral3": tiny_mistral3,
    "idefics3": tiny_idefics3,
    "internvl": tiny_internvl,
    "llava-onevision": tiny_llava_onevision,
    "voxtral": tiny_voxtral,
    "gemma3": tiny_gemma3,
    "gemma3-text": tiny_gemma3_text,
    "gemma4": tiny_gemma4,
    "gemma4-text": tiny_gemma4_text,
    "qwen3.5": tiny_qwen3_5,
    "qwen3.5-moe": tiny_qwen3_5_moe,
}

#: the families :func:`tiny_model` can build, in a fixed order
TINY_FAMILIES: tuple[str, ...] = tuple(_BUILDERS)


def tiny_model(family: str, seed: int = 0, batch_size: int = 2) -> TinyModel:
    """A tiny model of ``family`` (one of :data:`TINY_FAMILIES`) and an example batch of ``batch_size`` rows.

    Weights and batch are drawn from ``seed`` (the global RNG is left alone). Rows alternate
    long/short, so any ``batch_size >= 2`` has left padding.
    """
    try:
        builder = _BUILDERS[family]
    except KeyError:
        raise InputError(f"unknown tiny family {family!r}; expected one of: {', '.join(TINY_FAMILIES)}") from None
    return builder(seed, batch_size)
