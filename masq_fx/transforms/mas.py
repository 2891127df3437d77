"""MAS learning: per-modality smoothing scales learned layer by layer (MASQuant, spec §5.7–5.8).

The prepared graph is split into one submodule per decoder layer (plus the ops before and after
them) with ``torch.fx.passes.split_module``. Calibration samples then flow through it twice:

* the float stream: each layer with its quantizers off (smoothing kept, so it is the float layer
  up to rounding);
* the quantized stream: each layer as quantized so far.

For layer ``i``, its scales (float32 master copies) are learned with AdamW to minimise the
modality-weighted mean absolute error between the quantized layer fed the quantized stream and
the float layer fed the float stream; then both streams advance through layer ``i``. Only one
layer's activations per sample are held at a time. Scales are clamped to ``≥ min_scale`` before
every step (they stay positive). A non-finite loss raises an error naming the layer.

Both streams stay in the model's dtype (a bfloat16 model's layers run in bfloat16, as they will
after quantization); the QuantLinears compute in float32 and the loss is taken in float32.

With ``checkpoint`` set, the learned scales are written atomically after every layer, and a
rerun with the same file skips the layers already learned (resume after an interruption).

With ``learn_clipping`` the loss also trains a clipping ratio per output channel (group) of every
quantized weight in the layer (OmniQuant's learnable weight clipping): the ratio shrinks the range
whose extreme sets the quantization scale, trading clipped outliers for a finer grid where the
layer's output, not the weight MSE, says it pays. The ratios stay on the QuantLinears, so GPTQ,
CMC, checkpoints and the int8 backend all use the clipped weights.

With ``own_channels_in_loop`` (and a CMC with ``own_channels`` after it), every non-text scale row
is learned under CMC's constraint instead of being projected after learning: at the start of each
layer, its ``k`` own channels are chosen from the initial scales (as
:func:`~masq_fx.transforms.cmc.own_channel_masks` chooses them) and the row is tied to text's
everywhere else. The tie is a parametrization ``s_m = where(own, s_m, s_t)``: the gradient of a tied
entry is added to text's entry, and the tied entries are re-set to text's after every step. The
learned scales then already satisfy the constraint, so the projection that follows keeps them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import safetensors.torch
import torch
from safetensors.torch import load_file
from torch import Tensor, fx, nn
from torch.fx.passes.split_module import split_module
from tqdm.auto import tqdm

from masq_fx.capture.decoder import LAYER_KEY
from masq_fx.files import write_bytes_atomically
from masq_fx.modality import NUM_MODALITIES, Modality
from masq_fx.nn.quant_linear import QuantLinear, quantizers_off
from masq_fx.pipeline import CALIBRATION_DATA, Capability, Context
from masq_fx.quantizers import calibrate_static_scale
from masq_fx.transforms.cmc import (
    CMCConfig,
    compensated,
    own_channel_masks,
    tie_to_text,
)
from masq_fx.transforms.quantize import WEIGHT_QUANT, _smoothed_absmax
from masq_fx.transforms.smoothing import SCALES

LEARNED_SCALES = Capability.LEARNED_SCALES
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MASLearningConfig:
    epochs: int = 2
    lr: float = 5e-2
    weight_decay: float = 0.0
    #: loss weight of text, vision, audio tokens (Modality order)
    loss_weights: tuple[float, float, float] = (1.0, 0.5, 1.0)
    #: "modality_mean": Σ_m w_m·mean_m|Δ| / Σ_m w_m over present modalities;
    #: "official": Σ_m w_m·Σ_m|Δ| / (d·N), the official code's normalisation (spec §14 item 26)
    normalization: Literal["modality_mean", "official"] = "modality_mean"
    min_scale: float = 1e-2
    #: also learn each quantized weight's per-channel (per-group) clipping ratio in the same loss
    #: (as OmniQuant's learnable weight clipping); off reproduces the official MAS
    learn_clipping: bool = False
    clip_lr: float = 5e-3
    #: the ratios start at 1 and are kept in [min_clip_ratio, 1]
    min_clip_ratio: float = 0.5
    #: learn the scales under the CMC's ``own_channels`` constraint (needs a recipe with one)
    own_channels_in_loop: bool = False
    checkpoint: Path | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if len(self.loss_weights) != NUM_MODALITIES or any(w < 0 for w in self.loss_weights):
            raise ValueError(f"loss_weights must be {NUM_MODALITIES} non-negative numbers (text, vision, audio)")
        if self.normalization not in ("modality_mean", "official"):
            raise ValueError(f"normalization must be 'modality_mean' or 'official', got {self.normalization!r}")
        if self.clip_lr <= 0:
            raise ValueError(f"clip_lr must be positive, got {self.clip_lr}")
        if not 0 < self.min_clip_ratio <= 1:
            raise ValueError(f"min_clip_ratio must be in (0, 1], got {self.min_clip_ratio}")


def modality_weighted_mae(
    output: Tensor,
    target: Tensor,
    modality_ids: Tensor,
    valid: Tensor,
    weights: tuple[float, ...],
    normalization: str = "modality_mean",
) -> Tensor:
    """Modality-weighted mean absolute error over the valid tokens of ``[batch, seq, d]`` tensors."""
    error = (output.float() - target.float()).abs().mean(-1)  # [batch, seq]
    total = output.new_zeros((), dtype=torch.float32)
    norm = 0.0
    count = int(valid.sum())
    for modality, weight in enumerate(weights):
        mask = valid & (modality_ids == modality)
        n = int(mask.sum())
        if n == 0 or weight == 0:
            continue
        if normalization == "official":
            total = total + weight * error[mask].sum() / count
        else:
            total = total + weight * error[mask].mean()
            norm += weight
    return total / norm if normalization == "modality_mean" and norm > 0 else total


class _Layers:
    """The prepared graph split into ``pre``, one submodule per decoder layer, and ``post``."""

    def __init__(self, gm: fx.GraphModule, num_layers: int) -> None:
        started = False

        def partition(node: fx.Node) -> int:
            nonlocal started
            layer = node.meta.get(LAYER_KEY)
            if layer is not None:
                started = True
                return layer + 1
            return num_layers + 1 if started else 0

        self.split = split_module(gm, gm, partition, keep_original_order=True)
        self.layer_nodes = {
            node: int(str(node.target).split("_")[1]) - 1
            for node in self.split.graph.find_nodes(op="call_module")
            if str(node.target).startswith("submod_") and 1 <= int(str(node.target).split("_")[1]) <= num_layers
        }
        nodes = list(self.split.graph.nodes)
        # only what feeds a decoder layer is evaluated (the head after the last layer is not)
        needed: set[fx.Node] = set(self.layer_nodes)
        for node in reversed(nodes):
            if node in needed:
                needed.update(node.all_input_nodes)
        nodes = [n for n in nodes if n in needed]
        position = {node: i for i, node in enumerate(nodes)}
        self.last_use = {node: max((position[u] for u in node.users if u in position), default=-1) for node in nodes}
        self.order = nodes


def _value(split: fx.GraphModule, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "call_module":
        return split.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_function":
        return cast(Callable[..., Any], node.target)(*args, **kwargs)
    if node.op == "get_attr":
        owner, _, name = str(node.target).rpartition(".")
        return getattr(split.get_submodule(owner), name)
    raise RuntimeError(f"unexpected node {node.op} {node.target} in the split graph")


def _outputs(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    return [v for v in value if isinstance(v, Tensor) and v.is_floating_point()]


def _quantized_linears(module: nn.Module) -> list[QuantLinear]:
    return [sub for sub in module.modules() if isinstance(sub, QuantLinear) and sub.weight_quant is not None]


def _layer_scales(module: nn.Module) -> dict[str, nn.Parameter]:
    """Name (of the first QuantLinear holding it) → each distinct learnable scale table of a layer."""
    found: dict[int, tuple[str, nn.Parameter]] = {}
    for sub in module.modules():
        if isinstance(sub, QuantLinear) and sub.scales is not None and not sub.scales_folded:
            found.setdefault(id(sub.scales), (sub.name, sub.scales))
    return dict(found.values())


@dataclass(frozen=True)
class _TiedRows:
    """A scale table whose non-text rows follow text's outside their own channels (``masks``: row → own)."""

    table: nn.Parameter
    text_row: int
    masks: dict[int, Tensor]

    @classmethod
    def of(cls, module: fx.GraphModule, table: nn.Parameter, cmc: CMCConfig, stats: dict) -> _TiedRows | None:
        sharing = [m for m in compensated(module) if m.scales is table]
        if not sharing:
            return None
        text_row = int(sharing[0].row_of_modality[Modality.TEXT])
        return cls(table, text_row, own_channel_masks(sharing, cmc, stats))

    def project(self) -> None:
        tie_to_text(self.table, self.text_row, self.masks)

    def tie_gradient(self, grad: Tensor) -> Tensor:
        tied = grad.clone()
        for row, own in self.masks.items():
            tied[self.text_row] += torch.where(own, 0.0, grad[row])
            tied[row] = torch.where(own, grad[row], 0.0)
        return tied


@dataclass
class LearnMAS:
    """Learn every decoder layer's smoothing scales against the float model, layer by layer.

    Learns against the quantizers installed when it runs: put activation quantization (if any)
    before it, as :func:`masq_fx.recipes.recipe_steps` does; weight-only recipes have none.
    ``cmc``: the compensation that follows, whose ``own_channels`` constraint
    ``config.own_channels_in_loop`` learns under.
    """

    config: MASLearningConfig = field(default_factory=MASLearningConfig)
    progress: bool = True
    cmc: CMCConfig | None = None
    name: str = "learn_mas"
    requires: tuple[Capability, ...] = (SCALES, WEIGHT_QUANT, CALIBRATION_DATA)
    provides: tuple[Capability, ...] = (LEARNED_SCALES,)
    invalidates: tuple[Capability, ...] = (Capability.SOLVED_WEIGHTS, Capability.CMC)
    losses: dict[int, tuple[float, float]] = field(default_factory=dict, init=False)

    def __call__(self, gm: fx.GraphModule, context: Context) -> fx.GraphModule:
        if self.config.own_channels_in_loop and (self.cmc is None or self.cmc.own_channels is None):
            raise ValueError(
                "own_channels_in_loop learns under the CMC's own_channels constraint: pass LearnMAS(cmc=CMCConfig("
                "own_channels=...)) (a recipe with cmc.own_channels set does), or turn own_channels_in_loop off"
            )
        layers = _Layers(gm, context.captured.num_layers)
        done = self._resume(gm)
        samples = list(context.calibration)
        fp_envs = [self._inputs(layers, s) for s in samples]
        q_envs = [dict(env) for env in fp_envs]
        bar = tqdm(total=len(layers.layer_nodes), desc="MAS layers", unit="layer", disable=not self.progress)
        for index, node in enumerate(layers.order):
            if node.op in ("placeholder", "output"):
                continue
            layer = layers.layer_nodes.get(node)
            module = layers.split.get_submodule(str(node.target)) if node.op == "call_module" else None
            if layer is not None and layer not in done:
                self._learn(layer, module, node, layers.split, fp_envs, q_envs, samples, context.stats)
                self._save(gm, layer)
            with torch.no_grad():
                for fp_env, q_env in zip(fp_envs, q_envs):
                    with quantizers_off(module):
                        fp_env[node] = _value(layers.split, node, fp_env)
                    q_env[node] = _value(layers.split, node, q_env)
                    for env in (fp_env, q_env):
                        for arg in list(env):
                            if layers.last_use.get(arg, -1) <= index and arg.op != "placeholder":
                                del env[arg]
            if layer is not None:
                bar.update(1)
                if layer in self.losses:
                    bar.set_postfix_str(f"layer {layer} loss {self.losses[layer][0]:.4g} → {self.losses[layer][1]:.4g}")
        bar.close()
        for module in gm.modules():
            if isinstance(module, QuantLinear):
                if module.scales is not None:
                    module.scales.requires_grad_(False)
                if module.act_quant is not None and module.act_quant.granularity == "per_tensor":
                    # static scales were calibrated for the initial scales: recalibrate for the learned ones
                    module.set_quantizers(static_scale=calibrate_static_scale(_smoothed_absmax(module, context), module.act_quant))
        return gm

    @staticmethod
    def _inputs(layers: _Layers, sample) -> dict[fx.Node, Any]:
        placeholders = layers.split.graph.find_nodes(op="placeholder")
        return dict(zip(placeholders, sample.args()))

    def _learn(self, layer, module, node, split, fp_envs, q_envs, samples, stats) -> None:
        cfg = self.config
        params = _layer_scales(module)
        clips = [m.learn_clipping() for m in _quantized_linears(module)] if cfg.learn_clipping else []
        if not params and not clips:
            return
        tied: list[_TiedRows] = []
        if cfg.own_channels_in_loop:
            assert self.cmc is not None  # checked in __call__
            found = [_TiedRows.of(module, p, self.cmc, stats) for p in params.values()]
            tied = [t for t in found if t is not None]
        with torch.no_grad(), quantizers_off(module):
            targets = [_outputs(_value(split, node, env)) for env in fp_envs]
        for p in [*params.values(), *clips]:
            p.requires_grad_(True)
        hooks = [t.table.register_hook(t.tie_gradient) for t in tied]
        try:
            epoch_losses = self._optimise(layer, params, clips, tied, split, node, q_envs, targets, samples)
        finally:
            for hook in hooks:
                hook.remove()
            for p in [*params.values(), *clips]:
                p.requires_grad_(False)
        self.losses[layer] = (epoch_losses[0], epoch_losses[-1])
        _log.info("MAS layer %d: loss %.5g (first epoch) -> %.5g (last epoch)", layer, *self.losses[layer])

    def _optimise(self, layer, params, clips, tied, split, node, q_envs, targets, samples) -> list[float]:
        """AdamW on the layer's scales (and clipping ratios); the mean loss of every epoch."""
        cfg = self.config
        groups = [{"params": list(params.values()), "lr": cfg.lr}, {"params": clips, "lr": cfg.clip_lr}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)
        epoch_losses = []
        for _ in range(cfg.epochs):
            total = 0.0
            for env, target, sample in zip(q_envs, targets, samples):
                self._clamp(params, clips, tied)
                outputs = _outputs(_value(split, node, env))
                valid = sample.attention_mask.bool()
                loss = cast(Tensor, sum(  # a layer has outputs: a Tensor, never the start 0
                    modality_weighted_mae(o, t, sample.modality_ids, valid, cfg.loss_weights, cfg.normalization)
                    for o, t in zip(outputs, target)
                ))
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"MAS learning: non-finite loss at decoder layer {layer}; check that layer's "
                        "activations and scales (lower lr, or raise min_scale)"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
            epoch_losses.append(total / len(samples))
        self._clamp(params, clips, tied)
        return epoch_losses

    @torch.no_grad()
    def _clamp(self, scales: dict[str, nn.Parameter], clips: list[nn.Parameter], tied: list[_TiedRows]) -> None:
        for p in scales.values():
            p.clamp_(min=self.config.min_scale)
        for p in clips:
            p.clamp_(self.config.min_clip_ratio, 1.0)
        for rows in tied:
            rows.project()

    def _save(self, gm: fx.GraphModule, layer: int) -> None:
        path = self.config.checkpoint
        if path is None:
            return
        state = {}
        for m in gm.modules():
            if isinstance(m, QuantLinear):
                for key in ("scales", "clip_ratios"):
                    if getattr(m, key) is not None:
                        state[f"{m.name}.{key}"] = getattr(m, key).detach().clone(memory_format=torch.contiguous_format)
        state["completed_layers"] = torch.tensor([layer + 1])
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomically(path, safetensors.torch.save(state))

    def _resume(self, gm: fx.GraphModule) -> set[int]:
        path = self.config.checkpoint
        if path is None or not Path(path).exists():
            return set()
        state = load_file(str(path))
        completed = int(state.pop("completed_layers")[0])
        for module in gm.modules():
            if not isinstance(module, QuantLinear):
                continue
            saved = state.get(f"{module.name}.scales")
            if module.scales is not None and saved is not None and saved.shape == module.scales.shape:
                with torch.no_grad():
                    module.scales.copy_(saved)
            saved = state.get(f"{module.name}.clip_ratios")
            if saved is not None and module.weight_quant is not None:
                ratios = module.learn_clipping()
                if saved.shape == ratios.shape:
                    with torch.no_grad():
                        ratios.copy_(saved)
                ratios.requires_grad_(False)
        return set(range(completed))


__all__ = ["LEARNED_SCALES", "LearnMAS", "MASLearningConfig", "modality_weighted_mae"]
