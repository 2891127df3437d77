"""Dataflow queries over a captured decoder graph: which linears share an input, and what made it.

Smoothing (SmoothQuant, AWQ, MASQuant) moves a per-channel scale from a linear's input into its
weight; every linear reading that input must take the same scale, and its inverse is absorbed by
whatever produced the input. :func:`smoothing_groups` finds these sets from the graph alone. Each
tagged linear's input is traced back through ops that only move, reshape or recast data
(:data:`PASSTHROUGH`); linears with the same producer form one group, and the producer's op
pattern decides the group's kind:

* ``"norm"``: an ``aten.layer_norm`` / ``aten.rms_norm`` node, or a decomposed norm
  (``x * rsqrt(r)`` or ``x / sqrt(r)`` where ``r`` comes from a mean/var reduction), optionally
  times a parameter γ and plus a parameter β, which are reported so the scale can be folded in;
* ``"attention"``: ``scaled_dot_product_attention``, or a matmul downstream of a softmax;
* ``"activation"``: ``act(linear_a) * linear_b`` for an elementwise activation (a gated MLP);
* ``"gated"``: ``x * act(g)`` where ``g`` comes from a linear but ``x`` is not one (Qwen3.5's gated attention
  output, its linear-attention output through a gated norm);
* ``"other"``: anything else, e.g. a linear reading the residual stream directly.

Mixture-of-experts blocks (:mod:`masq_fx.models.experts`) add two cases. An expert's linears read the rows
of a token stream routed to it (``aten.index(tokens, [rows])``): each expert is a group of its own whose kind
is that of the gathered stream, marked ``routed`` (:func:`token_context` gives such rows their modality ids).
A linear whose output picks experts (it flows into an ``aten.topk`` without crossing another linear) is a
``router``: it stays float, and is a site only so that rewrites of its input (rotations) reach it.

Module names and ``nn_module_stack`` classes are never consulted, so a model whose names mislead
(or an unfamiliar architecture) is grouped by what it computes. Upstream searches run on a
networkx copy of the graph whose edges into linear nodes are cut, so they never cross a linear.
``aten._assert_tensor_metadata`` nodes return nothing and hang off the data path as leaves, so
they need no special handling.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
from torch import fx

from masq_fx.capture.decoder import LAYER_KEY, MODULE_KEY, is_linear, iter_linears

aten = torch.ops.aten

HEAD = "lm_head"
_CONTEXT_KEY = "masq_fx.token_context"
#: Ops whose output holds the same values as their first argument (layout or dtype changes only).
PASSTHROUGH = frozenset({
    aten.view, aten.reshape, aten._unsafe_view, aten.transpose, aten.permute, aten.t,
    aten.unsqueeze, aten.squeeze, aten.flatten, aten.unflatten, aten.contiguous, aten.clone,
    aten.alias, aten.detach, aten.to, aten._to_copy, aten.type_as,
})  # fmt: skip
_NORM_OPS = frozenset({aten.layer_norm, aten.rms_norm})
_REDUCTIONS = frozenset({aten.mean, aten.var, aten.var_mean, aten.std, aten.std_mean, aten.sum})
_ATTENTION_OPS = frozenset({aten.scaled_dot_product_attention})
_MATMULS = frozenset({aten.matmul, aten.bmm, aten.einsum})
_SOFTMAX = frozenset({aten.softmax, aten._softmax, aten._safe_softmax})
_TOPK = frozenset({aten.topk})
_ACTIVATIONS = frozenset({
    aten.silu, aten.gelu, aten.relu, aten.sigmoid, aten.tanh, aten.mish, aten.hardswish,
    aten.leaky_relu, aten.elu,
})  # fmt: skip


@dataclass(frozen=True)
class SmoothingGroup:
    """Linears that read the same activation, and what produced it.

    ``kind`` is ``"norm"``, ``"attention"``, ``"activation"``, ``"gated"`` or ``"other"``; ``source`` is the fx
    name of the producing node; ``linears`` are module names in graph order; ``norm_weight`` and
    ``norm_bias`` are the get_attr targets of a norm group's γ and β (``None`` when absent);
    ``layer`` is the decoder layer of the linears (``None`` outside the layers).
    """

    kind: str
    source: str
    linears: tuple[str, ...]
    norm_weight: str | None = None
    norm_bias: str | None = None
    layer: int | None = None
    #: the linears read only the tokens routed to one expert (its rows of a stream, or what is computed from them)
    routed: bool = False
    #: the linears choose experts (an MoE router): kept float, neither observed nor quantized
    router: bool = False


def _packet(arg: fx.node.Argument) -> torch._ops.OpOverloadPacket | None:
    """The aten op packet of a call_function node (``aten.view`` for ``aten.view.default``)."""
    if isinstance(arg, fx.Node) and arg.op == "call_function" and isinstance(arg.target, torch._ops.OpOverload):
        return arg.target.overloadpacket
    return None


def look_through(arg: fx.node.Argument) -> fx.node.Argument:
    """``arg`` with :data:`PASSTHROUGH` ops stripped off (non-nodes are returned unchanged)."""
    while isinstance(arg, fx.Node) and _packet(arg) in PASSTHROUGH:
        arg = arg.args[0]
    return arg


def input_node(linear: fx.Node) -> fx.Node:
    """The node a linear's activation really comes from, past view/reshape/cast/... ops."""
    source = look_through(linear.args[0])
    assert isinstance(source, fx.Node)
    return source


def row_gather(arg: fx.node.Argument) -> fx.Node | None:
    """The ``rows`` index if ``arg`` (past passthrough ops) selects rows of a flattened token stream
    (``tokens.view(-1, C)[rows]``, or of a norm of that view as Gemma 4 has: the tokens routed to one expert),
    else ``None``."""
    source = look_through(arg)
    if _packet(source) is not aten.index or not isinstance(source, fx.Node):
        return None
    indices, base = source.args[1], source.args[0]
    if not (isinstance(indices, (list, tuple)) and len(indices) == 1 and isinstance(indices[0], fx.Node) and isinstance(base, fx.Node)):
        return None
    if _tensor_dims(look_through(base)) == 3 or (_tensor_dims(base) == 2 and _rows(base) == (True, None)):
        return indices[0]
    return None


def _tensor_dims(arg: fx.node.Argument) -> int | None:
    val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _rows(tensor: fx.Node) -> tuple[bool, fx.Node | None]:
    """(whether ``tensor``'s rows are tokens flattened from ``[batch, seq]``, the expert ``rows`` they were gathered at).

    Follows first arguments upstream (an expert's down_proj reads ``act(gate) * up`` of its gathered rows) until a
    ``[batch, seq, C]`` stream, its ``[tokens, C]`` view, or a row gather.
    """
    node: fx.node.Argument = tensor
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_module"):
        rows = row_gather(node)
        if rows is not None:
            return True, rows
        dims = _tensor_dims(node)
        if dims == 3:
            return False, None
        if dims == 2 and _tensor_dims(look_through(node)) == 3:
            return True, None
        node = node.args[0] if node.args else None
    return False, None


def token_context(gm: fx.GraphModule, tensor: fx.Node) -> tuple[fx.Node, fx.Node]:
    """The ``modality_ids`` and ``attention_mask`` nodes aligned with the token rows of ``tensor``.

    The graph's placeholders for a token stream ``[batch, seq, C]``; flattened for its ``[tokens, C]`` view (an
    MoE block's input); for the rows routed to an expert (:func:`row_gather`) and what is computed from them,
    gathered at the same rows. The nodes are inserted once, right before ``tensor``, and reused.
    """
    placeholders = {n.name: n for n in gm.graph.find_nodes(op="placeholder")}
    flat, rows = _rows(tensor)
    if not flat:
        return placeholders["modality_ids"], placeholders["attention_mask"]
    anchor = tensor if rows is None else rows  # what the made nodes are found again by
    found = []
    for name in ("modality_ids", "attention_mask"):
        key = (name, anchor.name)
        owner = placeholders[name] if rows is None else rows  # the made node is a user of it
        node = next((user for user in owner.users if user.meta.get(_CONTEXT_KEY) == key), None)
        if node is None:
            with gm.graph.inserting_before(tensor):  # after what it reads (placeholders, rows), before any reader of tensor
                node = gm.graph.call_function(aten.reshape.default, (placeholders[name], [-1]))
                if rows is not None:
                    node = gm.graph.call_function(aten.index.Tensor, (node, [rows]))
            node.meta[_CONTEXT_KEY] = key
            for made in (node, *node.all_input_nodes):
                if LAYER_KEY in tensor.meta and made.op != "placeholder":
                    made.meta[LAYER_KEY] = tensor.meta[LAYER_KEY]
        found.append(node)
    return found[0], found[1]


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """Producer → consumer graph keyed by fx node name; attributes ``node``, ``module``, ``layer``."""
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node.name, node=node, module=node.meta.get(MODULE_KEY), layer=node.meta.get(LAYER_KEY))
        graph.add_edges_from((producer.name, node.name) for producer in node.all_input_nodes)
    return graph


def _is_linear(arg: fx.node.Argument) -> bool:
    return isinstance(arg, fx.Node) and is_linear(arg)


def _attr(arg: fx.node.Argument) -> str | None:
    """The get_attr target behind ``arg`` (past casts), if it is a parameter."""
    arg = look_through(arg)
    return str(arg.target) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


def _split_param(node: fx.Node) -> tuple[fx.node.Argument, str] | None:
    """For a binary op with one parameter operand: (the other operand, the parameter's target)."""
    a, b = node.args[:2]
    for param, rest in ((a, b), (b, a)):
        target = _attr(param)
        if target is not None and isinstance(rest, fx.Node):
            return look_through(rest), target
    return None


class _Dataflow:
    """Upstream queries that stop at linears."""

    def __init__(self, gm: fx.GraphModule) -> None:
        graph = to_networkx(gm)
        linears = [name for name, node in graph.nodes(data="node") if is_linear(node)]
        graph.remove_edges_from([(p, v) for v in linears for p in list(graph.predecessors(v))])
        self.graph = graph

    def reaches(self, arg: fx.node.Argument, ops: frozenset[torch._ops.OpOverloadPacket]) -> bool:
        """Whether an op in ``ops`` is upstream of ``arg`` without crossing a linear."""
        if not isinstance(arg, fx.Node):
            return False
        return any(_packet(self.graph.nodes[a]["node"]) in ops for a in nx.ancestors(self.graph, arg.name))

    def is_normalized(self, arg: fx.node.Argument) -> bool:
        """``x * rsqrt(r)``, ``x * reciprocal(r)`` or ``x / sqrt(r)`` with ``r`` from a reduction."""
        packet = _packet(arg)
        if not isinstance(arg, fx.Node):
            return False
        if packet is aten.mul:
            factors = [look_through(a) for a in arg.args[:2]]
            return any(_packet(f) in (aten.rsqrt, aten.reciprocal) and self.reaches(f, _REDUCTIONS) for f in factors)
        if packet is aten.div:
            divisor = look_through(arg.args[1])
            return _packet(divisor) is aten.sqrt and self.reaches(divisor, _REDUCTIONS)
        return False

    def norm_params(self, source: fx.Node) -> tuple[str | None, str | None] | None:
        """(γ, β) targets if ``source`` is a normalization's output, else ``None``."""
        if _packet(source) in _NORM_OPS:
            args = list(source.args) + [None] * 4
            return _attr(args[2]), (_attr(args[3]) if _packet(source) is aten.layer_norm else None)
        node: fx.node.Argument = source
        bias = gamma = None
        if isinstance(node, fx.Node) and _packet(node) is aten.add and (split := _split_param(node)):
            node, bias = split
        if isinstance(node, fx.Node) and _packet(node) is aten.mul and (split := _split_param(node)):
            node, gamma = split
        return (gamma, bias) if self.is_normalized(node) else None

    def is_attention(self, source: fx.Node) -> bool:
        packet = _packet(source)
        return packet in _ATTENTION_OPS or (packet in _MATMULS and self.reaches(source, _SOFTMAX))

    @staticmethod
    def is_gated_activation(source: fx.Node) -> bool:
        if _packet(source) is not aten.mul:
            return False
        a, b = (look_through(x) for x in source.args[:2])
        return any(
            isinstance(act, fx.Node) and _packet(act) in _ACTIVATIONS and _is_linear(look_through(act.args[0])) and _is_linear(other)
            for act, other in ((a, b), (b, a))
        )

    def is_gate(self, source: fx.Node) -> bool:
        """``x * act(g)`` with ``g`` computed from a linear's output (not a gated MLP: see :meth:`is_gated_activation`)."""
        if _packet(source) is not aten.mul:
            return False
        factors = [look_through(x) for x in source.args[:2]]
        return any(isinstance(f, fx.Node) and _packet(f) in _ACTIVATIONS and self.reaches(f, frozenset({aten.linear})) for f in factors)

    def routers(self) -> set[fx.Node]:
        """The linears whose outputs reach an ``aten.topk`` without crossing another linear."""
        found: set[fx.Node] = set()
        for name, node in self.graph.nodes(data="node"):
            if _packet(node) in _TOPK:
                found.update(a for a in (self.graph.nodes[n]["node"] for n in nx.ancestors(self.graph, name)) if is_linear(a))
        return found

    def group(self, source: fx.Node, linears: list[fx.Node], router: bool = False) -> SmoothingGroup:
        weight = bias = None
        gathered = row_gather(source) is not None
        stream = look_through(source.args[0]) if gathered else source
        assert isinstance(stream, fx.Node)
        if (params := self.norm_params(stream)) is not None:
            kind, (weight, bias) = "norm", params
        elif self.is_attention(stream):
            kind = "attention"
        elif self.is_gated_activation(stream):
            kind = "activation"
        elif self.is_gate(stream):
            kind = "gated"
        else:
            kind = "other"
        names = tuple(node.meta[MODULE_KEY] for node in linears)
        routed = _rows(source)[1] is not None  # an expert's gate/up (its gathered rows) and down_proj
        return SmoothingGroup(kind, source.name, names, weight, bias, linears[0].meta.get(LAYER_KEY), routed, router)


def smoothing_groups(gm: fx.GraphModule, include_head: bool = False) -> list[SmoothingGroup]:
    """Group every tagged linear by the node its input comes from, in graph order.

    The LM head (``lm_head``) is left out unless ``include_head``.
    """
    flow = _Dataflow(gm)
    routers = flow.routers()
    by_source: dict[tuple[fx.Node, bool], list[fx.Node]] = {}
    for name, node in iter_linears(gm):
        if include_head or name != HEAD:
            by_source.setdefault((input_node(node), node in routers), []).append(node)
    return [flow.group(source, linears, router) for (source, router), linears in by_source.items()]
