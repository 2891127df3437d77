"""Prefill cost of the CMC branches on the built-in tri-modal model (SmolLM2 decoder), W4A8 on int8 kernels.

Protocol:
- model: the shipped tri-modal thinker (SmolLM2-135M decoder, 30 layers, hidden 576); statistics from
  8 vision, 8 audio and 8 text samples of the calibration split;
- quantized: ``preset("mas-init", 4, 8)`` with ``CMCConfig(rank_ratio=--ratio, factor_bits=--factor-bits)``:
  one stored 4-bit weight per linear, per-modality routed smoothing, a low-rank branch per linear for
  vision and for audio (float32 factors, or ``--factor-bits`` integer codes on the int8 kernels);
  lowered to torchao int8 kernels twice, with the branches indexed (each computed on its modality's
  tokens, the positions passed as graph inputs: the default) and masked (every branch for every
  token). The baseline is the same graph with the branches removed, lowered;
- prompt: ``--tokens`` tokens of real decoder inputs, vision and audio spans of the calibration samples
  interleaved with text so that ``--media`` of them are vision/audio tokens;
- the three graphs and the FP32 graph compiled by :func:`masq_fx.backends.compile_graph`, ``--threads``
  threads, two warm-ups, ``--runs`` interleaved calls; the figures are ratios of medians in this run.

Run: ``.venv/bin/python benchmarks/cmc_cost.py [--factor-bits 8]`` (5-10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
from torch import Tensor
from torch._dynamo.utils import counters

from masq_fx.api import apply, calibrate
from masq_fx.backends import Int8QuantLinear, compile_graph, lower_to_torchao
from masq_fx.builtin.trimodal import calibration_batches, load_trimodal
from masq_fx.capture.decoder import CapturedDecoder
from masq_fx.modality import Modality
from masq_fx.models import DecoderInputs
from masq_fx.recipes import preset
from masq_fx.transforms import quant_linears
from masq_fx.transforms.cmc import CMCConfig


def mixed_prompt(samples: list[DecoderInputs], tokens: int, media: float) -> DecoderInputs:
    """One row of ``tokens`` real decoder inputs: media spans interleaved with text, ``media`` of them non-text."""
    spans, text = [], []
    for inputs in samples:
        for row in range(inputs.attention_mask.shape[0]):
            keep = inputs.attention_mask[row].bool()
            embeds, ids = inputs.inputs_embeds[row][keep], inputs.modality_ids[row][keep]
            is_media = ids != int(Modality.TEXT)
            if bool(is_media.any()):
                spans.append((embeds[is_media], ids[is_media]))
            text.append(embeds[~is_media])
    text_pool = torch.cat(text)
    parts, ids, media_count, used_text = [], [], 0, 0
    for embeds, span_ids in spans * (1 + tokens // max(1, sum(len(s[1]) for s in spans))):
        if media_count + used_text >= tokens:
            break
        want_text = int(round((media_count + len(span_ids)) * (1 - media) / media)) - used_text
        chunk = text_pool[used_text % len(text_pool) :][: max(0, want_text)]
        parts += [chunk, embeds]
        ids += [torch.zeros(len(chunk), dtype=torch.long), span_ids]
        used_text += len(chunk)
        media_count += len(span_ids)
    embeds, ids = torch.cat(parts)[:tokens], torch.cat(ids)[:tokens]
    positions = torch.arange(len(ids)).expand(3, 1, len(ids)).clone()
    return DecoderInputs(embeds[None], positions, ids[None], torch.ones(1, len(ids), dtype=torch.long))


def without_branches(captured: CapturedDecoder) -> CapturedDecoder:
    """A copy of a quantized (not yet lowered) graph with every CMC branch removed (the cost baseline)."""
    stripped = captured.copy()
    for module in quant_linears(stripped.graph_module):
        module.branches, module.branch_codes = {}, {}
    return stripped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.05, help="CMC rank as a fraction of min(d_in, d_out)")
    parser.add_argument(
        "--factor-bits", type=int, default=None, help="integer CMC factors of this many bits (default: float32 factors)"
    )
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--media", type=float, default=0.45, help="fraction of vision/audio tokens in the prompt")
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, processor = load_trimodal()
    recipe = replace(preset("mas-init", 4, 8), cmc=CMCConfig(rank_ratio=args.ratio, factor_bits=args.factor_bits))
    calibrated = calibrate(model, calibration_batches(processor, per_modality=8, batch_size=8), [recipe], progress=False)
    fp, samples = calibrated.captured, calibrated.samples
    quantized = apply(calibrated, recipe, progress=False).decoder
    baseline, masked = without_branches(quantized), quantized.copy()  # lower_to_torchao rewrites a graph in place
    for graph in (baseline, quantized):
        lower_to_torchao(graph)
    lower_to_torchao(masked, branch_layout="masked")
    graphs = {
        "fp32": fp.graph_module,
        "w4a8": baseline.graph_module,
        "w4a8+cmc": quantized.graph_module,
        "w4a8+cmc masked": masked.graph_module,
    }
    ranks = sorted({r for m in quantized.graph_module.modules() if isinstance(m, Int8QuantLinear) for r in m.branch_ranks.values()})

    factors = "float32" if args.factor_bits is None else f"{args.factor_bits}-bit"
    prompt = mixed_prompt(samples, args.tokens, args.media)
    media = float((prompt.modality_ids != int(Modality.TEXT)).float().mean())
    compiled = {name: compile_graph(gm) for name, gm in graphs.items()}
    start = time.perf_counter()
    outputs: dict[str, Tensor] = {}
    fused: dict[str, int] = {}
    with torch._inductor.config.patch(fx_graph_cache=False):  # a cache hit would skip the fusion passes
        for name, fn in compiled.items():  # compiles at the first call
            before = counters["inductor"]["qlinear_weight_prepack_matcher_count"]
            outputs[name] = fn(*prompt.args())
            fused[name] = counters["inductor"]["qlinear_weight_prepack_matcher_count"] - before
    compile_s = time.perf_counter() - start
    for _ in range(2):
        for fn in compiled.values():
            fn(*prompt.args())
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(args.runs):
        for name, fn in compiled.items():
            start = time.perf_counter()
            fn(*prompt.args())
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}

    print(f"tri-modal thinker (SmolLM2 decoder), {prompt.attention_mask.shape[1]}-token prompt, {100 * media:.0f}% vision/audio "
          f"tokens, CMC rank ratio {args.ratio} (ranks {ranks}), {factors} factors, {args.threads} threads, "
          f"{args.runs} interleaved runs; compile {compile_s:.0f} s")
    print(f"{'graph':<16} {'median ms':>10} {'vs fp32':>8} {'int8 GEMMs fused':>17}")
    for name in compiled:
        print(f"{name:<16} {1e3 * median[name]:>10.1f} {median['fp32'] / median[name]:>7.2f}x {fused[name]:>17}")
    for name, layout in (("w4a8+cmc", "indexed"), ("w4a8+cmc masked", "masked")):
        cost = median[name] / median["w4a8"] - 1
        print(f"CMC branch cost, {layout}: {100 * cost:.1f}% of the W4A8 prefill time (gate <= 10%)")
    error = {name: float((outputs[name] - outputs["fp32"]).norm() / outputs["fp32"].norm()) for name in graphs if name != "fp32"}
    print("relative logit error vs fp32 on this prompt: " + ", ".join(f"{k} {v:.4f}" for k, v in error.items()))


if __name__ == "__main__":
    main()
