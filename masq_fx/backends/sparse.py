"""Lower a sparsified graph's linears to the sparse-input kernel (:class:`~masq_fx.nn.sparsity.SparseInputLinear`).

Every float linear reading a sparsifier node (a :class:`~masq_fx.nn.sparsity.TopK` or
:class:`~masq_fx.nn.sparsity.Threshold`) becomes a ``SparseInputLinear`` reading the sparsifier's input: for one
token (decode) it multiplies only the kept rows of its weight, for several tokens it multiplies the sparse input
densely (each token keeps other entries: there is no dense GEMM to skip). A sparsifier left without readers is
removed. Quantized linears stay as they are.
"""

from __future__ import annotations

import torch
from torch import fx

from masq_fx.capture.decoder import MODULE_KEY, CapturedDecoder, drop_dead_code, is_linear
from masq_fx.nn.sparsity import SparseInputLinear, Threshold, TopK

_PREFIX = "masq_fx_sparse_linear_"


def _parameter(gm: fx.GraphModule, arg: fx.node.Argument) -> torch.Tensor | None:
    """The tensor a linear's weight or bias argument reads (``None``: no bias)."""
    if not isinstance(arg, fx.Node):
        return None
    owner, _, name = str(arg.target).rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def lower_sparse(target: CapturedDecoder | fx.GraphModule, bags: int | None = None) -> int:
    """Swap (in place) the float linears reading a sparsifier for ``SparseInputLinear`` s; returns how many.

    ``bags``: parts each single-token product is split into (default: the intra-op thread count), so that every
    thread sums its share of the kept rows.
    """
    gm = target.graph_module if isinstance(target, CapturedDecoder) else target
    bags = bags or torch.get_num_threads()
    swapped = 0
    for node in list(gm.graph.find_nodes(op="call_module")):
        module = gm.get_submodule(str(node.target))
        if not isinstance(module, (TopK, Threshold)):
            continue
        for user in [u for u in node.users if is_linear(u) and u.args[0] is node]:
            weight, bias = (_parameter(gm, arg) for arg in (list(user.args[1:]) + [None])[:2])
            assert weight is not None
            name = f"{_PREFIX}{swapped}"
            gm.add_submodule(name, SparseInputLinear(weight, bias, module, bags))
            with gm.graph.inserting_before(user):
                kernel = gm.graph.call_module(name, (node.args[0],))
            kernel.meta.update({k: v for k, v in user.meta.items() if k != MODULE_KEY})  # a kernel, not a replayable module
            user.replace_all_uses_with(kernel)
            gm.graph.erase_node(user)
            swapped += 1
        if not node.users:
            gm.graph.erase_node(node)
    drop_dead_code(gm)
    gm.graph.lint()
    gm.recompile()
    return swapped
