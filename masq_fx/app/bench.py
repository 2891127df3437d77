"""Speed of a quantized model against its float model on this CPU: prefill and decode latency, compiled.

:func:`bench` builds the FP32 and the quantized KV-cache generation graphs (one batch row, a static
cache of ``prompt_tokens + decode_slots`` slots), lowers the quantized linears onto torchao's int8
kernels where the recipe has kernels (the others stay on the reference path, and the result says
so), compiles every graph with :func:`masq_fx.backends.compile_graph` and times them with
:func:`measure`:

* prefill: the whole ``prompt_tokens``-token prompt written at cache slot 0;
* decode: one new text token at slot ``prompt_tokens`` (the cache filled to the prompt's length);
* ``warmup`` untimed rounds, then ``runs`` rounds in which the graphs alternate; the figures are
  medians, and their ratios (FP32 / quantized) within one run are what to compare.

The default prompt is text (:func:`text_prompt`): an int8 linear computes every scale row's GEMM
and every CMC branch for every token and selects per token, so its cost does not depend on the
modality mix. :func:`format_table` prints a result.
"""

from __future__ import annotations

import functools
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch._dynamo.utils import counters
from tqdm.auto import tqdm

from masq_fx.api import QuantizedModel
from masq_fx.backends import CompiledGraph, Int4CpuLinear, Int8QuantLinear, LoweringReport, compile_graph
from masq_fx.errors import InputError
from masq_fx.generation import CachedDecoder, capture_cached, full_attention_mask
from masq_fx.modality import Modality
from masq_fx.models import DecoderInputs, ModelAdapter, model_device
from masq_fx.nn.quant_linear import QuantLinear

#: inductor's count of int8 GEMMs it rewrote into oneDNN qlinear with a prepacked weight
_QLINEAR_COUNTER = "qlinear_weight_prepack_matcher_count"
FP32 = "fp32"
QUANTIZED = "quantized"


@dataclass(frozen=True)
class BenchConfig:
    """What :func:`bench` measures, and how often."""

    #: tokens of the prompt (prefill) and cache slots filled before the decoded token
    prompt_tokens: int = 512
    #: cache slots after the prompt (the generation graphs hold ``prompt_tokens + decode_slots``)
    decode_slots: int = 128
    #: untimed rounds after compiling
    warmup: int = 2
    #: timed rounds; each calls every graph once
    runs: int = 20
    #: torch intra-op threads while compiling and timing (restored afterwards)
    threads: int = 2

    def __post_init__(self) -> None:
        for name, least in (("prompt_tokens", 1), ("decode_slots", 1), ("warmup", 0), ("runs", 1), ("threads", 1)):
            if getattr(self, name) < least:
                raise InputError(f"BenchConfig.{name} must be at least {least}, got {getattr(self, name)}")

    @property
    def cache_len(self) -> int:
        return self.prompt_tokens + self.decode_slots


@dataclass(frozen=True)
class GraphTiming:
    """Median latencies of one compiled generation graph, and how many int8 GEMMs inductor fused."""

    prefill_s: float
    decode_s: float
    #: int8 GEMMs rewritten into oneDNN qlinear, prefill and decode graphs together
    fused_qlinear: int


@dataclass(frozen=True)
class Measurement:
    """:func:`measure`'s result: timings by graph name, and the time compiling (with the first calls) took."""

    timings: dict[str, GraphTiming]
    compile_seconds: float


@dataclass(frozen=True)
class BenchResult:
    """FP32 vs quantized latency of one model (see :func:`bench`)."""

    config: BenchConfig
    #: the recipe in short, e.g. ``mas W4A8``
    label: str
    fp32: GraphTiming
    quantized: GraphTiming
    lowering: LoweringReport
    #: bytes the quantized graph's decoder linears hold for their weights, and the same linears' FP32 weight bytes
    resident_bytes: int
    fp32_bytes: int
    compile_seconds: float

    @property
    def prefill_speedup(self) -> float:
        """FP32 / quantized median prefill latency."""
        return self.fp32.prefill_s / self.quantized.prefill_s

    @property
    def decode_speedup(self) -> float:
        """FP32 / quantized median decode latency."""
        return self.fp32.decode_s / self.quantized.decode_s

    @property
    def resident_ratio(self) -> float:
        return self.resident_bytes / self.fp32_bytes

    @property
    def note(self) -> str | None:
        """Why the quantized timings are not (all) those of int8 kernels, if they are not."""
        if not self.lowering.unlowered:
            return None
        reason = next(iter(self.lowering.unlowered.values()))
        if not self.lowering.lowered:
            return f"no linear runs on int8 kernels ({reason}): the quantized figures time the reference (fake-quant) path"
        return f"{len(self.lowering.unlowered)} linears stay on the reference (fake-quant) path ({reason})"


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def text_prompt(adapter: ModelAdapter, tokens: int, seed: int = 0) -> DecoderInputs:
    """One row of ``tokens`` text tokens (ids drawn from ``seed``) as decoder inputs, on the model's device."""
    generator = torch.Generator().manual_seed(seed)
    device = model_device(adapter.model)
    ids = torch.randint(adapter.text_config().vocab_size, (1, tokens), generator=generator).to(device)
    with torch.no_grad():
        embeds = adapter.embed(ids)
    return DecoderInputs(
        inputs_embeds=embeds,
        position_ids=adapter.default_position_ids(1, tokens, device),
        modality_ids=torch.full((1, tokens), int(Modality.TEXT), device=device),
        attention_mask=torch.ones(1, tokens, dtype=torch.long, device=device),
    )


def step_inputs(prompt: DecoderInputs, max_cache_len: int) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Graph inputs of the prefill (``prompt`` at slot 0) and of one decoded text token right after it."""
    batch, tokens = prompt.attention_mask.shape
    mask = full_attention_mask(prompt.attention_mask, max_cache_len)
    device = prompt.inputs_embeds.device
    prefill = (prompt.inputs_embeds, prompt.position_ids, prompt.modality_ids, mask, torch.tensor([0], device=device))
    decode = (
        prompt.inputs_embeds[:, -1:],
        prompt.position_ids[..., -1:] + 1,
        torch.full((batch, 1), int(Modality.TEXT), device=device),
        mask,
        torch.tensor([tokens], device=device),
    )
    return prefill, decode


def compile_graphs(
    graphs: Mapping[str, CachedDecoder], prefill: tuple[Tensor, ...], decode: tuple[Tensor, ...], progress: bool = True
) -> tuple[dict[str, CompiledGraph], dict[str, int], float]:
    """Compile every graph and call it once on ``prefill`` and ``decode`` (where compiling happens).

    Returns the compiled graphs, the int8 GEMMs inductor fused into oneDNN qlinear per graph, and
    the seconds it all took. The FX graph cache is off for these calls: a cache hit would skip the
    passes the fusion count counts.
    """
    compiled = {name: compile_graph(graph.graph_module) for name, graph in graphs.items()}
    fused: dict[str, int] = {}
    start = time.perf_counter()
    with torch._inductor.config.patch(fx_graph_cache=False):
        for name, fn in tqdm(compiled.items(), desc="compile", unit="graph", disable=not progress):
            before = counters["inductor"][_QLINEAR_COUNTER]
            fn(*prefill)
            fn(*decode)
            fused[name] = counters["inductor"][_QLINEAR_COUNTER] - before
    return compiled, fused, time.perf_counter() - start


def _synchronize(result: object) -> None:
    """Wait for the GPU work that produced ``result`` (a CUDA tensor; anything else: nothing to wait for)."""
    if isinstance(result, Tensor) and result.is_cuda:
        torch.cuda.synchronize(result.device)


def interleaved_medians(
    calls: Mapping[str, Callable[[], object]], runs: int, warmup: int, desc: str = "time", progress: bool = True
) -> dict[str, float]:
    """Median seconds of each call over ``runs`` rounds (every call once per round, in turn) after ``warmup`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in tqdm(range(warmup + runs), desc=desc, unit="round", disable=not progress):
        for name, call in calls.items():
            start = time.perf_counter()
            _synchronize(call())
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def measure(graphs: Mapping[str, CachedDecoder], prompt: DecoderInputs, config: BenchConfig, progress: bool = True) -> Measurement:
    """Compile ``graphs`` (one-row generation graphs of ``config.cache_len`` slots) and time prefill and decode.

    Runs under ``config.threads`` threads. Prefill rounds come first, then decode rounds; within a
    round the graphs alternate in the order given.
    """
    rows, tokens = prompt.attention_mask.shape
    if rows != 1 or tokens != config.prompt_tokens:
        raise InputError(f"the prompt must be one row of {config.prompt_tokens} tokens (BenchConfig.prompt_tokens), got {rows} x {tokens}")
    for name, graph in graphs.items():
        if graph.batch_size != 1 or graph.max_cache_len != config.cache_len:
            raise InputError(
                f"graph {name!r} holds {graph.batch_size} rows and {graph.max_cache_len} cache slots: "
                f"capture it with capture_cached(model, batch_size=1, max_cache_len={config.cache_len})"
            )
    prefill, decode = step_inputs(prompt, config.cache_len)
    with intra_op_threads(config.threads):
        compiled, fused, compile_seconds = compile_graphs(graphs, prefill, decode, progress)
        medians = {
            phase: interleaved_medians(
                {name: functools.partial(fn, *args) for name, fn in compiled.items()}, config.runs, config.warmup, phase, progress
            )
            for phase, args in (("prefill", prefill), ("decode", decode))
        }
    timings = {name: GraphTiming(medians["prefill"][name], medians["decode"][name], fused[name]) for name in graphs}
    return Measurement(timings, compile_seconds)


def resident_linear_bytes(gm: nn.Module) -> tuple[int, int]:
    """(bytes the decoder linears of ``gm`` hold for their weights, those linears' FP32 weight bytes).

    An int8-kernel linear holds its integer codes and per-channel scales, an int4-kernel linear its packed
    codes and scale/offset tables; a reference QuantLinear
    its cached fake-quantized weights (or the float weight when not frozen).
    """
    held = fp32 = 0
    for module in gm.modules():
        if isinstance(module, Int8QuantLinear):
            for weight in module.weights:
                held += weight.qdata.nbytes + weight.scale.nbytes
        elif isinstance(module, Int4CpuLinear):
            held += module.weight_bytes
        elif isinstance(module, QuantLinear):
            cached = module.cached_weights
            held += (cached if cached is not None else module.weight).nbytes
        else:
            continue
        fp32 += module.in_features * module.out_features * 4
    return held, fp32


def bench(
    quantized: QuantizedModel, config: BenchConfig = BenchConfig(), prompt: DecoderInputs | None = None, progress: bool = True
) -> BenchResult:
    """Prefill and decode latency of ``quantized`` against its float model, both compiled (see the module docstring).

    Lowers ``quantized`` in place (:meth:`QuantizedModel.lower`). ``prompt`` (one row of
    ``config.prompt_tokens`` tokens) defaults to :func:`text_prompt`.
    """
    if prompt is None:
        prompt = text_prompt(quantized.adapter, config.prompt_tokens)
    with warnings.catch_warnings():  # the report of linears left on the reference path is in the result
        warnings.simplefilter("ignore", UserWarning)
        lowering = quantized.lower()
    graphs = {
        FP32: capture_cached(quantized.model, batch_size=1, max_cache_len=config.cache_len),
        QUANTIZED: quantized.generation_graph(1, config.cache_len),
    }
    measured = measure(graphs, prompt, config, progress)
    held, fp32_bytes = resident_linear_bytes(graphs[QUANTIZED].graph_module)
    return BenchResult(
        config=config,
        label=quantized.recipe.label,
        fp32=measured.timings[FP32],
        quantized=measured.timings[QUANTIZED],
        lowering=lowering,
        resident_bytes=held,
        fp32_bytes=fp32_bytes,
        compile_seconds=measured.compile_seconds,
    )


def latency_table(timings: Mapping[str, GraphTiming], prompt_tokens: int, baseline: str = FP32) -> str:
    """Median prefill and decode milliseconds per graph, with the speed-up over ``baseline`` (its median / the graph's)."""
    base = timings[baseline]
    width = max(6, *(len(name) for name in timings))
    lines = [f"{'graph':<{width}} {f'prefill {prompt_tokens} ms':>16} {'speed-up':>9} {'decode ms':>10} {'speed-up':>9}"]
    for name, t in timings.items():
        lines.append(
            f"{name:<{width}} {1e3 * t.prefill_s:>16.1f} {base.prefill_s / t.prefill_s:>8.2f}x "
            f"{1e3 * t.decode_s:>10.2f} {base.decode_s / t.decode_s:>8.2f}x"
        )
    return "\n".join(lines)


def format_table(result: BenchResult) -> str:
    """The result as printed by ``masq-fx bench``."""
    config, lowering = result.config, result.lowering
    linears = len(lowering.lowered) + len(lowering.unlowered)
    lines = [
        (
            f"{result.label}: {len(lowering.lowered)} of {linears} decoder linears on integer kernels; "
            f"{config.threads} threads, {config.runs} interleaved runs after {config.warmup} warm-ups; "
            f"compile + first calls {result.compile_seconds:.0f} s"
        ),
        f"prefill: {config.prompt_tokens}-token prompt; decode: 1 token at cache slot {config.prompt_tokens} of {config.cache_len}",
        latency_table({FP32: result.fp32, result.label: result.quantized}, config.prompt_tokens),
        (
            "int8 GEMMs fused into oneDNN qlinear by inductor (prefill + decode graphs): "
            f"{result.quantized.fused_qlinear} of 2 x {len(lowering.lowered)}"
        ),
        (
            f"decoder linear weights resident: {result.resident_bytes / 2**20:.2f} MiB = {result.resident_ratio:.3f}x "
            f"of FP32 {result.fp32_bytes / 2**20:.2f} MiB"
        ),
    ]
    if result.note is not None:
        lines.append(f"note: {result.note}")
    return "\n".join(lines)
