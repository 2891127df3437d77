"""Rotations of the float decoder graph: exact float rewrites that spread activation outliers over channels.

An orthogonal ``Q`` leaves a linear unchanged when its input is rotated and its weight counter-rotated
(``x Wᵀ = (x Q)(W Q)ᵀ``); quantizing the rotated input and weight then loses much less where a few
channels carry outliers. Three rotations, each a field of :class:`RotationConfig` (QuaRot's R1, R2, R4):

* ``residual``: the residual stream is rotated by one ``Q`` of the hidden width. Each norm's γ is folded
  into the linears reading it (γ becomes 1, so the RMSNorm commutes with ``Q``); the decoder's input
  embeddings are rotated by a node at the graph's entry (every hidden-width block: DeepStack features
  enter the stream too); the linears reading the stream after a norm (q/k/v, gate/up, the LM head) take
  ``W Q``; the linears writing into it (o_proj, down_proj, and those reading a gated output: Qwen3.5's)
  take ``Qᵀ W`` and ``b Q``.
* ``heads``: each value head is rotated by one ``H`` of the head width (``v_proj`` rows) and ``o_proj``'s
  columns of every query head counter-rotated; attention is linear in the values, so nothing else changes.
  A gated attention output (an elementwise gate between attention and ``o_proj``) is not rotated.
* ``down``: an online rotation of ``down_proj``'s input (a :class:`~masq_fx.nn.hadamard.Rotation` node in
  the graph, fast Kronecker factors) with ``down_proj``'s weight counter-rotated.

The rotation runs on the *float* graph, before calibration: the rotated graph is the same float model
with other weights, so the statistics, smoothing (MAS, SmoothQuant: smoothing *after* the rotation, on
the rotated channels), clipping, GPTQ and CMC all see the rotated activations. Which linears play which
role is found once from the graph's dataflow (:func:`plan_rotation`, never by name) and kept, with the
config, in a :class:`RotationRecord` module of the graph; :mod:`masq_fx.replay` re-applies the record
to a fresh capture (a KV-cache graph, a model loaded from a checkpoint), which the seed makes exact.
Norms must be RMSNorms (a LayerNorm's mean subtraction does not commute with ``Q``); linears reading
the residual stream with no norm between (a site of kind ``"other"``) are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, fx, nn

from masq_fx.capture.dataflow import PASSTHROUGH, SmoothingGroup
from masq_fx.capture.decoder import LAYER_KEY, MODULE_KEY, CapturedDecoder, is_linear
from masq_fx.errors import InputError
from masq_fx.nn.hadamard import Rotation, RotationKind
from masq_fx.nn.quant_linear import WEIGHT_BLOCK_ROWS
from masq_fx.pipeline import GRAPH, Capability, Context
from masq_fx.transforms.prepare import QUANT_LINEARS, quant_linears

aten = torch.ops.aten
ROTATED = Capability.ROTATED
RECORD = "masq_fx_rotation"
_ONLINE_PREFIX = "masq_fx_online_rotation_"
#: ops a value head passes through between v_proj and attention (reshapes, GQA's repeat)
_VALUE_PATH = PASSTHROUGH | {aten.expand, aten.slice, aten.repeat, aten.repeat_interleave}


@dataclass(frozen=True)
class RotationConfig:
    """Which rotations to apply (see the module docstring) and how they are drawn.

    ``kind``: ``"hadamard"`` (random-signed Hadamard, fast online) or ``"orthogonal"`` (dense random);
    ``seed`` draws the signs (and any random factor), so the same seed gives the same rotation everywhere.
    """

    kind: RotationKind = "hadamard"
    seed: int = 0
    residual: bool = True
    heads: bool = True
    down: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("hadamard", "orthogonal"):
            raise InputError(f"rotation kind must be 'hadamard' or 'orthogonal', got {self.kind!r}")
        if not (self.residual or self.heads or self.down):
            raise InputError("a rotation with residual, heads and down all off does nothing: set rotation to null instead")


@dataclass(frozen=True)
class RotationPlan:
    """The role of each linear in a rotation, found from a float graph's dataflow (module names, graph paths)."""

    hidden_size: int
    head_dim: int
    #: (linear, γ path of the norm it reads or ``None``): the linears reading the residual stream
    readers: tuple[tuple[str, str | None], ...]
    #: the linears writing into the residual stream
    writers: tuple[str, ...]
    #: (v_proj, o_proj) of each attention
    heads: tuple[tuple[str, str], ...]
    #: the linears whose input is rotated online
    online: tuple[str, ...]

    @property
    def norms(self) -> tuple[str, ...]:
        """The γ paths folded into their readers (each once, graph order)."""
        return tuple(dict.fromkeys(path for _, path in self.readers if path is not None))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RotationPlan:
        return cls(
            hidden_size=int(data["hidden_size"]),
            head_dim=int(data["head_dim"]),
            readers=tuple((str(a), None if b is None else str(b)) for a, b in data["readers"]),
            writers=tuple(map(str, data["writers"])),
            heads=tuple((str(a), str(b)) for a, b in data["heads"]),
            online=tuple(map(str, data["online"])),
        )


def _value_linear(attention: fx.Node) -> str | None:
    """The linear whose output is the value input of an attention node (past reshapes and GQA's repeat)."""
    arg: Any = attention.args[2] if len(attention.args) > 2 else None
    while isinstance(arg, fx.Node) and not is_linear(arg):
        target = arg.target
        if arg.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or target.overloadpacket not in _VALUE_PATH:
            return None
        if target.overloadpacket is aten.slice and not _whole(arg):  # values cut from a fused projection (qkv_proj)
            return None
        arg = arg.args[0]
    return arg.meta.get(MODULE_KEY) if isinstance(arg, fx.Node) else None


def _whole(node: fx.Node) -> bool:
    """Whether an ``aten.slice`` node keeps its whole dim (as ``x[:, :, None]`` does), not a part of it."""
    args: list[Any] = [*node.args, *(None, 0, None, None, 1)[len(node.args) :]]
    source, dim, start, end, step = args
    size = source.meta["val"].shape[dim] if isinstance(source, fx.Node) and "val" in source.meta else None
    return bool(start in (None, 0) and step == 1 and (end is None or (size is not None and end >= size)))


def _attention_node(gm: fx.GraphModule, site: SmoothingGroup) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == site.source)


def plan_rotation(gm: fx.GraphModule, sites: Iterable[SmoothingGroup], config: RotationConfig, hidden_size: int, head_dim: int) -> RotationPlan:
    """Find each linear's role from the float graph's linear ``sites`` (the head's included); refuses graphs it cannot rotate."""
    readers: list[tuple[str, str | None]] = []
    writers: list[str] = []
    heads: list[tuple[str, str]] = []
    online: list[str] = []
    for site in sites:
        if site.kind == "norm":
            if site.norm_bias is not None:
                raise InputError(
                    f"{site.linears[0]} reads a LayerNorm (it has a bias β): rotations need RMSNorm decoders; quantize without rotation"
                )
            readers.extend((name, site.norm_weight) for name in site.linears)
        elif site.kind in ("attention", "activation", "gated"):  # a gate's elementwise product: no head rotation through it
            writers.extend(site.linears)
            if site.kind == "activation" and config.down:
                online.extend(site.linears)
            if site.kind == "attention" and config.heads:
                value = _value_linear(_attention_node(gm, site))
                if value is None or len(site.linears) != 1:
                    raise InputError(
                        f"cannot find the value projection feeding {site.linears[0]}'s attention: "
                        "set rotation.heads to false for this model"
                    )
                heads.append((value, site.linears[0]))
        else:
            raise InputError(
                f"{', '.join(site.linears)} read the residual stream with no norm before them: the residual rotation cannot "
                "fold into them; quantize this model without rotation"
            )
    if not any(name == "lm_head" for name, _ in readers):
        raise InputError("the LM head does not read a norm's output: this decoder's residual stream cannot be rotated")
    return RotationPlan(hidden_size, head_dim, tuple(readers), tuple(writers), tuple(heads), tuple(online))


class RotationRecord(Rotation):
    """The graph-entry rotation of the residual stream (identity when ``config.residual`` is off), and the record
    of what the rotation did: its config, its plan, and the graph tensors it produced (by graph path), which
    replay and checkpoints recognise as the rotated float model's own rather than as edits."""

    def __init__(self, config: RotationConfig, plan: RotationPlan) -> None:
        super().__init__(plan.hidden_size, config.kind, config.seed)
        self.config = config
        self.plan = plan
        self.produced: dict[str, Tensor] = {}
        #: decoder layer → the changes of its tensors not made yet (a lazy :func:`rotate`; :func:`rotate_layer`)
        self.pending: dict[int, Edits] = {}

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) if self.config.residual else x


def rotation_record(gm: fx.GraphModule) -> RotationRecord | None:
    """The graph's rotation record, if it was rotated."""
    record = getattr(gm, RECORD, None)
    return record if isinstance(record, RotationRecord) else None


def is_produced(gm: fx.GraphModule, path: str, tensor: Tensor) -> bool:
    """Whether ``tensor`` at graph ``path`` is what a float rewrite of the graph (a rotation, LaRoSA's rotations)
    produced there (not a later edit): such rewrites keep a record module with a ``produced`` dict (path → tensor)."""
    return any(getattr(module, "produced", {}).get(path) is tensor for module in gm.children())


def graph_tensor(gm: fx.GraphModule, path: str) -> Tensor:
    """The parameter or buffer at graph ``path``."""
    owner, _, name = path.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def weight_paths(node: fx.Node) -> tuple[str, str | None]:
    """Graph paths of a float linear node's weight and bias (``None``: no bias)."""
    weight, bias = (list(node.args[1:]) + [None])[:2]
    assert isinstance(weight, fx.Node) and weight.op == "get_attr", f"{node} has no parameter weight"
    return str(weight.target), (str(bias.target) if isinstance(bias, fx.Node) else None)


Basis = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Edit:
    """One change of a graph tensor's float64 value; ``by_rows``: it maps each row on its own (``W·Q``, ``W·H``),
    so a large weight can be changed a block of rows at a time."""

    apply: Callable[[Tensor], Tensor]
    by_rows: bool = False


Edits = dict[str, list[Edit]]  # graph path → its changes, in order


def _columns(basis: Basis, w: Tensor) -> Tensor:
    """``Qᵀ W``: ``basis`` (``x ↦ x·Q``) on the columns of ``w``."""
    return basis(w.T).T


def fold_residual(
    gm: fx.GraphModule, plan: RotationPlan, linears: Mapping[str, fx.Node], basis: Callable[[str], Basis | None], skip: set[str], edits: Edits
) -> None:
    """Fold each norm's γ into its readers and set it to one; give the readers ``W·diag(γ)·Q`` and the writers ``Qᵀ W``
    and ``b Q``, where ``basis(linear)`` multiplies rows by the ``Q`` of the residual stream that linear reads or
    writes (``None``: unrotated). The changes are appended to ``edits`` (:func:`write_edits` makes them)."""
    for name, norm in plan.readers:
        if name in skip:
            continue
        path, _ = weight_paths(linears[name])
        changes = edits.setdefault(path, [])
        if norm is not None:
            changes.append(Edit(partial(torch.mul, other=graph_tensor(gm, norm).detach().double()), by_rows=True))  # W·diag(γ)
        q = basis(name)
        if q is not None:
            changes.append(Edit(q, by_rows=True))  # W Q
    for name in plan.writers:
        q = basis(name)
        if name in skip or q is None:
            continue
        path, bias = weight_paths(linears[name])
        edits.setdefault(path, []).append(Edit(partial(_columns, q)))  # Qᵀ W
        if bias is not None:
            edits.setdefault(bias, []).append(Edit(q))
    for path in plan.norms:
        edits.setdefault(path, []).append(Edit(lambda g: torch.ones_like(g, dtype=torch.float64)))


def write_edits(gm: fx.GraphModule, edits: Edits) -> dict[str, nn.Parameter]:
    """Give each graph path of ``edits`` a new parameter: its float64 value changed in order, in the old dtype.

    One tensor at a time, and a tensor whose changes all map rows on their own a block of rows at a time, so only
    a block is held in float64 (a 7B model's LM head is 4 GiB in float64)."""
    produced: dict[str, nn.Parameter] = {}
    for path, changes in edits.items():
        old = graph_tensor(gm, path).detach()
        if old.dim() == 2 and all(change.by_rows for change in changes):
            value = torch.empty_like(old, memory_format=torch.contiguous_format)
            for start in range(0, old.shape[0], WEIGHT_BLOCK_ROWS):
                rows = slice(start, start + WEIGHT_BLOCK_ROWS)
                block = old[rows].double()
                for change in changes:
                    block = change.apply(block)
                value[rows] = block
        else:
            value = old.double()
            for change in changes:
                value = change.apply(value)
        produced[path] = set_parameter(gm, path, value)
        del value
    return produced


def apply_rotation(
    gm: fx.GraphModule, config: RotationConfig, plan: RotationPlan, skip: Iterable[str] = (), lazy: bool = False
) -> RotationRecord:
    """Rotate the float graph ``gm`` (in place) as ``plan`` says: new weights and γs, the entry and online nodes.

    The linears named in ``skip`` keep their weights (replay installs already-rotated modules there). The
    HF model's tensors are never modified: the graph gets new parameters, computed in float64. ``lazy``: the
    decoder layers' tensors are left as they are and their changes kept in the record's ``pending``, made layer by
    layer by :func:`rotate_layer` (a layer-sequential run holds one rotated layer's worth of new weights at a time
    besides those of the layers it has done).
    """
    if rotation_record(gm) is not None:
        raise InputError("the graph is already rotated: rotate a fresh float capture")
    record = RotationRecord(config, plan)
    linears = {n.meta[MODULE_KEY]: n for n in gm.graph.nodes if MODULE_KEY in n.meta and is_linear(n)}
    missing = ({name for name, _ in plan.readers} | set(plan.writers)) - set(linears)
    if missing:
        raise ValueError(f"the graph has no float linear {sorted(missing)[0]}: capture the model the rotation was planned on")
    skipped = set(skip)
    # x·Q on the rows of a float64 matrix through the rotation's Kronecker factors: n·Σ s_i per row, not n²
    residual = (lambda rows: Rotation.forward(record, rows)) if config.residual else None
    h = Rotation(plan.head_dim, config.kind, config.seed + 1).matrix() if config.heads else None
    edits: Edits = {}
    fold_residual(gm, plan, linears, lambda _: residual, skipped, edits)
    if h is not None:
        d = plan.head_dim
        for v_name, o_name in plan.heads:
            if v_name not in skipped:
                path, bias = weight_paths(linears[v_name])
                edits.setdefault(path, []).append(Edit(lambda w: (h.T @ w.reshape(-1, d, w.shape[1])).reshape(w.shape)))
                if bias is not None:
                    edits.setdefault(bias, []).append(Edit(lambda b: (b.reshape(-1, d) @ h).reshape(-1)))
            if o_name not in skipped:
                path, _ = weight_paths(linears[o_name])
                edits.setdefault(path, []).append(Edit(lambda w: (w.reshape(w.shape[0], -1, d) @ h).reshape(w.shape), by_rows=True))
    widths = {name: int(graph_tensor(gm, weight_paths(linears[name])[0]).shape[1]) for name in plan.online}
    by_width = {width: Rotation(width, config.kind, config.seed + 2) for width in set(widths.values())}  # shared by the layers
    online = {name: by_width[width] for name, width in widths.items()}
    for name, rotation in online.items():
        if name not in skipped:
            path, _ = weight_paths(linears[name])
            edits.setdefault(path, []).append(Edit(rotation, by_rows=True))  # W H
    for path, layer in _path_layers(linears, plan).items() if lazy else ():
        if layer is not None and path in edits:
            record.pending.setdefault(layer, {})[path] = edits.pop(path)
    record.produced.update(write_edits(gm, edits))
    device = graph_tensor(gm, weight_paths(linears[plan.readers[0][0]])[0]).device  # the graph runs where its weights are
    _insert_nodes(gm, record, {name: (linears[name], rotation) for name, rotation in online.items()}, device)
    return record


def _path_layers(linears: Mapping[str, fx.Node], plan: RotationPlan) -> dict[str, int | None]:
    """Graph path of each linear's weight and bias, and of each norm γ its readers fold → their decoder layer (``None``:
    outside the layers, as the LM head and the final norm are)."""
    layers: dict[str, int | None] = {}
    for node in linears.values():
        for path in weight_paths(node):
            if path is not None:
                layers[path] = node.meta.get(LAYER_KEY)
    for name, norm in plan.readers:
        if norm is not None:
            layers[norm] = linears[name].meta.get(LAYER_KEY)
    return layers


def rotate_layer(captured: CapturedDecoder, copies: Iterable[CapturedDecoder], layer: int) -> None:
    """Make the changes a lazy :func:`rotate` left pending for decoder ``layer`` of ``captured``, and install the same new
    tensors in ``copies`` of it (whose own records had the same changes pending). Nothing happens for an eager
    rotation or an unrotated capture."""
    record = rotation_record(captured.graph_module)
    if record is None or layer not in record.pending:
        return
    produced = write_edits(captured.graph_module, record.pending.pop(layer))
    for target in (captured, *copies):
        gm = target.graph_module
        own = rotation_record(gm)
        assert own is not None, "a copy of a rotated capture is rotated"
        own.pending.pop(layer, None)
        for path, parameter in produced.items():
            owner, _, name = path.rpartition(".")
            setattr(gm.get_submodule(owner), name, parameter)
            own.produced[path] = parameter
        target.float_tensors = (*target.float_tensors, *produced.values())
        nodes = target.linear_nodes()
        target.weights.update({name: graph_tensor(gm, weight_paths(node)[0]) for name, node in nodes.items() if node.meta.get(LAYER_KEY) == layer})


def set_parameter(gm: fx.GraphModule, path: str, tensor: Tensor) -> nn.Parameter:
    """Give the graph a new frozen parameter at ``path`` (the old one's dtype and device, contiguous)."""
    owner_path, _, name = path.rpartition(".")
    owner = gm.get_submodule(owner_path)
    old = getattr(owner, name)
    parameter = nn.Parameter(tensor.to(dtype=old.dtype, device=old.device).contiguous(), requires_grad=False)
    setattr(owner, name, parameter)
    return parameter


def _insert_nodes(gm: fx.GraphModule, record: RotationRecord, online: Mapping[str, tuple[fx.Node, Rotation]], device: torch.device) -> None:
    """The entry node after ``inputs_embeds`` and an online rotation node before each of ``online``'s linears (on ``device``)."""
    gm.add_submodule(RECORD, record.to(device))
    embeds = next(n for n in gm.graph.find_nodes(op="placeholder") if n.name == "inputs_embeds")
    with gm.graph.inserting_after(embeds):
        entry = gm.graph.call_module(RECORD, (embeds,))
    embeds.replace_all_uses_with(entry, delete_user_cb=lambda user: user is not entry)
    for name, (node, rotation) in online.items():
        target = _ONLINE_PREFIX + name.replace(".", "_")
        gm.add_submodule(target, rotation.to(device))
        with gm.graph.inserting_before(node):
            rotated = gm.graph.call_module(target, (node.args[0],))
        if LAYER_KEY in node.meta:
            rotated.meta[LAYER_KEY] = node.meta[LAYER_KEY]
        node.args = (rotated, *node.args[1:])
    gm.graph.lint()
    gm.recompile()


def rotate(captured: CapturedDecoder, config: RotationConfig, lazy: bool = False) -> CapturedDecoder:
    """A rotated copy of the float capture ``captured`` (which is left as it was): the same float model, other weights.

    ``lazy``: the decoder layers' weights are rotated when :func:`rotate_layer` is called for each (as the
    layer-sequential run does); until then the copy is not the float model."""
    if any(True for _ in quant_linears(captured.graph_module)):
        raise InputError("rotate the float capture, before any quantization step (PrepareQuantLinears)")
    if captured.rotation_refusal is not None:
        raise InputError(f"cannot rotate this {captured.family} model: {captured.rotation_refusal}; quantize it without rotation")
    rotated = captured.copy()
    plan = plan_rotation(rotated.graph_module, rotated.sites, config, rotated.hidden_size, rotated.head_dim)
    record = apply_rotation(rotated.graph_module, config, plan, lazy=lazy)
    gm = rotated.graph_module
    rotated.weights = {name: graph_tensor(gm, weight_paths(node)[0]) for name, node in rotated.linear_nodes().items()}
    rotated.float_tensors = (*captured.float_tensors, *record.produced.values())
    return rotated


@dataclass
class Rotate:
    """Pipeline step: rotate the context's float graph (before calibration: the statistics must see the rotated
    activations). Layer-sequential recipes rotate with :func:`rotate` instead, once for all of their layers."""

    config: RotationConfig = field(default_factory=RotationConfig)
    name: str = "rotate"
    requires: tuple[Capability, ...] = (GRAPH,)
    provides: tuple[Capability, ...] = (ROTATED,)
    invalidates: tuple[Capability, ...] = (Capability.STATS,)

    def __call__(self, gm: fx.GraphModule, context: Context) -> fx.GraphModule:
        if QUANT_LINEARS in context.provided:
            raise InputError("rotate the float graph before PrepareQuantLinears and calibration")
        captured = context.captured
        plan = plan_rotation(gm, captured.sites, self.config, captured.hidden_size, captured.head_dim)
        apply_rotation(gm, self.config, plan)
        return gm
