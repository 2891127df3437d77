"""Replay of a transformed decoder graph onto another capture of the same model, by module name.

A transformed graph's results live in the graph's modules, keyed by module name: each linear's
module (a :class:`~masq_fx.nn.quant_linear.QuantLinear` with its state, scale table, integer
weights and CMC factors, or a lowered module), the routers of tied per-modality smoothing
(:mod:`masq_fx.nn.routing`), and the graph parameters a transform replaced (norm weights a smoothing
was folded into), and the float graph's rotation (:mod:`masq_fx.transforms.rotation`), which is re-applied
first. :func:`graph_edits` reads them into a :class:`GraphEdits`; :func:`replay` installs
one onto a float capture (:func:`~masq_fx.capture.decoder.capture` or the KV-cache graph of
:func:`~masq_fx.generation.capture_cached`): every named float linear becomes its module, the
routers are re-inserted before the linears reading them (sharing their tables), and the replaced
parameters are set at their graph paths (the HF model keeps its own).

:func:`~masq_fx.generation.transplant` replays the live modules (shared: both graphs compute with
the same state); :func:`masq_fx.checkpoint.load` replays :class:`LinearRecord` s read from a file,
each rebuilt as a QuantLinear around the fresh capture's float weight and bias.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from masq_fx.capture.decoder import MODULE_KEY, CapturedDecoder, drop_dead_code, module_nodes
from masq_fx.capture.layers import segment_of
from masq_fx.models import ModelAdapter
from masq_fx.nn.quant_linear import QuantLinear, QuantLinearState
from masq_fx.nn.routing import insert_routers, routers
from masq_fx.quantizers import QuantizedWeight
from masq_fx.transforms.prepare import float_linear, install_linear
from masq_fx.transforms.rotation import RotationConfig, RotationPlan, apply_rotation, is_produced, rotation_record
from masq_fx.transforms.sparsity import SparsityRecord, apply_sparsity, sparsity_record

__all__ = ["GraphEdits", "LinearRecord", "Router", "check_float_weights", "graph_edits", "layer_edits", "replaced_attributes", "replay"]

_HEAD = "lm_head"


@dataclass(frozen=True)
class LinearRecord:
    """A QuantLinear without its float weight and bias: everything :meth:`build` needs to rebuild it."""

    state: QuantLinearState
    #: smoothing table (one object for the linears and routers sharing it) and modality → row map
    scales: nn.Parameter | None = None
    row_of_modality: Tensor | None = None
    #: integer weight of each of the module's stored rows (``None``: no weight quantizer)
    weights: dict[int, QuantizedWeight] | None = None
    #: CMC branches by scale row: float factors ``(L, R)`` …
    branches: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    #: … or integer ones ``(Lᵀ, Rᵀ)`` (then ``branches`` is empty)
    branch_codes: dict[int, tuple[QuantizedWeight, QuantizedWeight]] = field(default_factory=dict)

    @classmethod
    def of(cls, module: QuantLinear) -> LinearRecord:
        """What ``module`` computes with: its state, table, integer weights (solved or rounded) and branches."""
        quantized = module.weight_quant is not None
        return cls(
            state=module.state,
            scales=module.scales,
            row_of_modality=None if module.scales is None else module.row_of_modality,
            weights={row: module.weight_codes(row) for row in module.stored_rows()} if quantized else None,
            branches={} if module.branch_codes else dict(module.branches),
            branch_codes=dict(module.branch_codes),
        )

    def build(self, weight: Tensor, bias: Tensor | None, name: str) -> QuantLinear:
        """The QuantLinear ``name`` around a float ``weight`` and ``bias``, computing what the recorded one did."""
        module = QuantLinear(weight, bias, name)
        if self.scales is not None:
            module.set_scales(self.scales, self.row_of_modality)
        module.load_state(self.state)
        if self.weights is not None:
            module.set_solved(self.weights)
        for row, (left_t, right_t) in self.branch_codes.items():
            module.set_branch_codes(row, left_t, right_t)
        for row, (left, right) in self.branches.items():
            module.set_branch(row, left, right)
        return module


@dataclass(frozen=True)
class Router:
    """A per-modality router: the module names of the linears reading it (graph order), its table and row map."""

    linears: tuple[str, ...]
    scales: nn.Parameter
    row_of_modality: Tensor


@dataclass
class GraphEdits:
    """What a transformed graph holds beyond its float capture, by module name."""

    #: module name → the linear's module (installed as is, shared) or record (rebuilt around the float weights)
    linears: dict[str, nn.Module | LinearRecord]
    routers: list[Router] = field(default_factory=list)
    #: graph path → a parameter or buffer that differs from the float model's (the rotated float model's, if rotated)
    attributes: dict[str, Tensor] = field(default_factory=dict)
    #: the float graph's rotation, re-applied before anything else (``None``: not rotated)
    rotation: tuple[RotationConfig, RotationPlan] | None = None
    #: the float graph's sparsification (LaRoSA, TEAL), likewise (``None``: dense)
    sparsity: SparsityRecord | None = None


def _owners(adapter: ModelAdapter) -> dict[str, nn.Module]:
    return {"decoder": adapter.language_model(), _HEAD: adapter.lm_head()}


def _model_tensor(owners: Mapping[str, nn.Module], path: str) -> Tensor | None:
    """The HF model's tensor behind a captured graph attribute (``decoder.…`` or ``lm_head.…``)."""
    owner_name, _, rest = path.partition(".")
    module_path, _, attr = rest.rpartition(".")
    try:
        return getattr(owners[owner_name].get_submodule(module_path), attr, None)
    except (KeyError, AttributeError):
        return None


def replaced_attributes(gm: fx.GraphModule, adapter: ModelAdapter, within: Collection[str] | None = None) -> dict[str, Tensor]:
    """Graph parameters and buffers, outside the graph's modules (linears, routers, rotations), that differ from the
    model's, or from what the graph's rotation produced (sorted paths); only those at the paths ``within``, if given."""
    records = [f"{name}." for name, module in gm.named_children() if hasattr(module, "produced")]  # rotation, sparsity tables
    skip = (*(f"{node.target}." for node in gm.graph.find_nodes(op="call_module")), *records)
    owners = _owners(adapter)
    replaced = {}
    for path, tensor in [*gm.named_parameters(), *gm.named_buffers()]:
        if (within is not None and path not in within) or path.startswith(skip) or is_produced(gm, path, tensor):
            continue
        original = _model_tensor(owners, path)
        if original is None or not (original is tensor or torch.equal(original, tensor)):
            replaced[path] = tensor
    return dict(sorted(replaced.items()))


def check_float_weights(gm: fx.GraphModule, adapter: ModelAdapter) -> None:
    """Raise ``ValueError`` unless every QuantLinear of ``gm`` computes with the model's float weight (rotated, if the graph is)."""
    owners = _owners(adapter)
    for name, node in module_nodes(gm).items():
        module = gm.get_submodule(str(node.target))
        if not isinstance(module, QuantLinear) or is_produced(gm, f"{node.target}.weight", module.weight):
            continue
        original = _model_tensor(owners, f"{node.target}.weight")
        if original is None or not (original is module.weight or torch.equal(original, module.weight)):
            raise ValueError(f"{name}'s float weight is not the given model's: pass the model the graph was captured from")


def graph_edits(gm: fx.GraphModule, adapter: ModelAdapter) -> GraphEdits:
    """The edits of a transformed graph of ``adapter``'s model: its live linear modules, routers, replaced attributes and rotation."""
    record = rotation_record(gm)
    return GraphEdits(
        linears={name: gm.get_submodule(str(node.target)) for name, node in module_nodes(gm).items()},
        routers=[Router(tuple(readers), router.scales, router.row_of_modality) for router, readers in routers(gm)],
        attributes=replaced_attributes(gm, adapter),
        rotation=None if record is None else (record.config, record.plan),
        sparsity=sparsity_record(gm),
    )


def layer_edits(captured: CapturedDecoder, adapter: ModelAdapter, layer: int) -> GraphEdits:
    """The edits of one decoder layer of a transformed capture: its linears' modules, the routers they read, and
    the replaced parameters its nodes read (no rotation or sparsification: those are the whole graph's)."""
    gm = captured.graph_module
    names = {name for name, at in captured.linear_layers.items() if at == layer}
    read = {
        str(arg.target)
        for node, segment in segment_of(gm, captured.num_layers).items()
        if segment == layer
        for arg in node.all_input_nodes
        if arg.op == "get_attr"
    }
    return GraphEdits(
        linears={name: gm.get_submodule(str(node.target)) for name, node in module_nodes(gm).items() if name in names},
        routers=[Router(tuple(readers), router.scales, router.row_of_modality) for router, readers in routers(gm) if readers and set(readers) <= names],
        attributes=replaced_attributes(gm, adapter, within=read),
    )


def replay(gm: fx.GraphModule, edits: GraphEdits) -> dict[str, fx.Node]:
    """Install ``edits`` onto the float capture ``gm`` (in place); returns module name → its new call_module node.

    Raises ``ValueError`` naming what does not match (a linear or attribute the capture lacks).
    """
    live = [name for name, module in edits.linears.items() if not isinstance(module, LinearRecord)]
    if edits.rotation is not None:  # live modules are rotated already: only records need rotated float weights
        apply_rotation(gm, *edits.rotation, skip=live)
    if edits.sparsity is not None:
        apply_sparsity(gm, edits.sparsity, skip=live)
    for path, value in edits.attributes.items():
        _set_attribute(gm, path, value)
    installed: dict[str, fx.Node] = {}
    for node in list(gm.graph.nodes):
        name = node.meta.get(MODULE_KEY)
        if name not in edits.linears or node.op != "call_function":
            continue
        module = edits.linears[name]
        if isinstance(module, LinearRecord):
            weight, bias = float_linear(gm, node)
            module = module.build(weight, bias, name)
        installed[name] = install_linear(gm, node, module)
    missing = set(edits.linears) - set(installed)
    if missing:
        raise ValueError(f"the captured graph has no float linear for {sorted(missing)[:5]}: capture it from the same model")
    for router in edits.routers:
        insert_routers(gm, [installed[name] for name in router.linears], router.scales, router.row_of_modality)
    drop_dead_code(gm)
    gm.graph.lint()
    gm.recompile()
    return installed


def _set_attribute(gm: fx.GraphModule, path: str, value: Tensor) -> None:
    """Give the graph ``value`` at ``path`` (a parameter stays a parameter; the HF model's tensor is untouched)."""
    owner_path, _, attr = path.rpartition(".")
    try:
        owner = gm.get_submodule(owner_path)
    except AttributeError:
        owner = None
    old = getattr(owner, attr, None)
    if owner is None or not isinstance(old, Tensor) or old.shape != value.shape or old.dtype != value.dtype:
        raise ValueError(f"the captured graph's {path} does not match the replayed tensor: capture changed?")
    if attr in owner._parameters and not isinstance(value, nn.Parameter):
        value = nn.Parameter(value, requires_grad=False)
    setattr(owner, attr, value)
