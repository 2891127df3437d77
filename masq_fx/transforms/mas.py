"""MAS learning: per-modality smoothing scales learned layer by layer (MASQuant, spec §5.7–5.8).

Calibration samples flow through the prepared graph one decoder layer at a time
(:mod:`masq_fx.capture.layers` segments), in two streams:

* the float stream: in a layer-sequential run (:mod:`masq_fx.sequential`), the float model's own
  layers; run on the whole graph, each layer with its quantizers off (smoothing kept, so it is the
  float layer up to rounding);
* the quantized stream: each layer as quantized so far.

For layer ``i``, its scales (float32 master copies) are learned with AdamW to minimise the
modality-weighted mean absolute error between the quantized layer fed the quantized stream and
the float layer fed the float stream; then both streams advance through layer ``i``. Only one
layer's activations per sample are held at a time. Scales are clamped to ``≥ min_scale`` before
every step (they stay positive). A non-finite loss raises an error naming the layer.

Both streams stay in the model's dtype (a bfloat16 model's layers run in bfloat16, as they will
after quantization); the QuantLinears compute in float32 and the loss is taken in float32.

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
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from torch import Tensor, fx, nn
from tqdm.auto import tqdm

from masq_fx.capture.layers import PRE, Env, Segment, Segments, advance, start
from masq_fx.distributed import ranks, reduce, total
from masq_fx.errors import InputError
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
    #: calibration samples whose gradients each optimizer step averages; ``None``: one per rank (1 in a
    #: single process). In a process group it must be a multiple of the number of ranks
    step_samples: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.step_samples is not None and self.step_samples < 1:
            raise ValueError(f"step_samples must be at least 1 (or None: one per rank), got {self.step_samples}")
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


def _floating(values: Env, names: tuple[str, ...]) -> dict[str, Tensor]:
    """The floating-point tensors among a segment's results (what the loss compares)."""
    return {n: values[n] for n in names if isinstance(values[n], Tensor) and values[n].is_floating_point()}


def _token_major(output: Tensor, valid: Tensor) -> Tensor:
    """A layer output as ``[batch, seq, d]``: hidden states as they are, keys and values ``[batch, heads, seq, d]``
    handed to later layers (Gemma 4's shared KV layers) with the tokens moved to the second axis."""
    if output.shape[:2] != valid.shape and output.dim() == 4 and output.shape[0] == valid.shape[0] and output.shape[2] == valid.shape[1]:
        output = output.transpose(1, 2)
    return output.flatten(2)


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
    #: a layer-sequential run gives it the activations entering each layer from the layers already quantized
    quantized_stream: bool = True
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
        samples = list(context.calibration)
        if context.layer is None:
            self._learn_all(gm, context, samples)
        else:
            data = context.layer_data
            if data is None or data.quantized_inputs is None:
                raise RuntimeError("a layer-sequential run must give LearnMAS the layer's float outputs and quantized inputs")
            segment = Segments(gm, context.captured.num_layers)(context.layer)
            self._learn(context.layer, segment, data.quantized_inputs, data.float_outputs, samples, context.stats)
        for module in gm.modules():
            if isinstance(module, QuantLinear) and context.in_scope(module.name):
                if module.scales is not None:
                    module.scales.requires_grad_(False)
                if module.act_quant is not None and module.act_quant.granularity == "per_tensor":
                    # static scales were calibrated for the initial scales: recalibrate for the learned ones
                    module.set_quantizers(static_scale=calibrate_static_scale(_smoothed_absmax(module, context), module.act_quant))
        return gm

    def _learn_all(self, gm: fx.GraphModule, context: Context, samples: list) -> None:
        """Every layer in turn; the float stream is the graph itself with its quantizers off."""
        segments = Segments(gm, context.captured.num_layers)
        last = segments.last_reader()
        with torch.no_grad():
            pre = segments(PRE)
            fp_envs = [advance(env, pre.run(env), PRE, last) for env in map(start, samples)]
        q_envs = [dict(env) for env in fp_envs]
        bar = tqdm(total=segments.num_layers, desc="MAS layers", unit="layer", disable=not self.progress)
        for layer in range(segments.num_layers):
            segment = segments(layer)
            with torch.no_grad(), quantizers_off(segment.module):
                targets = [segment.run(env) for env in fp_envs]
            self._learn(layer, segment, q_envs, targets, samples, context.stats)
            with torch.no_grad():
                with quantizers_off(segment.module):
                    fp_envs = [advance(env, segment.run(env), layer, last) for env in fp_envs]
                q_envs = [advance(env, segment.run(env), layer, last) for env in q_envs]
            bar.update(1)
            if layer in self.losses:
                bar.set_postfix_str(f"layer {layer} loss {self.losses[layer][0]:.4g} → {self.losses[layer][1]:.4g}")
        bar.close()

    def _learn(self, layer: int, segment: Segment, q_envs: list[Env], targets: list[Env], samples: list, stats: dict) -> None:
        """Learn ``layer``'s scales (and clipping ratios): its ``segment`` fed ``q_envs`` against the float ``targets``."""
        cfg = self.config
        module = segment.module
        params = _layer_scales(module)
        clips = [m.learn_clipping() for m in _quantized_linears(module)] if cfg.learn_clipping else []
        if not params and not clips:
            return
        missing = [name for name in segment.outputs if name not in targets[0]]
        if missing:
            raise RuntimeError(f"MAS learning: the float stream has no value for {missing} at decoder layer {layer}")
        tied: list[_TiedRows] = []
        if cfg.own_channels_in_loop:
            assert self.cmc is not None  # checked in __call__
            found = [_TiedRows.of(module, p, self.cmc, stats) for p in params.values()]
            tied = [t for t in found if t is not None]
        for p in [*params.values(), *clips]:
            p.requires_grad_(True)
        hooks = [t.table.register_hook(t.tie_gradient) for t in tied]
        try:
            epoch_losses = self._optimise(layer, params, clips, tied, segment, q_envs, targets, samples)
        finally:
            for hook in hooks:
                hook.remove()
            for p in [*params.values(), *clips]:
                p.requires_grad_(False)
        self.losses[layer] = (epoch_losses[0], epoch_losses[-1])
        _log.info("MAS layer %d: loss %.5g (first epoch) -> %.5g (last epoch)", layer, *self.losses[layer])

    def _optimise(self, layer, params, clips, tied, segment: Segment, q_envs, targets, samples) -> list[float]:
        """AdamW on the layer's scales (and clipping ratios); the mean loss of every epoch.

        Each step averages the gradients of ``step_samples`` consecutive calibration samples. In a process
        group a step's samples are spread over the ranks (each holds one of every ``N`` consecutive samples:
        :func:`~masq_fx.distributed.assign`) and their gradients summed over the ranks, so every rank takes
        the same step.
        """
        cfg = self.config
        group = ranks()
        size = 1 if group is None else group.size
        per_step = cfg.step_samples or size
        if per_step % size:
            raise InputError(
                f"MAS learning: step_samples={per_step} cannot be spread over {size} ranks: make it a multiple of {size}"
            )
        local = per_step // size
        count = round(total(len(samples), "counting the calibration samples", layer))
        learned = [*params.values(), *clips]
        groups = [{"params": list(params.values()), "lr": cfg.lr}, {"params": clips, "lr": cfg.clip_lr}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)
        epoch_losses = []
        for _ in range(cfg.epochs):
            running = 0.0
            for step in range(-(-count // per_step)):
                self._clamp(params, clips, tied)
                optimizer.zero_grad(set_to_none=True)
                in_step = min(per_step, count - step * per_step)
                for index in range(step * local, min(step * local + local, len(samples))):
                    loss = self._loss(layer, segment, q_envs[index], targets[index], samples[index])
                    (loss / in_step).backward()
                    running += float(loss.detach())
                if group is not None:
                    for p in learned:
                        if p.grad is None:  # this rank had no sample in the (last) step
                            p.grad = torch.zeros_like(p)
                    reduce([p.grad for p in learned], "sum", "summing the MAS gradients", layer)
                optimizer.step()
            epoch_losses.append(total(running, "summing the MAS losses", layer) / count)
        self._clamp(params, clips, tied)
        return epoch_losses

    def _loss(self, layer: int, segment: Segment, env: Env, target: Env, sample) -> Tensor:
        """The modality-weighted error of ``segment``'s outputs for one sample against its float ``target``."""
        cfg = self.config
        outputs = _floating(segment.run(env), segment.outputs)
        valid = sample.attention_mask.bool()
        loss = cast(Tensor, sum(  # a layer has outputs: a Tensor, never the start 0
            modality_weighted_mae(_token_major(o, valid), _token_major(target[name], valid), sample.modality_ids, valid, cfg.loss_weights, cfg.normalization)
            for name, o in outputs.items()
        ))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"MAS learning: non-finite loss at decoder layer {layer}; check that layer's "
                "activations and scales (lower lr, or raise min_scale)"
            )
        return loss

    @torch.no_grad()
    def _clamp(self, scales: dict[str, nn.Parameter], clips: list[nn.Parameter], tied: list[_TiedRows]) -> None:
        for p in scales.values():
            p.clamp_(min=self.config.min_scale)
        for p in clips:
            p.clamp_(self.config.min_clip_ratio, 1.0)
        for rows in tied:
            rows.project()


__all__ = ["LEARNED_SCALES", "LearnMAS", "MASLearningConfig", "modality_weighted_mae"]
