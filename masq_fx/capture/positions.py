"""Per-modality token positions as graph inputs: the indexed layout of CMC branches.

A cross-modal compensation branch applies to the tokens of one modality. Computed for every token
and masked, it costs the whole sequence; given the positions of the modality's tokens, a module
gathers those rows, computes the branch on them alone and adds it back with ``index_add``
(``benchmarks/cmc_branch_layout.py``: 0.72 to 0.96 of the masked time at ρ = 0.05, about half at
ρ = 0.2). The positions depend on the prompt, so a graph compiled with ``fullgraph=True`` cannot
derive them (``nonzero`` has a data-dependent shape); they are computed outside, from
``modality_ids``, and passed in as graph inputs:

* :func:`add_position_inputs` appends one placeholder per non-text modality (:data:`POSITION_INPUTS`)
  to a graph (and to an exported graph's signature) and to the arguments of the module calls that
  take them;
* :func:`token_positions` computes them: flat indices into the ``batch · seq`` tokens;
* :func:`with_positions` completes a graph's positional arguments with them, outside a compiled
  region, as :class:`~masq_fx.backends.CompiledGraph` does on every call. Called with its usual
  inputs (eagerly, or through a plain ``torch.compile(gm, fullgraph=True)``), the graph completes them
  itself in a forward pre-hook, which runs before the compiled forward; callers never pass them.

A module given ``None`` for them computes its branches masked, with the same result up to float
rounding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, fx
from torch.fx.graph import _PyTreeCodeGen
from torch.utils._pytree import tree_structure

from masq_fx.modality import Modality

#: the modalities that get a positions input, in argument order
POSITION_MODALITIES = (Modality.VISION, Modality.AUDIO)
#: placeholder name of each positions input
POSITION_INPUTS = tuple(f"{m.name.lower()}_positions" for m in POSITION_MODALITIES)


def token_positions(modality_ids: Tensor) -> tuple[Tensor, ...]:
    """Flat positions (int64, into the ``batch · seq`` tokens) of each of :data:`POSITION_MODALITIES`' tokens."""
    flat = modality_ids.reshape(-1)
    return tuple(torch.nonzero(flat == int(m)).reshape(-1) for m in POSITION_MODALITIES)


def position_placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    """The graph's positions inputs (empty if it takes none)."""
    return [n for n in gm.graph.find_nodes(op="placeholder") if n.name in POSITION_INPUTS]


@dataclass(frozen=True)
class CompletePositions:
    """Adds the positions to a graph call that passes only the ``usual`` inputs before them (a forward
    pre-hook of every graph given positions inputs, so that ``gm(*usual_inputs)`` works)."""

    usual: int
    modality_ids: int

    @classmethod
    def of(cls, gm: fx.GraphModule) -> CompletePositions | None:
        names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
        if POSITION_INPUTS[0] not in names:
            return None
        return cls(usual=names.index(POSITION_INPUTS[0]), modality_ids=names.index("modality_ids"))

    def complete(self, args: Sequence[Tensor]) -> tuple[Tensor, ...]:
        if len(args) != self.usual:
            return tuple(args)
        return (*args, *token_positions(args[self.modality_ids]))

    def __call__(self, module: fx.GraphModule, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return self.complete(args)


def add_position_inputs(gm: fx.GraphModule, calls: Iterable[fx.Node]) -> None:
    """Append the positions inputs to ``gm`` (if missing) and to the arguments of each node of ``calls``.

    The module of each call takes them as extra positional arguments, after its own, in
    :data:`POSITION_INPUTS` order. ``gm`` called eagerly with its usual inputs computes them itself
    (:class:`CompletePositions`). Recompiles ``gm``.
    """
    calls = list(calls)
    if not calls:
        return
    placeholders = position_placeholders(gm)
    if not placeholders:
        last = list(gm.graph.find_nodes(op="placeholder"))[-1]
        with gm.graph.inserting_after(last):
            for name in reversed(POSITION_INPUTS):
                gm.graph.placeholder(name)
        placeholders = position_placeholders(gm)
        _extend_signature(gm)
        complete = CompletePositions.of(gm)
        assert complete is not None  # the position placeholders were just added
        gm.register_forward_pre_hook(complete, prepend=True)
    for node in calls:
        if not set(placeholders) & set(node.args):
            node.args = (*node.args, *placeholders)
    gm.recompile()


def _extend_signature(gm: fx.GraphModule) -> None:
    """Give an exported graph's pytree signature (``forward(*args)`` flattened by an input spec) the new
    placeholders as trailing positional arguments; a plain FX graph needs nothing."""
    codegen = gm.graph._codegen
    if not isinstance(codegen, _PyTreeCodeGen) or codegen.pytree_info is None:
        return
    names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    codegen.pytree_info = codegen.pytree_info._replace(orig_args=names, in_spec=tree_structure((tuple(names), {})))


def with_positions(gm: fx.GraphModule, args: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """``args`` completed with :func:`token_positions` of their ``modality_ids`` when ``gm`` takes positions
    inputs and ``args`` stops short of them; otherwise ``args`` unchanged. A compiled caller does this
    outside the compiled region (``nonzero`` has a data-dependent shape)."""
    completer = CompletePositions.of(gm)
    return tuple(args) if completer is None else completer.complete(args)
