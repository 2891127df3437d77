"""Per-modality routers: the node that divides a shared input by its smoothing table once for a group.

Tied per-modality smoothing gives the linears reading one input a shared scale table; a
:class:`ModalityScale` node right after that input divides every token by its modality's row, and
the linears (``divide_input=False``) only scale their weights. :func:`insert_routers` places them
(smoothing, and replay onto a fresh graph); :func:`routers` reads them back.
"""

from __future__ import annotations

from torch import Tensor, fx, nn

from masq_fx.capture.decoder import LAYER_KEY, MODULE_KEY
from masq_fx.nn.quant_linear import row_scales

ROUTER_PREFIX = "masq_fx_router_"


class ModalityScale(nn.Module):
    """``x ⊘ s[row_of_modality[m]]`` per token; shares its table with the group's QuantLinears."""

    row_of_modality: Tensor  # buffer [NUM_MODALITIES]: modality id → scale row

    def __init__(self, scales: nn.Parameter, row_of_modality: Tensor) -> None:
        super().__init__()
        self.scales = scales
        self.register_buffer("row_of_modality", row_of_modality.to(scales.device).clone())

    def forward(self, x: Tensor, modality_ids: Tensor) -> Tensor:
        return (x.float() / row_scales(self.scales, self.row_of_modality, modality_ids)).to(x.dtype)


def insert_routers(gm: fx.GraphModule, nodes: list[fx.Node], scales: nn.Parameter, rows: Tensor) -> None:
    """Divide the input of the linear module ``nodes`` by ``scales[rows[m]]`` once per distinct input node."""
    modality_ids = nodes[0].args[1]
    for index, x in enumerate(dict.fromkeys(node.args[0] for node in nodes)):
        target = f"{ROUTER_PREFIX}{nodes[0].meta[MODULE_KEY].replace('.', '_')}_{index}"
        gm.add_submodule(target, ModalityScale(scales, rows))
        with gm.graph.inserting_before(min((n for n in nodes if n.args[0] is x), key=_order)):
            router = gm.graph.call_module(target, (x, modality_ids))
        if LAYER_KEY in nodes[0].meta:
            router.meta[LAYER_KEY] = nodes[0].meta[LAYER_KEY]
        for node in nodes:
            if node.args[0] is x:
                node.args = (router, *node.args[1:])


def routers(gm: fx.GraphModule) -> list[tuple[ModalityScale, list[str]]]:
    """Each router node's module and the module names of the linears reading it, in graph order."""
    order = {n.meta[MODULE_KEY]: i for i, n in enumerate(gm.graph.nodes) if MODULE_KEY in n.meta}
    found = []
    for node in gm.graph.find_nodes(op="call_module"):
        router = gm.get_submodule(str(node.target))
        if isinstance(router, ModalityScale):
            readers = sorted((u.meta[MODULE_KEY] for u in node.users if MODULE_KEY in u.meta), key=order.__getitem__)
            found.append((router, readers))
    return found


def _order(node: fx.Node) -> int:
    return list(node.graph.nodes).index(node)
