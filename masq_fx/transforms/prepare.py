"""Replace every decoder ``aten.linear`` node by a :class:`~masq_fx.nn.quant_linear.QuantLinear` node.

The new module sits at the linear's own module path (``decoder.layers.0.self_attn.q_proj``), takes
``(x, modality_ids)`` and starts as the identity rewrite (no scales, no quantizers), so the graph
computes exactly what it computed before. The float graph's dataflow (its linear sites) was found
once at capture (:attr:`~masq_fx.capture.CapturedDecoder.sites`), so later steps still see it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import fx, nn

from masq_fx.capture.dataflow import token_context
from masq_fx.capture.decoder import LAYER_KEY, MODULE_KEY, drop_dead_code, is_linear
from masq_fx.nn.quant_linear import QuantLinear
from masq_fx.pipeline import GRAPH, Capability, Context

QUANT_LINEARS = Capability.QUANT_LINEARS
_DECODER = "decoder."


def quant_linears(gm: fx.GraphModule) -> Iterator[QuantLinear]:
    """Every QuantLinear of a prepared graph, in graph order."""
    for node in gm.graph.find_nodes(op="call_module"):
        module = gm.get_submodule(str(node.target))
        if isinstance(module, QuantLinear):
            yield module


def module_path(name: str) -> str:
    """Graph path of the linear module named ``name`` (relative to the decoder; the head is ``lm_head``)."""
    return name if name == "lm_head" else _DECODER + name


def install_linear(gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> fx.Node:
    """Replace the float linear ``node`` by a call of ``module`` at its :func:`module_path` with ``(x, modality_ids)``
    (the ids of ``x``'s rows: :func:`~masq_fx.capture.dataflow.token_context`).

    The float weight and bias nodes go when nothing else reads them (the module holds them).
    """
    target = module_path(node.meta[MODULE_KEY])
    x = node.args[0]
    assert isinstance(x, fx.Node)
    modality_ids, _ = token_context(gm, x)
    gm.add_submodule(target, module)  # replaces the parameter holder at the same path
    with gm.graph.inserting_after(node):
        replacement = gm.graph.call_module(target, (x, modality_ids))
    replacement.meta.update(node.meta)
    node.replace_all_uses_with(replacement)
    params = [a for a in node.args[1:] if isinstance(a, fx.Node)]
    gm.graph.erase_node(node)
    for param in params:
        if not param.users:
            gm.graph.erase_node(param)
    return replacement


def _attr(gm: fx.GraphModule, node: fx.node.Argument):
    if node is None:
        return None
    assert isinstance(node, fx.Node) and node.op == "get_attr", f"expected a parameter, got {node}"
    owner, name = str(node.target).rsplit(".", 1)
    return getattr(gm.get_submodule(owner), name)


def float_linear(gm: fx.GraphModule, node: fx.Node) -> tuple:
    """(weight, bias or ``None``) of the float ``aten.linear`` ``node``."""
    _, weight, bias = (list(node.args) + [None])[:3]
    return _attr(gm, weight), _attr(gm, bias)


@dataclass
class PrepareQuantLinears:
    """Swap decoder linears (and ``lm_head`` if ``include_head``) but MoE routers for identity QuantLinears."""

    include_head: bool = False
    name: str = "prepare_quant_linears"
    requires: tuple[Capability, ...] = (GRAPH,)
    provides: tuple[Capability, ...] = (QUANT_LINEARS,)

    def __call__(self, gm: fx.GraphModule, context: Context) -> fx.GraphModule:
        if any(context.in_scope(m.name) for m in quant_linears(gm)):
            raise RuntimeError("the graph is already prepared: PrepareQuantLinears must run once")
        routers = context.captured.routers
        for node in list(gm.graph.nodes):
            name = node.meta.get(MODULE_KEY)
            if name is None or not is_linear(node) or (LAYER_KEY not in node.meta and not self.include_head) or not context.in_scope(name) or name in routers:
                continue
            weight, bias = float_linear(gm, node)
            install_linear(gm, node, QuantLinear(weight, bias, name))
        drop_dead_code(gm)
        gm.recompile()
        return gm
