"""Mixture-of-experts decoders: fused expert tensors become one exportable linear per expert projection.

transformers keeps a sparse MoE block's experts as two 3-D parameters (``gate_up_proj`` ``[experts, 2·inter,
hidden]``, ``down_proj`` ``[experts, hidden, inter]``) and runs them in a loop over the experts that a batch
hits, which torch.export cannot trace. :func:`unfuse_experts` swaps each such module for
:class:`RoutedExperts`: every expert is a :class:`Expert` of three ``nn.Linear`` (``experts.3.gate_proj``,
the layout of the published checkpoints) whose weights are views of the fused tensors, and the forward
gathers the tokens routed to each expert (``hidden[rows]``), runs its gated MLP on them and adds the
result, times the routing weight, back at their rows. The expert count is fixed, the token count per expert
is data-dependent (an unbacked size in the exported graph), so every expert linear sees exactly its own
tokens: observers, GPTQ and CMC statistics are per expert by construction, and the graph's transforms
treat expert projections as ordinary linears (:func:`~masq_fx.capture.dataflow.token_context` gives them
the modality ids of their rows). The router stays the model's own (float) linear.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from masq_fx.errors import InputError

#: the fused-experts options (transformers' ``use_experts_implementation`` flags) this layout covers
_SUPPORTED_FLAGS = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True, "has_post_expert_norm": False}


class Expert(nn.Module):
    """One expert: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, gate: Tensor, up: Tensor, down: Tensor, act_fn: Any) -> None:
        super().__init__()
        self.gate_proj = _linear(gate)
        self.up_proj = _linear(up)
        self.down_proj = _linear(down)
        self.act_fn = act_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class RoutedExperts(nn.ModuleList):
    """Drop-in for a fused experts module: ``forward(hidden [tokens, hidden], top_k_index, top_k_weights)``;
    expert ``e`` is the module ``e`` of this list."""

    def __init__(self, experts: list[Expert]) -> None:
        super().__init__(experts)
        self.num_experts = len(experts)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self):
            hit = top_k_index == index
            rows = hit.any(-1).nonzero().squeeze(-1)
            weight = (top_k_weights * hit).sum(-1)[rows]
            routed = expert(hidden_states[rows]) * weight.unsqueeze(-1)
            out = out.index_add(0, rows, routed.to(out.dtype))
        return out


def _linear(weight: Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` keeps its experts as fused 3-D ``gate_up_proj``/``down_proj`` parameters."""
    params = [module._parameters.get(name) for name in ("gate_up_proj", "down_proj")]
    return all(isinstance(param, Tensor) and param.dim() == 3 for param in params)


def routed_experts(module: nn.Module) -> RoutedExperts:
    """A :class:`RoutedExperts` whose linears view ``module``'s fused tensors; refuses a layout it does not cover."""
    flags = {name: getattr(module, name, default) for name, default in _SUPPORTED_FLAGS.items()}
    apply_gate = getattr(type(module), "_apply_gate", None)
    custom_gate = apply_gate is not None and getattr(apply_gate, "__name__", "") != "_default_apply_gate"
    if flags != _SUPPORTED_FLAGS or custom_gate:
        raise InputError(
            f"{type(module).__name__} stores its experts in a layout masq_fx does not unfuse yet ({flags}, custom gate: "
            f"{custom_gate}); supported: concatenated [gate; up] and down projections without biases, not transposed"
        )
    gate_up, down = cast(Tensor, module.gate_up_proj).detach(), cast(Tensor, module.down_proj).detach()
    inter = down.shape[2]
    if gate_up.shape[1] != 2 * inter or gate_up.shape[2] != down.shape[1]:
        raise InputError(f"{type(module).__name__}: gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} do not match")
    experts = [Expert(gate_up[e, :inter], gate_up[e, inter:], down[e], module.act_fn) for e in range(gate_up.shape[0])]
    return RoutedExperts(experts)


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module in ``model`` by its :class:`RoutedExperts` (in place); the number replaced."""
    found = [(name, module) for name, module in model.named_modules() if is_fused_experts(module)]
    for name, module in found:
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, routed_experts(module))
    return len(found)
