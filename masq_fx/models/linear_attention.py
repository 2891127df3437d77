"""Gated DeltaNet linear attention (Qwen3.5's hybrid layers) in a form torch.export captures with a dynamic length.

HF's reference forward cannot be exported with a dynamic sequence length: it splits the sequence
into chunks of 64 in a Python loop (whose trip count export freezes), branches on ``seq_len == 1``
for decode, and solves its chunk systems by a 64-step loop under export. Here every chunk's parallel
form (a unit lower-triangular solve over its 64 tokens) is computed at once and the recurrent state is
carried across chunks by the ``scan`` operator, which export keeps as one node of dynamic length, so one graph
serves a prompt of any length and a one-token decode step alike, at the chunked kernel's linear cost.

:func:`exportable_linear_attention` swaps this forward in on the model's linear-attention modules for
the duration of a capture (the modules' own linears are still called, so they keep their names and
are quantized like any other); :class:`RecurrentLayer` is the cache layer that holds the convolution
and recurrent state as graph buffers for :func:`~masq_fx.generation.capture_cached`.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._higher_order_ops.scan import scan_op
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, LinearAttentionLayer


class RecurrentLayer(LinearAttentionLayer):
    """A linear-attention layer's cache allocated up front: the last ``kernel - 1`` inputs of its causal
    convolution (``conv``, ``[batch, channels, kernel - 1]``), its recurrent state (``state``, ``[batch,
    value heads, key dim, value dim]``, float32) and the cache slot of the call's first token (``start``,
    ``[1]``; a call at slot 0 starts a new sequence, so both states are read as zeros)."""

    def __init__(self, conv: Tensor, state: Tensor) -> None:
        super().__init__()
        self.conv, self.state = conv, state
        self.start = torch.zeros(1, dtype=torch.long, device=conv.device)
        self.conv_states[0], self.recurrent_states[0] = conv, state
        self.is_conv_states_initialized[0] = self.is_recurrent_states_initialized[0] = True


#: tokens per chunk: within one, the rule is solved in parallel (a unit lower-triangular system); across chunks, a scan
CHUNK = 64


def gated_delta_rule(query: Tensor, key: Tensor, value: Tensor, decay: Tensor, beta: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """Outputs ``[batch, tokens, value heads, value dim]`` and the state after the last token, for the recurrence
    ``S ← exp(g_t)·S;  S ← S + k_t·(β_t·(v_t − Sᵀk_t))ᵀ;  o_t = Sᵀq_t`` from ``state`` (float32), queries and
    keys L2-normalised and queries scaled by ``dim^-½`` as the model does.

    ``query``/``key`` are ``[batch, tokens, key heads, key dim]`` (each key head serves consecutive value heads),
    ``value`` ``[batch, tokens, value heads, value dim]``, ``decay`` (log space, ≤ 0) and ``beta``
    ``[batch, tokens, value heads]``. The tokens are cut into chunks of :data:`CHUNK` (padded with tokens that
    write nothing and do not decay the state); every chunk's parallel form is computed at once, and the state is
    carried from chunk to chunk by the ``scan`` operator, whose length torch.export keeps dynamic.
    """
    dtype, tokens = query.dtype, query.shape[1]
    repeat = value.shape[2] // key.shape[2]
    if repeat > 1:
        query, key = query.repeat_interleave(repeat, dim=2), key.repeat_interleave(repeat, dim=2)
    query, key, value, beta, decay = (x.transpose(1, 2).float() for x in (query, key, value, beta, decay))
    query = _l2norm(query) * query.shape[-1] ** -0.5
    key = _l2norm(key)
    # one more chunk than the tokens fill, all padding: never one chunk, so export cannot specialise on that case
    chunks = (tokens + CHUNK - 1) // CHUNK + 1
    pad = chunks * CHUNK - tokens
    query, key, value = (F.pad(x, (0, 0, 0, pad)).unflatten(2, (chunks, CHUNK)) for x in (query, key, value))  # [b, h, n, C, d]
    beta, decay = (F.pad(x, (0, pad)).unflatten(2, (chunks, CHUNK)) for x in (beta, decay))  # [b, h, n, C]
    cumulative = decay.cumsum(-1)
    causal = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=query.device).tril()
    pairwise = (cumulative[..., :, None] - cumulative[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    k_beta, v_beta = key * beta[..., None], value * beta[..., None]
    system = (k_beta @ key.transpose(-1, -2)) * pairwise  # strictly lower part: I + it is the transform's matrix
    new_values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    reads = torch.linalg.solve_triangular(system, k_beta * cumulative.exp()[..., None], upper=False, unitriangular=True)
    last = cumulative[..., -1:]
    steps = (  # chunk-major for the scan
        new_values,
        reads,
        query * cumulative.exp()[..., None],
        (query @ key.transpose(-1, -2)) * pairwise,
        key * (last - cumulative).exp()[..., None],
        last.exp()[..., None],
    )
    # the scan operator itself: ``torch.scan`` would trace its body with dynamo, whose cache then holds the shapes of
    # one capture for the next
    state, out = scan_op(_chunk_step, [state], [x.movedim(2, 0).contiguous() for x in steps], ())
    out = out.movedim(0, 2).flatten(2, 3)[:, :, :tokens]
    return out.transpose(1, 2).to(dtype), state


def _chunk_step(state: Tensor, new_values: Tensor, reads: Tensor, query: Tensor, attention: Tensor, written: Tensor, decay: Tensor) -> tuple[Tensor, Tensor]:
    """One chunk: the state after it, and its outputs from the state before it."""
    corrections = new_values - reads @ state
    out = query @ state + attention @ corrections
    return state * decay + written.transpose(-1, -2) @ corrections, out


def _l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(Σx² + eps)`` over the last dim, as the model's kernels normalise."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _forward(self: Any, hidden_states: Tensor, cache: Cache | None = None, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
    """The forward of HF's ``Qwen3_5GatedDeltaNet`` (bound to such a module) over :func:`gated_delta_rule`.

    ``attention_mask`` is the 2-D padding mask over the call's tokens, or with a cache over every cache
    slot; padded tokens are zeroed after the projections (the model zeroes them before: the same values,
    since the projections have no bias, and the projections keep reading the norm directly).
    """
    batch, tokens, _ = hidden_states.shape
    layer = cache.layers[self.layer_idx] if cache is not None else None
    if layer is not None and not isinstance(layer, RecurrentLayer):
        raise TypeError(f"linear-attention layer {self.layer_idx} needs a RecurrentLayer cache, got {type(layer).__name__}")
    projected = [self.in_proj_qkv(hidden_states), self.in_proj_z(hidden_states), self.in_proj_b(hidden_states), self.in_proj_a(hidden_states)]
    if attention_mask is not None:
        if layer is not None:  # the call's slots of the whole-cache mask
            slots = layer.start + torch.arange(tokens, device=attention_mask.device)
            attention_mask = attention_mask.index_select(1, slots)
        keep = attention_mask[..., None].to(hidden_states.dtype)
        projected = [x * keep for x in projected]
    mixed, gate, b, a = projected
    mixed = mixed.transpose(1, 2)
    kernel = self.conv1d.weight.shape[-1]
    if layer is None:
        past = mixed.new_zeros(batch, mixed.shape[1], kernel - 1)
        state = mixed.new_zeros(batch, self.num_v_heads, self.head_k_dim, self.head_v_dim, dtype=torch.float32)
    else:
        going_on = (layer.start > 0).to(mixed.dtype)
        past, state = layer.conv * going_on, layer.state * going_on.float()
    window = torch.cat([past, mixed], dim=-1)
    if layer is not None:
        layer.conv.copy_(window[..., -(kernel - 1):])
    weight = self.conv1d.weight
    mixed = ACT2FN[self.activation](F.conv1d(window.to(weight.dtype), weight, self.conv1d.bias, groups=mixed.shape[1])).to(mixed.dtype)
    query, key, value = torch.split(mixed.transpose(1, 2), [self.key_dim, self.key_dim, self.value_dim], dim=-1)
    query = query.reshape(batch, tokens, -1, self.head_k_dim)
    key = key.reshape(batch, tokens, -1, self.head_k_dim)
    value = value.reshape(batch, tokens, -1, self.head_v_dim)
    decay = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
    out, state = gated_delta_rule(query, key, value, decay, b.sigmoid(), state)
    if layer is not None:
        layer.state.copy_(state)
    out = self.norm(out.reshape(-1, self.head_v_dim), gate.reshape(-1, self.head_v_dim))
    return self.out_proj(out.reshape(batch, tokens, -1))


def recurrent_layer(module: Any, batch_size: int, dtype: torch.dtype, device: torch.device) -> RecurrentLayer:
    """A zeroed :class:`RecurrentLayer` for linear-attention ``module`` and ``batch_size`` rows."""
    channels, kernel = module.conv1d.weight.shape[0], module.conv1d.weight.shape[-1]
    conv = torch.zeros(batch_size, channels, kernel - 1, dtype=dtype, device=device)
    state = torch.zeros(batch_size, module.num_v_heads, module.head_k_dim, module.head_v_dim, dtype=torch.float32, device=device)
    return RecurrentLayer(conv, state)


@contextmanager
def exportable_linear_attention(modules: list[nn.Module]) -> Iterator[None]:
    """Run ``modules`` (Gated DeltaNet layers) with the exportable forward while the block runs."""
    for module in modules:
        module.forward = types.MethodType(_forward, module)
    try:
        yield
    finally:
        for module in modules:
            del module.forward
