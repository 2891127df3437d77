"""Per-layer, per-modality signal-to-quantization-noise ratio of a transformed graph vs the float one."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import fx
from tqdm.auto import tqdm

from masq_fx.capture.decoder import LAYER_KEY, CapturedDecoder
from masq_fx.capture.positions import with_positions
from masq_fx.modality import Modality
from masq_fx.models import DecoderInputs


def layer_output_nodes(gm: fx.GraphModule) -> dict[int, fx.Node]:
    """For each decoder layer, the node whose value leaves the layer (its residual-stream output)."""
    outputs: dict[int, fx.Node] = {}
    for node in gm.graph.nodes:
        layer = node.meta.get(LAYER_KEY)
        if layer is not None and any(u.meta.get(LAYER_KEY) != layer for u in node.users):
            outputs[layer] = node  # the last such node in graph order is the layer's output
    return outputs


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watch: dict[fx.Node, int]) -> None:
        super().__init__(gm)
        self.watch = watch
        self.values: dict[int, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n in self.watch:
            self.values[self.watch[n]] = value.detach()
        return value


@torch.no_grad()
def layer_outputs(captured: CapturedDecoder, inputs: DecoderInputs) -> dict[int, torch.Tensor]:
    """Hidden state after every decoder layer, ``{layer: [batch, seq, hidden]}``."""
    gm = captured.graph_module
    watch = {node: layer for layer, node in layer_output_nodes(gm).items()}
    recorder = _Recorder(gm, watch)
    recorder.run(*with_positions(gm, inputs.args()))
    return recorder.values


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """10·log10(‖reference‖² / ‖test − reference‖²); +inf when they are equal."""
    noise = (test.double() - reference.double()).pow(2).sum()
    signal = reference.double().pow(2).sum()
    return math.inf if noise == 0 else float(10 * torch.log10(signal / noise))


def per_modality_layer_sqnr(
    reference: CapturedDecoder, test: CapturedDecoder, samples: Sequence[DecoderInputs], progress: bool = False
) -> dict[tuple[int, Modality], float]:
    """SQNR of every layer's output on each modality's (unpadded) tokens, pooled over ``samples``."""
    signal: dict[tuple[int, Modality], float] = {}
    noise: dict[tuple[int, Modality], float] = {}
    for sample in tqdm(samples, desc="report: layer SQNR", unit="sample", disable=not progress):
        ref, out = layer_outputs(reference, sample), layer_outputs(test, sample)
        valid = sample.attention_mask.bool()
        for layer in ref:
            for modality in Modality:
                mask = valid & (sample.modality_ids == int(modality))
                if not mask.any():
                    continue
                r, t = ref[layer][mask].double(), out[layer][mask].double()
                key = (layer, modality)
                signal[key] = signal.get(key, 0.0) + float(r.pow(2).sum())
                noise[key] = noise.get(key, 0.0) + float((t - r).pow(2).sum())
    return {k: (math.inf if noise[k] == 0 else 10 * math.log10(signal[k] / noise[k])) for k in signal}
