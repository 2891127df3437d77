"""Replace every decoder ``aten.linear`` node by a :class:`~masq_fx.nn.quant_linear.QuantLinear` node.

The new module sits at the linear's own module path (``decoder.layers.0.self_attn.q_proj``), takes
``(x, modality_ids)`` and starts as the identity rewrite (no scales, no quantizers), so the graph
computes exactly what it computed before. The float graph's smoothing groups are recorded in
``context.groups`` first, because later steps need the float dataflow.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import fx

from masq_fx.capture.dataflow import smoothing_groups
from masq_fx.capture.decoder import LAYER_KEY, MODULE_KEY, is_linear
from masq_fx.nn.quant_linear import QuantLinear
from masq_fx.pipeline import GRAPH, Context

QUANT_LINEARS = "quant_linears"
_DECODER = "decoder."


def quant_linears(gm: fx.GraphModule) -> Iterator[QuantLinear]:
    """Every QuantLinear of a prepared graph, in graph order."""
    for node in gm.graph.find_nodes(op="call_module"):
        module = gm.get_submodule(str(node.target))
        if isinstance(module, QuantLinear):
            yield module


def _attr(gm: fx.GraphModule, node: fx.node.Argument):
    if node is None:
        return None
    assert isinstance(node, fx.Node) and node.op == "get_attr", f"expected a parameter, got {node}"
    owner, name = str(node.target).rsplit(".", 1)
    return getattr(gm.get_submodule(owner), name)


@dataclass
class PrepareQuantLinears:
    """Swap decoder linears (and ``lm_head`` if ``include_head``) for identity QuantLinears."""

    include_head: bool = False
    name: str = "prepare_quant_linears"
    requires: tuple[str, ...] = (GRAPH,)
    provides: tuple[str, ...] = (QUANT_LINEARS,)

    def __call__(self, gm: fx.GraphModule, context: Context) -> fx.GraphModule:
        if any(True for _ in quant_linears(gm)):
            raise RuntimeError("the graph is already prepared: PrepareQuantLinears must run once")
        context.groups = smoothing_groups(gm)
        modality_ids = next(n for n in gm.graph.find_nodes(op="placeholder") if n.name == "modality_ids")
        for node in list(gm.graph.nodes):
            name = node.meta.get(MODULE_KEY)
            if name is None or not is_linear(node) or (LAYER_KEY not in node.meta and not self.include_head):
                continue
            x, weight, bias = (list(node.args) + [None])[:3]
            module = QuantLinear(_attr(gm, weight), _attr(gm, bias), name)
            target = name if name == "lm_head" else _DECODER + name
            gm.add_submodule(target, module)  # replaces the parameter holder at the same path
            with gm.graph.inserting_after(node):
                replacement = gm.graph.call_module(target, (x, modality_ids))
            replacement.meta.update(node.meta)
            node.replace_all_uses_with(replacement)
            gm.graph.erase_node(node)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return gm
