"""Activation sparsity: LaRoSA (layerwise rotated Top-K) and TEAL (magnitude thresholds) as float graph rewrites.

A sparsifier before a linear zeroes some entries of each token's input, so a kernel can skip the matching weight
rows (:class:`~masq_fx.nn.sparsity.TopKLinear`). Sites (one per linear input, :class:`SparseSite`) have one of two
roles: ``"input"``, the normed input of an attention or MLP block (q/k/v, gate/up), and ``"inner"``, the input of
o_proj and down_proj. Their levels (fraction zeroed) come from :class:`SparsityConfig`: explicit, or a model-level
``target`` (the fraction of the decoder's linear weight rows skipped per token) split between the roles by ``ratios``.

* **TEAL** (no rotation): at each site, entries below a magnitude threshold are zeroed; the threshold is the
  site level's quantile of the calibration activations' magnitudes, so the count zeroed varies per token.
* **LaRoSA**: per decoder layer ``l``, an orthogonal ``Q_l``, the eigenvectors of the second moment of the
  layer's attention input (normalised, γ folded out; all tokens, or each modality's mean moment averaged), so
  the first few rotated channels carry most of its energy. The residual stream of layer ``l`` is kept in basis
  ``Q_l``: each norm's γ is folded into its readers (which take ``W·diag(γ)·Q_l``; the LM head takes the last
  basis), o_proj writes ``Q_lᵀ W``, down_proj writes into the next layer's basis ``Q_{l+1}ᵀ W``, the skip
  connection around the MLP carries a residual adapter ``Q_lᵀ Q_{l+1}``, and the decoder input is rotated by
  ``Q_0`` at the graph entry (DeepStack features by the basis of the layer they enter). The rotated float model
  equals the original; block inputs are then Top-K'd in the rotated basis and o_proj / down_proj inputs in
  their own, the same count for every token (the official code's allocation: levels 0.8·s and 1.2·s).

:func:`sparsify` returns a sparsified copy of a float capture; a :class:`SparsityRecord` module of the graph keeps
the config, plan, bases and thresholds, which replay re-applies to another capture (a KV-cache graph).
:func:`achieved_sparsity` measures the fraction zeroed per site and modality.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, fx, nn

from masq_fx.calibration.magnitudes import MagnitudeObserver, ZeroTally, reduce_probes, run_probes
from masq_fx.calibration.observer import ModalityObserver
from masq_fx.capture.dataflow import PASSTHROUGH, SmoothingGroup
from masq_fx.capture.decoder import LAYER_KEY, MODULE_KEY, CapturedDecoder, is_linear
from masq_fx.errors import InputError
from masq_fx.modality import Modality
from masq_fx.models import DecoderInputs
from masq_fx.nn.sparsity import BasisChange, BlockBases, Threshold, TopK
from masq_fx.transforms.prepare import quant_linears
from masq_fx.transforms.rotation import (
    Edits,
    RotationConfig,
    RotationPlan,
    fold_residual,
    graph_tensor,
    plan_rotation,
    rotation_record,
    weight_paths,
    write_edits,
)

aten = torch.ops.aten
SparsityMethod = Literal["larosa", "teal"]
Covariance = Literal["tokens", "modalities"]
Role = Literal["input", "inner"]
Granularity = Literal["layer", "block"]
ROLES: tuple[Role, Role] = ("input", "inner")
RECORD = "masq_fx_sparsity"
_ENTRY = "masq_fx_sparsity_entry"
_SPARSIFIER = "masq_fx_sparsify_"
_ADAPTER = "masq_fx_residual_adapter_"
#: (block input, inner) level ratios of each method when ``ratios`` is not given
DEFAULT_RATIOS: dict[str, tuple[float, float]] = {"larosa": (0.8, 1.2), "teal": (1.0, 1.0)}


@dataclass(frozen=True)
class SparsityConfig:
    """Which method, and how sparse.

    ``target``: the model-level sparsity, the fraction of the decoder linears' weight rows (input channels, over
    all linears, by size) skipped per token; the site levels are ``c·ratios`` with ``c`` chosen to meet it.
    ``ratios``: (block input, inner) level ratios (``None``: LaRoSA 0.8 : 1.2, TEAL 1 : 1). ``levels``: explicit
    (block input, inner) levels instead of ``target``. ``covariance`` (LaRoSA): the second moment of all tokens
    (``"tokens"``), or the mean of each present modality's per-token moment (``"modalities"``: a modality with
    few tokens weighs as much as the others).
    """

    method: SparsityMethod = "larosa"
    target: float = 0.4
    ratios: tuple[float, float] | None = None
    levels: tuple[float, float] | None = None
    covariance: Covariance = "tokens"
    granularity: Granularity = "layer"

    def __post_init__(self) -> None:
        if self.method not in DEFAULT_RATIOS:
            raise InputError(f"sparsity method must be 'larosa' or 'teal', got {self.method!r}")
        if not 0 <= self.target < 1:
            raise InputError(f"sparsity target must be in [0, 1), got {self.target}")
        if self.levels is not None and not all(0 <= level < 1 for level in self.levels):
            raise InputError(f"sparsity levels must be in [0, 1), got {self.levels}")
        if self.ratios is not None and (len(self.ratios) != 2 or min(self.ratios) < 0 or max(self.ratios) == 0):
            raise InputError(f"sparsity ratios must be two non-negative numbers, not both zero; got {self.ratios}")
        if self.granularity not in ("layer", "block"):
            raise InputError(f"granularity must be 'layer' or 'block', got {self.granularity!r}")
        if self.covariance not in ("tokens", "modalities"):
            raise InputError(f"covariance must be 'tokens' or 'modalities', got {self.covariance!r}")

    def role_levels(self, rows: Mapping[Role, int]) -> dict[Role, float]:
        """Level of each role, given the weight size (rows × columns, summed) of each role's linears."""
        if self.levels is not None:
            return dict(zip(ROLES, self.levels))
        ratios = dict(zip(ROLES, self.ratios or DEFAULT_RATIOS[self.method]))
        scale = self.target * sum(rows.values()) / sum(ratios[r] * rows[r] for r in ROLES)
        levels = {r: scale * ratios[r] for r in ROLES}
        if max(levels.values()) >= 1:
            raise InputError(f"target {self.target} needs a level ≥ 1 with ratios {tuple(ratios.values())}: lower the target or even the ratios")
        return levels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SparsityConfig:
        pair = lambda value: None if value is None else (float(value[0]), float(value[1]))  # noqa: E731
        return cls(data["method"], float(data["target"]), pair(data["ratios"]), pair(data["levels"]), data["covariance"], data["granularity"])


@dataclass(frozen=True)
class SparseSite:
    """Linears reading one input, and how much of it is zeroed."""

    linears: tuple[str, ...]
    layer: int
    role: Role
    width: int
    level: float

    @property
    def keep(self) -> int:
        """Entries a Top-K keeps per token."""
        return max(1, int((1 - self.level) * self.width))


@dataclass(frozen=True)
class SparsityPlan:
    """Where the sparsifiers go and, for LaRoSA, the basis of the residual stream each linear reads or writes."""

    sites: tuple[SparseSite, ...]
    #: LaRoSA: the readers (with their norm's γ) and writers of the residual stream
    roles: RotationPlan | None = None
    #: LaRoSA: linear → index of the basis (``Q_index``) it reads or writes
    bases: tuple[tuple[str, int], ...] = ()
    #: LaRoSA: (down_proj, basis it reads, basis it writes): the skip connection around it takes ``Q_aᵀ Q_b``
    adapters: tuple[tuple[str, int, int], ...] = ()
    #: LaRoSA: the basis of each hidden-width block of ``inputs_embeds``
    entry: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["roles"] = None if self.roles is None else self.roles.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SparsityPlan:
        return cls(
            sites=tuple(SparseSite(tuple(s["linears"]), int(s["layer"]), s["role"], int(s["width"]), float(s["level"])) for s in data["sites"]),
            roles=None if data["roles"] is None else RotationPlan.from_dict(data["roles"]),
            bases=tuple((str(a), int(b)) for a, b in data["bases"]),
            adapters=tuple((str(a), int(b), int(c)) for a, b, c in data["adapters"]),
            entry=tuple(int(b) for b in data["entry"]),
        )


def _next_basis(sites: Sequence[SmoothingGroup], writer: SmoothingGroup, norm_sites: list[SmoothingGroup], site_basis: list[int], reading: str) -> int:
    """The basis of the first norm site after ``writer`` (graph order) reading another stream than ``reading`` (the one
    the writer's block reads: an MoE block's experts may come after its shared expert): its stream is written there."""
    after = list(sites)[list(sites).index(writer) + 1 :]
    following = next(group for group in after if group.kind == "norm" and _stream(group) != reading)
    return site_basis[norm_sites.index(following)]


def _stream(group: SmoothingGroup) -> str:
    """What identifies the stream a norm site reads: its norm's γ (shared by a router and its experts), else its source."""
    return group.norm_weight or group.source


def plan_sparsity(captured: CapturedDecoder, config: SparsityConfig) -> SparsityPlan:
    """Sites, levels and (LaRoSA) bases of a float capture's decoder layers; refuses graphs LaRoSA cannot rotate."""
    if config.method == "larosa" and captured.rotation_refusal is not None:
        raise InputError(f"LaRoSA cannot rotate this {captured.family} model: {captured.rotation_refusal}; use method 'teal'")
    sites: list[tuple[SmoothingGroup, Role]] = []
    for group in captured.groups():
        if group.kind == "other" and config.method == "larosa":
            raise InputError(f"{', '.join(group.linears)} read the residual stream with no norm before them: LaRoSA cannot rotate it; use method 'teal'")
        sites.append((group, "input" if group.kind in ("norm", "other") else "inner"))
    size = {name: int(w.numel()) for name, w in captured.weights.items()}
    rows: dict[Role, int] = {r: sum(size[n] for g, role in sites if role == r for n in g.linears) for r in ROLES}
    levels = config.role_levels(rows)
    planned = tuple(
        SparseSite(g.linears, int(g.layer), role, int(captured.weights[g.linears[0]].shape[1]), levels[role])  # type: ignore[arg-type]  # layer: int here
        for g, role in sites
    )
    if config.method == "teal":
        return SparsityPlan(planned)
    roles = plan_rotation(captured.graph_module, captured.sites, RotationConfig(heads=False, down=False), captured.hidden_size, captured.head_dim)
    # the basis of each norm site (graph order): its layer's first (or, per block, its own); the head keeps the last
    norm_sites = [group for group in captured.sites if group.kind == "norm"]
    site_basis: list[int] = []
    for group in norm_sites:
        previous = norm_sites[len(site_basis) - 1] if site_basis else None
        if group.layer is None:
            site_basis.append(site_basis[-1])
        elif previous is None or previous.layer != group.layer or (config.granularity == "block" and _stream(previous) != _stream(group)):
            site_basis.append(len(set(site_basis)))
        else:  # the same layer, or the same norm's stream (an MoE block's router and experts read one)
            site_basis.append(site_basis[-1])
    bases: dict[str, int] = {}
    adapters = []
    reading, stream = 0, ""
    for group in captured.sites:
        if group.kind == "norm":
            reading, stream = site_basis[norm_sites.index(group)], _stream(group)
            bases.update((name, reading) for name in group.linears)
            continue
        writes = _next_basis(captured.sites, group, norm_sites, site_basis, stream)
        for name in group.linears:
            bases[name] = writes
            if writes != reading:
                adapters.append((name, reading, writes))
    layer_basis: dict[int, int] = {}  # the basis a layer's stream arrives in: its first block's
    for group, basis in zip(norm_sites, site_basis):
        if group.layer is not None:
            layer_basis.setdefault(group.layer, basis)
    entry = (0, *(layer_basis.get(layer + 1, site_basis[-1]) for layer in captured.injection_layers))
    return SparsityPlan(planned, roles, tuple(bases.items()), tuple(adapters), entry)


class SparsityRecord(nn.Module):
    """The sparsification of a graph: config, plan, the LaRoSA bases ``[layers, d, d]`` or the TEAL thresholds (one per
    site), and the graph tensors the rotation produced (by graph path), the sparsified float model's own."""

    bases: Tensor
    thresholds: Tensor

    def __init__(self, config: SparsityConfig, plan: SparsityPlan, bases: Tensor | None = None, thresholds: Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        self.plan = plan
        self.register_buffer("bases", torch.empty(0) if bases is None else bases)
        self.register_buffer("thresholds", torch.empty(0) if thresholds is None else thresholds)
        self.produced: dict[str, Tensor] = {}


def sparsity_record(gm: fx.GraphModule) -> SparsityRecord | None:
    """The graph's sparsity record, if it was sparsified."""
    record = getattr(gm, RECORD, None)
    return record if isinstance(record, SparsityRecord) else None


def _linears(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.meta[MODULE_KEY]: n for n in gm.graph.nodes if MODULE_KEY in n.meta and is_linear(n)}


def _inputs(gm: fx.GraphModule, site: SparseSite) -> list[fx.Node]:
    """The distinct input nodes of a site's linears (q/k/v usually read one)."""
    nodes = module_nodes_by_name(gm)
    found = []
    for name in site.linears:
        arg = nodes[name].args[0]
        assert isinstance(arg, fx.Node)
        if arg not in found:
            found.append(arg)
    return found


def module_nodes_by_name(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Module name → the node computing that linear (float or installed module)."""
    return {n.meta[MODULE_KEY]: n for n in gm.graph.nodes if MODULE_KEY in n.meta}


class _Pooled(ModalityObserver):
    """An observer that counts every token as text: one second moment of all tokens (not one per modality)."""

    def forward(self, x: Tensor, modality_ids: Tensor, attention_mask: Tensor | None = None) -> None:
        super().forward(x, torch.zeros_like(modality_ids), attention_mask)


def layer_bases(gm: fx.GraphModule, plan: SparsityPlan, samples: Sequence[DecoderInputs], covariance: Covariance, progress: bool = True) -> Tensor:
    """LaRoSA's bases ``[count, d, d]`` float64: eigenvectors of the second moment of each basis' first block input."""
    assert plan.roles is not None
    basis_of = dict(plan.bases)
    first: dict[int, tuple[str, str | None]] = {}  # basis → (first linear reading it, γ path of its norm)
    for name, norm in plan.roles.readers:
        first.setdefault(basis_of[name], (name, norm))
    nodes = module_nodes_by_name(gm)
    observers = {basis: ModalityObserver(tuple(Modality)) if covariance == "modalities" else _Pooled((Modality.TEXT,)) for basis in first}
    run_probes(gm, {nodes[name].args[0]: observers[basis] for basis, (name, _) in first.items()}, samples, "larosa bases", progress)  # type: ignore[misc]
    reduce_probes(observers[basis] for basis in sorted(observers))
    bases = []
    for basis in range(len(first)):
        stats = observers[basis].stats
        if stats is None:
            raise InputError("no calibration tokens reached the decoder: pass calibration samples")
        moment = sum(stats.moments[m] / (int(stats.count[m]) if covariance == "modalities" else 1) for m in stats.present())
        assert isinstance(moment, Tensor)
        norm = first[basis][1]
        if norm is not None:  # the moment of x̂ (γ folded out): the stream the rotated readers see
            gamma = graph_tensor(gm, norm).detach().double()
            gamma = torch.where(gamma == 0, torch.ones_like(gamma), gamma)
            moment = moment / (gamma[:, None] * gamma[None, :])
        bases.append(torch.linalg.eigh(moment.cpu())[1])
    return torch.stack(bases)


def magnitude_thresholds(gm: fx.GraphModule, plan: SparsityPlan, samples: Sequence[DecoderInputs], progress: bool = True) -> Tensor:
    """TEAL's threshold of each site: the level-quantile of its calibration activations' magnitudes (float32 ``[sites]``)."""
    observers = [MagnitudeObserver() for _ in plan.sites]
    run_probes(gm, {_inputs(gm, site)[0]: obs for site, obs in zip(plan.sites, observers)}, samples, "teal thresholds", progress)
    reduce_probes(observers)
    return torch.tensor([obs.histogram.quantile(site.level) for site, obs in zip(plan.sites, observers)], dtype=torch.float32)


#: ops between an expert's down_proj and its block's output: the routing weight and the add at the expert's rows
_EXPERT_COMBINE = frozenset({aten.mul, aten.index_add})


def _skip_operand(linear: fx.Node) -> tuple[fx.Node, int]:
    """The residual add a writer's output flows into, and the index of its other operand (the skip connection).

    Adds whose other operand is another writer's output are the block's own sums (Qwen3.5's shared expert beside
    the routed ones) and are passed through."""
    current = linear
    while True:
        users = [u for u in current.users if u.target is not aten._assert_tensor_metadata.default]
        if len(users) != 1:
            break
        user = users[0]
        if user.target in (aten.add.Tensor, torch.add):
            index = 0 if user.args[1] is current else 1
            if not _written(user.args[index]):
                return user, index
        else:
            target = user.target
            if user.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or target.overloadpacket not in PASSTHROUGH | _EXPERT_COMBINE:
                break
        current = user
    raise InputError(f"{linear.meta.get(MODULE_KEY)}'s output does not flow into a residual add: LaRoSA cannot place its residual adapter; use method 'teal'")


def _written(arg: fx.node.Argument) -> bool:
    """Whether ``arg`` is a linear's output, past data-moving and expert-combining ops."""
    stack, seen = [arg], set()
    while stack:
        node = stack.pop()
        if not isinstance(node, fx.Node) or node in seen:
            continue
        seen.add(node)
        if node.op == "call_function" and node.target is aten.linear.default:
            return True
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and target.overloadpacket in PASSTHROUGH | _EXPERT_COMBINE:
            stack.extend(node.all_input_nodes)
    return False


def apply_sparsity(gm: fx.GraphModule, source: SparsityRecord, skip: Iterable[str] = ()) -> SparsityRecord:
    """Sparsify the float graph ``gm`` (in place) as ``source`` says; returns the graph's own record (sharing its tables).

    LaRoSA's rotated weights are computed in float64 from the float32 bases; the linears named in ``skip`` keep
    theirs (replay installs already-rotated modules there). The HF model's tensors are never modified.
    """
    if sparsity_record(gm) is not None or rotation_record(gm) is not None:
        raise InputError("the graph is already sparsified or rotated: sparsify a fresh float capture")
    record = SparsityRecord(source.config, source.plan, source.bases, source.thresholds)
    plan = record.plan
    linears = _linears(gm)
    device = next(iter(gm.parameters())).device
    graph = gm.graph
    if plan.roles is not None:
        q = record.bases.double().cpu()
        basis_of = dict(plan.bases)
        edits: Edits = {}

        def basis(name: str) -> Callable[[Tensor], Tensor]:
            return lambda rows: rows @ q[basis_of[name]]

        fold_residual(gm, plan.roles, linears, basis, set(skip), edits)
        record.produced.update(write_edits(gm, edits))
        dtype = next(iter(gm.parameters())).dtype
        embeds = next(n for n in graph.find_nodes(op="placeholder") if n.name == "inputs_embeds")
        gm.add_submodule(_ENTRY, BlockBases(q[list(plan.entry)].to(dtype=dtype, device=device)))
        with graph.inserting_after(embeds):
            entry = graph.call_module(_ENTRY, (embeds,))
        embeds.replace_all_uses_with(entry, delete_user_cb=lambda user: user is not entry)
        adapted_adds: set[fx.Node] = set()
        for name, a, b in plan.adapters:
            add, index = _skip_operand(linears[name])
            if add in adapted_adds:  # an MoE block's experts all write into one add
                continue
            adapted_adds.add(add)
            target = _ADAPTER + name.replace(".", "_")
            gm.add_submodule(target, BasisChange((q[a].T @ q[b]).to(dtype=dtype, device=device)))
            with graph.inserting_before(add):
                adapted = graph.call_module(target, (add.args[index],))
            adapted.meta[LAYER_KEY] = linears[name].meta.get(LAYER_KEY)
            add.update_arg(index, adapted)
    nodes = module_nodes_by_name(gm)
    for index, site in enumerate(plan.sites):
        for position, dense in enumerate(_inputs(gm, site)):
            target = f"{_SPARSIFIER}{index}_{position}"
            module: nn.Module = TopK(site.width, site.keep) if plan.roles is not None else Threshold(record.thresholds[index])
            gm.add_submodule(target, module.to(device))
            with graph.inserting_after(dense):
                sparse = graph.call_module(target, (dense,))
            sparse.meta[LAYER_KEY] = site.layer
            for name in site.linears:
                if nodes[name].args[0] is dense:
                    nodes[name].update_arg(0, sparse)
    gm.add_submodule(RECORD, record)
    graph.lint()
    gm.recompile()
    return record


def sparsify(captured: CapturedDecoder, config: SparsityConfig, samples: Sequence[DecoderInputs], progress: bool = True) -> CapturedDecoder:
    """A sparsified copy of the float capture ``captured`` (left as it was), calibrated on ``samples``."""
    if any(True for _ in quant_linears(captured.graph_module)) or rotation_record(captured.graph_module) is not None:
        raise InputError("sparsify the float capture, before any rotation or quantization step")
    if not samples:
        raise InputError("sparsify needs calibration samples (decoder inputs): none were given")
    plan = plan_sparsity(captured, config)
    out = captured.copy()
    gm = out.graph_module
    if config.method == "larosa":
        source = SparsityRecord(config, plan, bases=layer_bases(gm, plan, samples, config.covariance, progress).float())
    else:
        source = SparsityRecord(config, plan, thresholds=magnitude_thresholds(gm, plan, samples, progress))
    record = apply_sparsity(gm, source)
    out.weights = {name: graph_tensor(gm, weight_paths(node)[0]) for name, node in out.linear_nodes().items()}
    out.float_tensors = (*captured.float_tensors, *record.produced.values())
    return out


@dataclass(frozen=True)
class SiteSparsity:
    """The fraction of a site's input entries that were zero, per modality (absent modalities omitted)."""

    site: SparseSite
    achieved: dict[Modality, float] = field(default_factory=dict)


def achieved_sparsity(captured: CapturedDecoder, samples: Iterable[DecoderInputs], progress: bool = True) -> list[SiteSparsity]:
    """Measure each sparsifier's output over ``samples``: the fraction of entries that are zero, per modality."""
    gm = captured.graph_module
    record = sparsity_record(gm)
    if record is None:
        raise InputError("the graph is not sparsified: nothing to measure")
    nodes = {str(n.target): n for n in gm.graph.find_nodes(op="call_module") if str(n.target).startswith(_SPARSIFIER)}
    if len(nodes) < len(record.plan.sites):
        raise InputError("the graph's sparsifiers were lowered into sparse-input kernels: measure the sparsity before lower()")
    tallies = {f"{_SPARSIFIER}{i}_0": ZeroTally() for i in range(len(record.plan.sites))}
    run_probes(gm, {nodes[target]: tally for target, tally in tallies.items()}, samples, "sparsity", progress)
    results = []
    for site, tally in zip(record.plan.sites, tallies.values()):
        achieved = {Modality(m): float(tally.zeros[m] / tally.entries[m]) for m in range(len(Modality)) if tally.entries[m] > 0}
        results.append(SiteSparsity(site, achieved))
    return results


def model_sparsity(sites: Sequence[SiteSparsity], sizes: Mapping[str, int]) -> dict[Modality, float]:
    """Per modality: the fraction of the decoder linears' weight rows skipped per token, each site weighed by the
    ``sizes`` (weight elements, by module name) of its linears."""
    totals: dict[Modality, list[float]] = {}
    for entry in sites:
        weight = sum(sizes[name] for name in entry.site.linears)
        for modality, value in entry.achieved.items():
            total = totals.setdefault(modality, [0.0, 0.0])
            total[0] += value * weight
            total[1] += weight
    return {m: skipped / weight for m, (skipped, weight) in sorted(totals.items())}
