"""A captured graph cut into segments: the ops before the decoder layers, each layer, and the ops after.

Layer-sequential execution and MAS learning run calibration activations through one segment at a
time. A node belongs to the segment of its decoder layer (``node.meta["masq_fx.layer"]``); a node
without one (an observer or router inserted by a transform, a shape computation) belongs to the
segment of the next layer node after it, so it runs where it stands in the graph; parameters
(``get_attr``) are read inside every segment that uses them. Nodes before the
first layer are segment ``-1`` (``PRE``: rotary tables, masks), after the last layer ``num_layers``
(the final norm and the head).

Activations between segments are kept by node *name* (:data:`Env`), so a float graph and a
transformed copy of it (which keeps the float graph's node names at layer boundaries) exchange
them: the float stream computed on the pristine capture is the target of the transformed layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx

from masq_fx.capture.decoder import LAYER_KEY, PLACEHOLDERS
from masq_fx.models import DecoderInputs

#: values of a graph's nodes by name: the placeholders and the results later segments still read
Env = dict[str, Any]
PRE = -1


def segment_of(gm: fx.GraphModule, num_layers: int) -> dict[fx.Node, int]:
    """Each computing node's segment: ``PRE``, a layer index, or ``num_layers`` (after the last layer)."""
    segments: dict[fx.Node, int] = {}
    pending: list[fx.Node] = []
    started = False
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        layer = node.meta.get(LAYER_KEY)
        if layer is None:
            pending.append(node)
            continue
        for waiting in pending:
            segments[waiting] = layer if started else PRE
        pending.clear()
        started = True
        segments[node] = layer
    for waiting in pending:
        segments[waiting] = num_layers if started else PRE
    return segments


@dataclass(frozen=True)
class Segment:
    """One segment of a graph as a module of its own: ``run(env)`` → the values later segments read."""

    index: int
    module: fx.GraphModule
    #: names of the values it reads: the graph's placeholders, then results of earlier segments
    inputs: tuple[str, ...]
    #: names of its results read after it
    outputs: tuple[str, ...]

    def run(self, env: Env) -> Env:
        values = self.module(*(env[name] for name in self.inputs))
        return dict(zip(self.outputs, values))


def cut(gm: fx.GraphModule, nodes: list[fx.Node], index: int) -> Segment:
    """``nodes`` (in graph order) of ``gm`` as a :class:`Segment`; it shares ``gm``'s modules and parameters.

    Every segment takes all of the graph's placeholders (observers and routers read ``modality_ids``
    and ``attention_mask`` wherever they are inserted).
    """
    graph = fx.Graph()
    inside = set(nodes)
    mapped: dict[fx.Node, fx.Node] = {}
    inputs: list[str] = []
    for node in gm.graph.find_nodes(op="placeholder"):
        mapped[node] = graph.placeholder(node.name)
        inputs.append(node.name)
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg in mapped or arg in inside:
                continue
            if arg.op == "get_attr":  # read where used, so a parameter a transform replaced is the one read
                mapped[arg] = graph.node_copy(arg)
            else:
                mapped[arg] = graph.placeholder(arg.name)
                inputs.append(arg.name)
        mapped[node] = graph.node_copy(node, mapped.__getitem__)
    outputs = [node for node in nodes if any(user not in inside for user in node.users)]
    graph.output(tuple(mapped[node] for node in outputs))
    return Segment(index, fx.GraphModule(gm, graph), tuple(inputs), tuple(node.name for node in outputs))


class Segments:
    """``gm`` cut at its decoder layers; segments are built on demand from the graph as it is then."""

    def __init__(self, gm: fx.GraphModule, num_layers: int) -> None:
        self.gm = gm
        self.num_layers = num_layers

    def __call__(self, index: int) -> Segment:
        """Segment ``index`` (``PRE``, a layer, or ``num_layers``) of the graph as it is now."""
        segments = segment_of(self.gm, self.num_layers)
        return cut(self.gm, [node for node, seg in segments.items() if seg == index], index)

    def last_reader(self) -> dict[str, int]:
        """Name of each node → the last segment reading it (the output node counts as after every segment)."""
        segments = segment_of(self.gm, self.num_layers)
        last: dict[str, int] = {}
        for node in self.gm.graph.nodes:
            readers = [self.num_layers + 1 if user.op == "output" else segments.get(user, PRE) for user in node.users]
            last[node.name] = max(readers, default=PRE)
        return last


def start(sample: DecoderInputs) -> Env:
    """A sample's placeholders by name: where every stream starts."""
    return dict(zip(PLACEHOLDERS, sample.args()))


def advance(env: Env, results: Env, segment: int, last_reader: dict[str, int]) -> Env:
    """``env`` plus a segment's ``results``, without the values no segment after ``segment`` reads."""
    merged = {**env, **results}
    return {name: value for name, value in merged.items() if name in PLACEHOLDERS or last_reader.get(name, PRE) > segment}
