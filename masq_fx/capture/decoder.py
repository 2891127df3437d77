"""Capture the language decoder of an HF model as an exported FX graph.

The graph computes ``logits = lm_head(decoder(inputs_embeds, position_ids, attention_mask))`` and
has four placeholders, in this order: ``inputs_embeds``, ``position_ids``, ``modality_ids``,
``attention_mask``. ``modality_ids`` is unused by the float graph; modality-aware transforms read
it. Vision and audio towers are not captured: :meth:`ModelAdapter.decoder_inputs` runs them
eagerly. The sequence length (and the batch size) are dynamic.

Every ``aten.linear`` node is tagged with the name of its module relative to the decoder
(``layers.3.self_attn.q_proj``; the head is ``lm_head``) in ``node.meta["masq_fx.module"]``, and
every node inside a decoder layer with its index in ``node.meta["masq_fx.layer"]``.

**Where results live.** A transform's results (smoothing scales and per-modality tables,
quantizer settings, quantized weights, low-rank factors, folded norm weights) live in the
transformed graph's modules, keyed by these module names: each QuantLinear's state and tensors,
the routers, the replaced parameters. :mod:`masq_fx.replay` reads them from there and installs them
onto a fresh capture of the same model (a generation graph with a KV cache, or a model being loaded
from a checkpoint).
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import fx, nn
from torch.export import Dim

from masq_fx.modality import Modality
from masq_fx.models import DecoderInputs, ModelAdapter, adapter_for

if TYPE_CHECKING:
    from masq_fx.capture.dataflow import SmoothingGroup

PLACEHOLDERS = ("inputs_embeds", "position_ids", "modality_ids", "attention_mask")
MODULE_KEY = "masq_fx.module"
LAYER_KEY = "masq_fx.layer"
_DECODER_PREFIX = "decoder."
#: a decoder layer's module path in a node's ``nn_module_stack``: ``decoder.layers.3``, or with export's own naming
#: ``model.language_model.layers.3`` and ``decoder.layers.slice(None, 48, None).3`` (the model slices its layer list);
#: the towers are not in the graph, so every ``layers.N`` there is the decoder's
_LAYER_PATH = re.compile(r"(?:^|\.)layers\.(?:slice\([^)]*\)\.)?(\d+)$")


class _ExportableDecoder(nn.Module):
    """The decoder and LM head behind the four-tensor signature of a captured graph."""

    def __init__(self, adapter: ModelAdapter) -> None:
        super().__init__()
        self.adapter = adapter  # runs ``self.decoder`` (its language model), adding injected features
        self.decoder = adapter.language_model()
        self.lm_head = adapter.lm_head()

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        modality_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        hidden = self.adapter.run_decoder(inputs_embeds, position_ids, attention_mask, modality_ids, use_cache=False)
        return self.lm_head(hidden)


@dataclass
class CapturedDecoder:
    """An exported decoder graph plus what transforms need to know about it."""

    graph_module: fx.GraphModule
    family: str
    num_layers: int
    hidden_size: int
    position_rows: int
    #: the width of one attention head
    head_dim: int = 0
    #: the modalities the model has placeholder tokens for (text always)
    modalities: tuple[Modality, ...] = (Modality.TEXT,)
    capture_seconds: float = 0.0
    #: module name → the original float weight (shared with the HF model, never modified)
    weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    #: the float model's parameters and buffers the exported graph holds (shared with the HF model)
    float_tensors: tuple[torch.Tensor, ...] = field(default=(), repr=False)
    #: the linear sites of the float graph, found once at capture: linears reading one input, with what
    #: produced it (:func:`~masq_fx.capture.dataflow.smoothing_groups`, the head included); observers,
    #: smoothing and the memory estimate read them
    sites: tuple[SmoothingGroup, ...] = field(default=(), repr=False)
    #: module name of each linear → its decoder layer (``None`` for the head)
    linear_layers: dict[str, int | None] = field(default_factory=dict, repr=False)
    #: the layers after which features injected through ``inputs_embeds`` are added (DeepStack)
    injection_layers: tuple[int, ...] = ()
    #: why the residual stream cannot be rotated (``ModelAdapter.rotation_refusal``; ``None``: it can)
    rotation_refusal: str | None = None

    def __call__(self, inputs: DecoderInputs) -> torch.Tensor:
        return self.graph_module(*inputs.args())

    def copy(self) -> CapturedDecoder:
        """A copy whose graph transforms can rewrite independently.

        The float model's tensors (:attr:`float_tensors`) are shared, not copied: transforms never modify
        them in place (they install new modules and parameters), so copying a float capture costs only
        its graph. What transforms installed (scale tables, solved weights) is copied, since later steps
        may update it in place.
        """
        memo: dict[int, Any] = {id(t): t for t in self.float_tensors}
        return copy.deepcopy(self, memo)

    def groups(self, include_head: bool = False) -> list[SmoothingGroup]:
        """The :attr:`sites` of the decoder layers (and the LM head's if ``include_head``), MoE routers left out."""
        return [site for site in self.sites if (site.layer is not None or include_head) and not site.router]

    @property
    def routers(self) -> frozenset[str]:
        """Module names of the MoE router linears (kept float)."""
        return frozenset(name for site in self.sites if site.router for name in site.linears)

    def linear_nodes(self) -> dict[str, fx.Node]:
        """Module name → its linear node, in graph order."""
        return {n.meta[MODULE_KEY]: n for n in self.graph_module.graph.nodes if MODULE_KEY in n.meta}

    def decoder_linears(self) -> list[str]:
        """Module names of the linears inside decoder layers but the MoE routers (the quantization targets)."""
        return [name for name, node in self.linear_nodes().items() if LAYER_KEY in node.meta and name not in self.routers]

    def layer_nodes(self, index: int) -> list[fx.Node]:
        """All nodes of decoder layer ``index``, in graph order."""
        return [n for n in self.graph_module.graph.nodes if n.meta.get(LAYER_KEY) == index]

    def placeholder(self, name: str) -> fx.Node:
        for node in self.graph_module.graph.find_nodes(op="placeholder"):
            if node.name == name:
                return node
        raise KeyError(f"captured graph has no placeholder {name!r}")


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch.ops.aten.linear.default, torch.nn.functional.linear)


def module_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Module name → the call_module node of each tagged linear module (QuantLinear, or lowered), in graph order."""
    return {node.meta[MODULE_KEY]: node for node in gm.graph.find_nodes(op="call_module") if MODULE_KEY in node.meta}


def _weight_attr(node: fx.Node) -> str | None:
    weight = node.args[1]
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        return str(weight.target)
    return None


def module_name_of(attr: str) -> str:
    """``decoder.layers.0.mlp.up_proj.weight`` → ``layers.0.mlp.up_proj``."""
    name = attr.rsplit(".", 1)[0]
    return name[len(_DECODER_PREFIX):] if name.startswith(_DECODER_PREFIX) else name


def _layer_index(node: fx.Node) -> int | None:
    for path, _cls in (node.meta.get("nn_module_stack") or {}).values():
        match = _LAYER_PATH.search(path)
        if match:
            return int(match.group(1))
    return None


def annotate(gm: fx.GraphModule) -> None:
    """Tag linear nodes with their module name and layer nodes with their layer index."""
    for node in gm.graph.nodes:
        layer = _layer_index(node)
        if layer is not None:
            node.meta[LAYER_KEY] = layer
        if is_linear(node):
            attr = _weight_attr(node)
            if attr is not None:
                node.meta[MODULE_KEY] = module_name_of(attr)


#: the graph module holding what :func:`materialize_norm_offsets` produced
NORM_OFFSETS = "masq_fx_norm_offsets"


class ProducedTensors(nn.Module):
    """Graph tensors a float rewrite produced (graph path → tensor): the float model's own values, not edits."""

    def __init__(self) -> None:
        super().__init__()
        self.produced: dict[str, torch.Tensor] = {}


def materialize_norm_offsets(gm: fx.GraphModule) -> None:
    """Give norms that scale by ``1 + γ`` (Qwen3.5, Gemma) the sum as their parameter.

    The graph's ``x̂ · (γ.to(float32) + 1)`` becomes ``x̂ · γ'`` with ``γ' = γ.to(float32) + 1`` computed once (the
    same float op, so the same values), so smoothing, rotations and LaRoSA fold into ``γ'`` as into any norm
    weight. ``γ'`` replaces ``γ`` at its graph path (the HF model's tensor is untouched) and is recorded as produced
    by the capture (:data:`NORM_OFFSETS`), so it counts as the float model's own, not as an edit.
    """
    record = ProducedTensors()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.add.Tensor or len(node.args) != 2:
            continue
        tensor, one = node.args if isinstance(node.args[1], (int, float)) else node.args[::-1]
        if one != 1 or not isinstance(tensor, fx.Node) or not all(user.target is torch.ops.aten.mul.Tensor for user in node.users):
            continue
        chain = [tensor]
        while chain[-1].op == "call_function" and chain[-1].target in (torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default):
            chain.append(cast(fx.Node, chain[-1].args[0]))
        param = chain[-1]
        checks = [user for user in param.users if user.target is torch.ops.aten._assert_tensor_metadata.default]  # of γ's dtype
        if param.op != "get_attr" or any(len(link.users) != 1 for link in chain[:-1]) or len(param.users) != 1 + len(checks):
            continue
        for check in checks:
            gm.graph.erase_node(check)
        owner, _, name = str(param.target).rpartition(".")
        old = getattr(gm.get_submodule(owner), name)
        summed = nn.Parameter(old.detach().to(node.meta["val"].dtype) + 1, requires_grad=False)
        setattr(gm.get_submodule(owner), name, summed)
        record.produced[str(param.target)] = summed
        node.replace_all_uses_with(tensor)
        gm.graph.erase_node(node)
    if record.produced:
        gm.add_submodule(NORM_OFFSETS, record)
        gm.recompile()


def dynamic_dim(limit: int) -> Any:
    """An export dimension of ``1 … limit``, dynamic: ``Dim.DYNAMIC`` (export fails if the model specialises it)
    rather than a named ``Dim``, whose stricter check refuses guards some torch versions cannot prove for
    every value in range (torch 2.11: ``Min(16*s, 32*s) == 16*s`` from a contiguity check)."""
    return Dim.DYNAMIC(min=1, max=limit)


def _dynamic_shapes(example: DecoderInputs) -> tuple[dict[int, Any], ...]:
    batch = dynamic_dim(1024)
    seq = dynamic_dim(32768)
    pos = {1: batch, 2: seq} if example.position_ids.dim() == 3 else {0: batch, 1: seq}
    return ({0: batch, 1: seq}, pos, {0: batch, 1: seq}, {0: batch, 1: seq})


#: functorch's vmap bookkeeping, which exported masks built by ``vmap`` contain (Gemma 3's image blocks): they
#: return nothing and change interpreter state, so dead-code elimination must keep them
_VMAP_NESTING = frozenset({"_vmap_increment_nesting", "_vmap_decrement_nesting"})


def drop_dead_code(gm: fx.GraphModule) -> None:
    """``gm.graph.eliminate_dead_code()`` keeping the vmap nesting calls of exported masks."""
    gm.graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure() or getattr(node.target, "__name__", None) in _VMAP_NESTING)


def drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Remove parameters the graph never reads (the token embedding lives outside the graph)."""
    for node in list(gm.graph.find_nodes(op="get_attr")):
        if not node.users:
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    used = {str(n.target) for n in gm.graph.find_nodes(op="get_attr")}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used and name.startswith(_DECODER_PREFIX + "embed_tokens"):
            owner, attr = name.rsplit(".", 1)
            delattr(gm.get_submodule(owner), attr)
    gm.recompile()


def example_inputs(adapter: ModelAdapter, batch: int = 2, seq: int = 8) -> DecoderInputs:
    """Random text-only decoder inputs of the model's width, dtype and device, used to trace."""
    parameter = next(adapter.language_model().parameters())
    dtype, device = parameter.dtype, parameter.device
    return DecoderInputs(
        inputs_embeds=torch.randn(batch, seq, adapter.embed_width(), dtype=dtype, device=device),
        position_ids=adapter.default_position_ids(batch, seq, device),
        modality_ids=torch.zeros(batch, seq, dtype=torch.long, device=device),
        attention_mask=torch.ones(batch, seq, dtype=torch.long, device=device),
    )


def capture(model: nn.Module, example: DecoderInputs | None = None) -> CapturedDecoder:
    """Export ``model``'s language decoder (and LM head) with dynamic batch and sequence length.

    ``example`` fixes nothing but dtypes, ranks and the device (the graph runs where it was captured); a
    random text-only example on the model's device is used if omitted. The model is put in eval mode.
    Its parameters are shared with the graph, not copied.
    """
    from masq_fx.capture.dataflow import smoothing_groups  # dataflow reads this module's node tags

    adapter = adapter_for(model)
    model.eval()
    example = example or example_inputs(adapter)
    wrapper = _ExportableDecoder(adapter)
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(
            wrapper, example.args(), dynamic_shapes=_dynamic_shapes(example), strict=False
        )
    gm = program.module()
    drop_unused_attributes(gm)
    materialize_norm_offsets(gm)
    annotate(gm)
    seconds = time.perf_counter() - start
    cfg = adapter.text_config()
    captured = CapturedDecoder(
        graph_module=gm,
        family=adapter.family,
        num_layers=len(adapter.layers()),
        hidden_size=cfg.hidden_size,
        position_rows=adapter.position_rows,
        head_dim=max(adapter.kv_shapes()[1]),
        modalities=model_modalities(adapter),
        capture_seconds=seconds,
        injection_layers=adapter.injection_layers(),
        rotation_refusal=adapter.rotation_refusal,
    )
    captured.weights = {name: _weight_of(gm, node) for name, node in captured.linear_nodes().items()}
    captured.linear_layers = {name: node.meta.get(LAYER_KEY) for name, node in captured.linear_nodes().items()}
    captured.float_tensors = (*gm.parameters(), *gm.buffers())
    captured.sites = tuple(smoothing_groups(gm, include_head=True))
    return captured


def model_modalities(adapter: ModelAdapter) -> tuple[Modality, ...]:
    tokens = adapter.modality_tokens()
    found = {Modality.TEXT}
    if tokens.image is not None or tokens.video is not None:
        found.add(Modality.VISION)
    if tokens.audio is not None:
        found.add(Modality.AUDIO)
    return tuple(sorted(found))


def _weight_of(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    attr = _weight_attr(node)
    assert attr is not None
    owner, name = attr.rsplit(".", 1)
    return getattr(gm.get_submodule(owner), name)


def iter_linears(gm: fx.GraphModule) -> Iterator[tuple[str, fx.Node]]:
    """(module name, node) of every tagged linear in graph order."""
    for node in gm.graph.nodes:
        if MODULE_KEY in node.meta:
            yield node.meta[MODULE_KEY], node
