"""Generation on a captured graph with a static KV cache: prefill with mixed modalities, decode as text.

:func:`capture_cached` exports the language decoder and head once more, now with a
``transformers.StaticCache`` whose key/value tensors are buffers of the graph (updated in place,
so the graph compiles with ``fullgraph=True`` for prefill and for decode). Its placeholders are
those of :func:`masq_fx.capture.decoder.capture` plus ``cache_start`` (``[1]``, the cache slot of the first
input token); ``attention_mask`` spans the whole cache (``[batch, max_cache_len]``: the prompt's
padding mask, ones after it). The batch size and cache length are fixed at capture, the number of
input tokens is dynamic. Linear nodes carry the same module-name tags as the prefill capture.

:func:`transplant` replays a transformed prefill graph onto such a graph by module name
(:mod:`masq_fx.replay`): each tagged linear becomes the same (shared) QuantLinear or lowered module,
per-modality routers are re-inserted (sharing their tables) before the linears that read them, and
parameters the transforms replaced (norm weights with folded scales) are carried over.
:func:`generate` is the greedy loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import Tensor, fx, nn
from transformers import StaticCache
from transformers.cache_utils import DummyLayer, StaticLayer, get_layer_types_and_kwargs

from masq_fx.capture.decoder import (
    CapturedDecoder,
    annotate,
    drop_dead_code,
    drop_unused_attributes,
    dynamic_dim,
    materialize_norm_offsets,
    model_modalities,
    module_nodes,
)
from masq_fx.capture.positions import add_position_inputs, position_placeholders
from masq_fx.errors import InputError
from masq_fx.modality import Modality
from masq_fx.models import DecoderInputs, ModelAdapter, adapter_for
from masq_fx.models.linear_attention import RecurrentLayer
from masq_fx.replay import graph_edits, replay

CACHE_START = "cache_start"


#: attention layer types whose cache is a plain :class:`StaticLayer` over every slot (the mask tells them apart)
_CACHED_LAYER_TYPES = ("full_attention", "sliding_attention")
#: layers that keep no cache of their own (they reuse an earlier layer's keys and values: Gemma 4's shared KV layers)
_UNCACHED = "dummy"


def static_cache(config: Any, max_cache_len: int, family: str, recurrent: dict[int, RecurrentLayer] | None = None) -> StaticCache:
    """A ``StaticCache`` for ``config`` (a text config) whose every attention layer is a plain :class:`StaticLayer` of ``max_cache_len`` slots.

    HF gives sliding-window layers a ``StaticSlidingWindowLayer``: a ring of ``sliding_window`` slots
    whose update branch and mask sizes follow a Python int (``cumulative_length_int``). Export
    freezes the branch of its example (an empty cache), so the graph's decode steps attended as if at
    position 0, and a window shorter than the cache made export fail. Here every layer keeps all
    ``max_cache_len`` slots (a sliding layer costs as much memory as a full one) and the window lives
    in the mask alone: the model's sliding mask (key slot > query slot - window) over whole-cache
    slots is what HF computes. Layers that reuse another's keys and values keep none; linear-attention layers keep
    the fixed-size state given in ``recurrent`` (by layer index, :meth:`ModelAdapter.recurrent_layers`). Other
    layer types (chunked, indexed attention) are refused.
    """
    recurrent = recurrent or {}
    types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    unsupported = sorted({t for i, t in enumerate(types) if t not in (*_CACHED_LAYER_TYPES, _UNCACHED) and i not in recurrent})
    if unsupported:
        raise InputError(
            f"capture_cached supports {' and '.join(_CACHED_LAYER_TYPES)} layers, but this {family} model has "
            f"{', '.join(unsupported)} layers (their cache keeps Python-side state that torch.export freezes): "
            "score it with the cache-free graph (QuantizedModel.logits, capture) instead of KV-cache generation"
        )
    cache = StaticCache(max_cache_len=max_cache_len, config=config)
    cache.layers = [
        recurrent[i] if i in recurrent else DummyLayer() if t == _UNCACHED else StaticLayer(max_cache_len=max_cache_len) for i, t in enumerate(types)
    ]
    return cache


def _static_layers(cache: StaticCache) -> dict[int, StaticLayer]:
    """``cache``'s layers that keep a cache, by layer index: keys, values and a tensor ``cumulative_length`` allocated up front."""
    kept = {i: layer for i, layer in enumerate(cache.layers) if not isinstance(layer, (DummyLayer, RecurrentLayer))}
    assert all(type(layer) is StaticLayer for layer in kept.values())
    return cast(dict[int, StaticLayer], kept)


class _CachedExportable(nn.Module):
    """Decoder + head over a static cache registered as buffers (the exported module)."""

    def __init__(self, adapter: ModelAdapter, batch_size: int, max_cache_len: int, logits_to_keep: int) -> None:
        super().__init__()
        self.logits_to_keep = logits_to_keep
        self.adapter = adapter  # runs ``self.decoder`` (its language model), adding injected features
        self.decoder = adapter.language_model()
        self.lm_head = adapter.lm_head()
        parameter = next(self.decoder.parameters())
        self.cache_dtype, self.device = parameter.dtype, parameter.device
        self.recurrent = adapter.recurrent_layers(batch_size, self.cache_dtype, self.device)
        self.cache = static_cache(adapter.text_config(), max_cache_len, adapter.family, self.recurrent)
        self.cache.early_initialization(batch_size, *adapter.kv_shapes(), self.cache_dtype, self.device)
        for i, layer in _static_layers(self.cache).items():
            self.register_buffer(f"cache_keys_{i}", layer.keys, persistent=False)
            self.register_buffer(f"cache_values_{i}", layer.values, persistent=False)
            self.register_buffer(f"cache_length_{i}", layer.cumulative_length, persistent=False)
        for i, state in self.recurrent.items():
            self.register_buffer(f"cache_conv_{i}", state.conv, persistent=False)
            self.register_buffer(f"cache_state_{i}", state.state, persistent=False)
            self.register_buffer(f"cache_start_{i}", state.start, persistent=False)

    def forward(
        self,
        inputs_embeds: Tensor,
        position_ids: Tensor,
        modality_ids: Tensor,
        attention_mask: Tensor,
        cache_start: Tensor,
    ) -> Tensor:
        for layer in _static_layers(self.cache).values():
            layer.cumulative_length.copy_(cache_start[0])
        for state in self.recurrent.values():
            state.start.copy_(cache_start)
        hidden = self.adapter.run_decoder(inputs_embeds, position_ids, attention_mask, modality_ids, cache=self.cache, use_cache=True)
        if self.logits_to_keep:
            hidden = hidden[:, -self.logits_to_keep :]
        return self.lm_head(hidden)


@dataclass
class CachedDecoder:
    """An exported decoder graph with a static KV cache of ``batch_size`` rows and ``max_cache_len`` slots."""

    graph_module: fx.GraphModule
    adapter: ModelAdapter
    batch_size: int
    max_cache_len: int
    modalities: tuple[Modality, ...]
    capture_seconds: float = 0.0

    def __call__(self, inputs: DecoderInputs, cache_start: int) -> Tensor:
        """Logits of ``inputs`` (``attention_mask`` over the whole cache) written at ``cache_start``."""
        return self.graph_module(*inputs.args(), torch.tensor([cache_start], device=inputs.inputs_embeds.device))


def capture_cached(model: nn.Module, batch_size: int, max_cache_len: int, logits_to_keep: int = 1) -> CachedDecoder:
    """Export ``model``'s decoder and head with a static KV cache (tokens per call dynamic, 1 included).

    The head runs on the last ``logits_to_keep`` positions only (0: all), as HF ``generate`` does:
    greedy decoding needs the last position's logits, and the head over a long prompt is a large
    float GEMM.
    """
    if batch_size < 1 or max_cache_len < 2:
        raise ValueError(f"need batch_size >= 1 and max_cache_len >= 2, got {batch_size} and {max_cache_len}")
    if logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be >= 0 (0 keeps every position), got {logits_to_keep}")
    adapter = adapter_for(model)
    model.eval()
    wrapper = _CachedExportable(adapter, batch_size, max_cache_len, logits_to_keep)
    seq = dynamic_dim(max_cache_len)
    tokens = min(8, max_cache_len)
    device = wrapper.device  # the cache's and the model's: the graph runs there
    embeds = torch.randn(batch_size, tokens, adapter.embed_width(), dtype=wrapper.cache_dtype, device=device)
    positions = adapter.default_position_ids(batch_size, tokens, device)
    example = (
        embeds,
        positions,
        torch.zeros(batch_size, tokens, dtype=torch.long, device=device),
        torch.ones(batch_size, max_cache_len, dtype=torch.long, device=device),
        torch.tensor([0], device=device),
    )
    position_dims = {positions.dim() - 1: seq}
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(
            wrapper, example, dynamic_shapes=({1: seq}, position_dims, {1: seq}, None, None), strict=False
        )
    gm = program.module()
    drop_unused_attributes(gm)
    materialize_norm_offsets(gm)
    annotate(gm)
    return CachedDecoder(
        graph_module=gm,
        adapter=adapter,
        batch_size=batch_size,
        max_cache_len=max_cache_len,
        modalities=model_modalities(adapter),
        capture_seconds=time.perf_counter() - start,
    )


def transplant(transformed: CapturedDecoder | fx.GraphModule, cached: CachedDecoder) -> int:
    """Replay a transformed prefill graph's module edits onto ``cached`` (in place); returns the linears replaced.

    The modules are shared, not copied: both graphs then compute with the same quantized state.
    """
    source = transformed.graph_module if isinstance(transformed, CapturedDecoder) else transformed
    edits = graph_edits(source, cached.adapter)
    if not edits.linears and edits.sparsity is None:
        raise ValueError("the transformed graph has no module-level edits (QuantLinears, sparsifiers): nothing to transplant")
    gm = cached.graph_module
    installed = replay(gm, edits)
    positions = set(position_placeholders(source))
    add_position_inputs(gm, [installed[name] for name, node in module_nodes(source).items() if positions & set(node.args)])
    drop_dead_code(gm)
    gm.recompile()
    return len(installed)


def full_attention_mask(attention_mask: Tensor, max_cache_len: int) -> Tensor:
    """A prompt's padding mask ``[batch, tokens]`` widened to the whole cache (ones after the prompt)."""
    batch, tokens = attention_mask.shape
    full = torch.ones(batch, max_cache_len, dtype=attention_mask.dtype, device=attention_mask.device)
    full[:, :tokens] = attention_mask
    return full


@torch.no_grad()
def generate(
    decoder: CachedDecoder,
    prompt: DecoderInputs,
    max_new_tokens: int,
    stop_id: int | None = None,
    run: Callable[..., Tensor] | None = None,
) -> Tensor:
    """Greedy continuation ``[batch, <= max_new_tokens]`` of left-padded ``prompt`` through the KV cache.

    Prefill runs the whole prompt once; each decode step feeds one text token. ``run`` replaces the
    graph call (e.g. a :class:`~masq_fx.backends.CompiledGraph`) and takes the graph's five positional
    inputs. Stops early once every row has produced ``stop_id``.
    """
    batch, tokens = prompt.attention_mask.shape
    if batch != decoder.batch_size:
        raise ValueError(f"the cache holds {decoder.batch_size} rows but the prompt has {batch}: capture_cached with batch_size={batch}")
    if tokens + max_new_tokens > decoder.max_cache_len:
        raise ValueError(
            f"{tokens} prompt + {max_new_tokens} new tokens exceed the cache of {decoder.max_cache_len}: "
            "capture_cached with a larger max_cache_len or ask for fewer tokens"
        )
    run = run or decoder.graph_module
    mask = full_attention_mask(prompt.attention_mask, decoder.max_cache_len)
    step = replace(prompt, attention_mask=mask)
    position = prompt.position_ids[..., -1:]
    out: list[Tensor] = []
    device = prompt.inputs_embeds.device
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    start = 0
    for _ in range(max_new_tokens):
        token = run(*step.args(), torch.tensor([start], device=device))[:, -1].argmax(-1)
        out.append(token)
        if stop_id is not None:
            done |= token == stop_id
            if bool(done.all()):
                break
        start += step.inputs_embeds.shape[1]
        position = position + 1
        step = DecoderInputs(
            inputs_embeds=decoder.adapter.embed(token[:, None]).to(prompt.inputs_embeds.dtype),
            position_ids=position,
            modality_ids=torch.full((batch, 1), int(Modality.TEXT), device=device),
            attention_mask=mask,
        )
    return torch.stack(out, dim=1)
