"""Where masq_fx stands on a GPU, in one run: every tiny family's stages on DEVICE vs the CPU, then bf16 vs
W8A8 vs W4A16 prefill and decode speed of a 3B-shaped model, compiled.

Part 1, tiny families (real HF classes, random weights). For each family the same chain of stages
runs on the CPU (the reference) and on ``--device`` (the probe), each on its own copy of the model:
HF forward · capture + calibrate · each recipe of ``--recipes`` (reference numerics) · for each recipe
of ``--lowered``: save → load round trip, KV-cache generation, lowering to torchao's int8 kernels,
``torch.compile`` of the lowered graph, compiled KV-cache generation. A row gives the logit SQNR of
the probe against the CPU reference of the same stage (tokens: how many equal the CPU's), or the
exception that stopped it (type, the masq_fx frame it came from, message). The reference of a
compiled stage is its eager counterpart on the CPU (the CPU compiles nothing). A stage whose inputs
failed says so; a stage that fails on the CPU too is reported as such.

Part 2, speed: a random Qwen2.5-3B-shaped decoder (Qwen2Config: hidden 2048, intermediate 11008,
36 layers, 16 heads, 2 KV heads, vocabulary 151936; built on the meta device, then ``to_empty`` and
random weights, bfloat16). Three variants of its decoder linears (the LM head stays bfloat16):
bf16, W8A8 (torchao ``Int8DynamicActivationInt8WeightConfig``: int8 weights, dynamic per-token int8
activations) and W4A16 (torchao ``Int4WeightOnlyConfig``, group 128, ``tile_packed_to_4d``: CUDA
only). The model runs through a static-KV-cache decoder step written here over the HF modules
(same math as HF's Qwen2, checked against HF's forward), its decoder layer compiled once with
``torch.compile(fullgraph=True)`` and reused by every layer (regional compilation: minutes less
compile time than the whole model). Prefill: one ``--prompt-tokens`` prompt (batch 1) at cache slot
0, the head on the last position; decode: one token at slot ``--prompt-tokens``, the whole step
replayed as one CUDA graph (on CUDA). Figures are medians of ``--runs`` calls after warm-up; the
table gives each variant's speed-up over bf16 (ratios within this run are what to compare).

Each part runs in its own process (a CUDA error in one cannot poison the other) under a wall-clock
limit, and each stage / variant under its own timeout, so a failing or hanging section reports and
the script goes on. With ``--device cuda`` on one H200 it is meant to finish in under 8 minutes;
``--device cpu`` checks the script itself (tiny families, and a 2-layer, 64-token speed part without
W4A16, for which torchao 0.18 has no CPU kernel).

Run: ``python benchmarks/gpu_check.py --device cuda`` (``--device cpu`` checks the script itself).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # masq_fx from this checkout, installed or not

#: the recipes applied to every tiny family (reference numerics), and those also saved, loaded, lowered and compiled
RECIPES = ("rtn-w8a8", "smoothquant-w8a8", "masquant-w4a8", "masquant-w4a16")
LOWERED = ("masquant-w4a8",)
#: Qwen2.5-3B's text configuration (the speed part's model)
QWEN25_3B = {
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
NEW_TOKENS = 8


class SectionTimeout(BaseException):
    """A stage or variant ran past its timeout (a BaseException, so no ``except Exception`` on the way swallows it)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`SectionTimeout` in the main thread after ``seconds`` (at the next Python bytecode)."""

    def fire(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"timed out after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Budget:
    """The wall-clock seconds a part has left (its parent stops it a little after its limit)."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def timeout(self, cap: float) -> float:
        """``cap`` seconds, or fewer when the part has fewer left."""
        return max(1.0, min(cap, self.left()))


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if "masq_fx" in f.filename or "gpu_check" in f.filename]
    frame = (ours or frames or [None])[-1]
    if frame is None:
        return "?"
    return f"{frame.filename.rsplit('masq_fx', 1)[-1].rsplit('/', 1)[-1]}:{frame.lineno}"


def _failure(error: BaseException) -> str:
    message = next((line for line in str(error).splitlines() if line.strip()), "")[:160]
    return f"{type(error).__name__} at {_where(error)}: {message}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- part 1: tiny families


class NotHere(Exception):
    """A variant this device has no kernel for."""


class Blocked(Exception):
    """A stage cannot run: a stage it needs did not produce its result."""


@dataclass
class Outcome:
    """One stage's result: logits or tokens on the CPU, or why there are none."""

    value: Tensor | None = None
    note: str = ""
    error: str | None = None
    blocked: bool = False
    seconds: float = 0.0


Stage = Callable[[], tuple[Tensor, str]]


def tiny_stages(
    family: str, device: torch.device, recipes: tuple[str, ...], lowered: tuple[str, ...], workdir: Path, compiled: bool, compiles: bool
) -> dict[str, Stage]:
    """Stage name → a function giving that stage's output (and a note) on ``device``, run in order.

    ``compiled``: include the compiled stages, which without ``compiles`` run eagerly (as the reference)."""
    from masq_fx import apply, calibrate, load
    from masq_fx.backends import compile_graph
    from masq_fx.models.tiny import tiny_model

    tiny = tiny_model(family, seed=0, batch_size=2)
    model, batch = tiny.model, tiny.batch
    state: dict[str, Any] = {}
    role = "probe" if compiles else "reference"

    def need(key: str) -> Any:
        if key not in state:
            raise Blocked(f"needs {key}")
        return state[key]

    def hf() -> tuple[Tensor, str]:
        model.to(device)
        with torch.no_grad():
            return model(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}).logits, ""

    def captured() -> tuple[Tensor, str]:
        calibrated = calibrate(model, [batch], recipes=recipes, progress=False, device=device)
        state["calibration"] = calibrated
        with torch.no_grad():
            return calibrated.captured(calibrated.samples[0]), f"{calibrated.captured.capture_seconds:.1f} s capture"

    def recipe(name: str) -> Stage:
        def run() -> tuple[Tensor, str]:
            quantized = apply(need("calibration"), name, progress=False)
            state[name] = quantized
            return quantized.logits(batch), ""

        return run

    def round_trip(name: str) -> Stage:
        def run() -> tuple[Tensor, str]:
            quantized = need(name)
            before = quantized.logits(batch)
            folder = quantized.save(workdir / f"{family}-{role}-{name}")
            loaded = load(folder, model, device=device)
            after = loaded.logits(batch)
            same = "bit-exact" if torch.equal(after, before) else f"max |Δ| {float((after - before).abs().max()):.2e}"
            return after, f"{same} vs before saving"

        return run

    def generate(name: str, lowered_: bool, compiled: bool) -> Stage:
        def run() -> tuple[Tensor, str]:
            quantized = need(f"{name} lowered" if lowered_ else name)
            return quantized.generate(batch, max_new_tokens=NEW_TOKENS, compiled=compiled and compiles), ""

        return run

    def lower(name: str) -> Stage:
        def run() -> tuple[Tensor, str]:
            quantized = need(name)
            report = quantized.lower()
            state[f"{name} lowered"] = quantized
            return quantized.logits(batch), f"{len(report.lowered)} lowered, {len(report.unlowered)} on the reference path"

        return run

    def compiled_graph(name: str) -> Stage:
        def run() -> tuple[Tensor, str]:
            quantized = need(f"{name} lowered")
            if not compiles:
                return quantized.logits(batch), "eager (reference)"
            graph = compile_graph(quantized.decoder)
            with torch.no_grad():
                return graph(*quantized.decoder_inputs(batch).args()), ""

        return run

    stages: dict[str, Stage] = {"HF forward": hf, "capture + calibrate": captured}
    stages |= {name: recipe(name) for name in recipes}
    for name in lowered:
        stages[f"{name} save → load"] = round_trip(name)
        stages[f"{name} generate"] = generate(name, lowered_=False, compiled=False)
        stages[f"{name} lowered"] = lower(name)
        stages[f"{name} lowered generate"] = generate(name, lowered_=True, compiled=False)
        if compiled:
            stages[f"{name} lowered, compiled"] = compiled_graph(name)
            stages[f"{name} lowered generate, compiled"] = generate(name, lowered_=True, compiled=True)
    return stages


def run_stages(stages: dict[str, Stage], device: torch.device, timeout: float, budget: Budget) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}
    for name, stage in stages.items():
        start = time.perf_counter()
        try:
            with deadline(budget.timeout(timeout)):
                value, note = stage()
                _sync(device)
            outcomes[name] = Outcome(value.detach().cpu(), note, seconds=time.perf_counter() - start)
        except Blocked as error:
            outcomes[name] = Outcome(error=str(error), blocked=True)
        except (Exception, SectionTimeout) as error:  # the probe reports every failure and goes on
            outcomes[name] = Outcome(error=_failure(error), seconds=time.perf_counter() - start)
    return outcomes


def compare(reference: Tensor, probe: Tensor) -> str:
    """Logit SQNR in dB, or for token ids how many equal the reference's."""
    from masq_fx.eval.sqnr import sqnr_db

    if reference.shape != probe.shape:
        return f"shape {tuple(probe.shape)} ≠ {tuple(reference.shape)}"
    if not reference.dtype.is_floating_point:
        return f"tokens {int((reference == probe).sum())}/{reference.numel()}"
    value = sqnr_db(reference.float(), probe.float())
    return "inf" if math.isinf(value) else f"{value:.1f} dB"


def tiny_part(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    recipes, lowered = tuple(args.recipes.split(",")), tuple(args.lowered.split(","))
    budget = Budget(args.tiny_limit)
    print(f"{'family':<22}{'stage':<42}{'vs CPU':>16}  note", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        for family in args.families.split(","):
            compiled = args.compile and family in args.compile_families.split(",")
            if budget.left() < (90 if compiled else 30):
                print(f"{family:<22}{'(all)':<42}{'skipped':>16}  the tiny part's time is up (--tiny-limit)", flush=True)
                continue
            try:
                with deadline(budget.timeout(args.stage_timeout)):
                    reference_stages = tiny_stages(family, torch.device("cpu"), recipes, lowered, Path(tmp), compiled, compiles=False)
                    probe_stages = tiny_stages(family, device, recipes, lowered, Path(tmp), compiled, compiles=True)
            except (Exception, SectionTimeout) as error:
                print(f"{family:<22}{'(build)':<42}{'failed':>16}  {_failure(error)}", flush=True)
                continue
            reference = run_stages(reference_stages, torch.device("cpu"), args.stage_timeout, budget)
            probe = run_stages(probe_stages, device, args.stage_timeout, budget)
            for stage, expected in reference.items():
                got = probe[stage]
                if expected.value is None and not expected.blocked:
                    cell, note = "CPU failed", expected.error
                elif got.blocked or expected.blocked:
                    cell, note = "—", f"not run ({got.error or expected.error})"
                elif got.value is None:
                    cell, note = "failed", got.error
                else:
                    assert expected.value is not None
                    cell = compare(expected.value, got.value)
                    note = f"{got.seconds:.1f} s" + (f"; {got.note}" if got.note else "")
                print(f"{family:<22}{stage:<42}{cell:>16}  {note}", flush=True)


# ----------------------------------------------------------------------------- part 2: speed


def random_qwen2(config_fields: dict[str, Any], layers: int, device: torch.device) -> nn.Module:
    """A Qwen2ForCausalLM of ``config_fields`` with ``layers`` layers: built on the meta device, then
    allocated on ``device`` (``to_empty``) and given random bfloat16 weights (seed 0)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**{**config_fields, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)  # to_empty left its buffers uninitialised
    return model.eval()


def layer_step(layer: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, slots: Tensor, mask: Tensor) -> Tensor:
    """One Qwen2 decoder layer on ``x [1, T, hidden]`` writing its keys and values at cache ``slots [T]``
    and attending over the whole cache: HF's math, without its cache object (whose per-layer index
    would make torch.compile recompile for every layer). The query heads sharing a KV head are stacked
    as rows (``groups·T`` rows per KV head, ``mask [1, 1, groups·T, cache]``), so the cache is never copied."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    attention = layer.self_attn
    tokens, kv_heads = x.shape[1], keys.shape[1]
    h = layer.input_layernorm(x)
    q = attention.q_proj(h).view(1, tokens, -1, attention.head_dim).transpose(1, 2)
    k = attention.k_proj(h).view(1, tokens, -1, attention.head_dim).transpose(1, 2)
    v = attention.v_proj(h).view(1, tokens, -1, attention.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys.index_copy_(2, slots, k)
    values.index_copy_(2, slots, v)
    heads = q.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(1, kv_heads, -1, attention.head_dim), keys, values, attn_mask=mask, scale=attention.scaling)
    x = x + attention.o_proj(out.reshape(1, heads, tokens, -1).transpose(1, 2).reshape(1, tokens, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


class CachedStep:
    """The whole model over a static KV cache: ``step(inputs_embeds [1, T, hidden], start)`` → last-position logits."""

    def __init__(self, model: nn.Module, cache_len: int, compiled_layer: Callable[..., Tensor]) -> None:
        config = model.config
        self.model, self.layer = model, compiled_layer
        device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        shape = (1, config.num_key_value_heads, cache_len, config.hidden_size // config.num_attention_heads)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in model.model.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in model.model.layers]
        self.cache_slots = torch.arange(cache_len, device=device)
        self.groups = config.num_attention_heads // config.num_key_value_heads

    def __call__(self, embeds: Tensor, start: Tensor) -> Tensor:
        """``start``: a one-element long tensor on the device (so one CUDA graph serves any slot)."""
        slots = start + torch.arange(embeds.shape[1], device=embeds.device)
        cos, sin = self.model.model.rotary_emb(embeds, slots[None])
        mask = (self.cache_slots[None, :] <= slots.repeat(self.groups)[:, None])[None, None]  # row g·T + t: token t
        x = embeds.clone(memory_format=torch.contiguous_format)  # standard strides: one compiled graph per length
        for layer, keys, values in zip(self.model.model.layers, self.keys, self.values):
            x = self.layer(layer, x, cos, sin, keys, values, slots, mask)
        return self.model.lm_head(self.model.model.norm(x[:, -1:]))


def median_seconds(call: Callable[[], object], device: torch.device, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        call()
    _sync(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cuda_graph(call: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """``call`` captured as one CUDA graph (warmed up on a side stream first); replaying it returns the same output tensor."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()

    def replay() -> Tensor:
        graph.replay()
        return out

    return replay


def quantize_variant(model: nn.Module, variant: str, device: torch.device) -> nn.Module:
    """A copy of ``model`` whose decoder linears are ``variant`` (``bf16``: ``model`` itself)."""
    if variant == "bf16":
        return model
    from torchao.quantization import Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, quantize_

    if variant == "W8A8":
        config: Any = Int8DynamicActivationInt8WeightConfig()
    elif variant == "W4A16":
        if device.type != "cuda":
            raise NotHere("torchao 0.18's int4 weight-only kernels need CUDA (tile_packed_to_4d); see benchmarks/w4a16_cpu.py for the CPU kernel")
        from torchao.quantization.quantize_.workflows.int4.int4_packing_format import Int4PackingFormat

        config = Int4WeightOnlyConfig(group_size=128, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    quantized = copy.deepcopy(model)
    quantize_(quantized.model.layers, config)  # decoder linears only: the (tied) LM head stays bfloat16
    return quantized


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def speed_part(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    layers = args.speed_layers
    prompt_tokens = args.prompt_tokens
    cache_len = prompt_tokens + 16
    name = "Qwen2.5-3B-shaped" + ("" if layers == QWEN25_3B["num_hidden_layers"] else f" ({layers} of 36 layers)")
    print(f"{name} random bf16 decoder on {device}: prefill 1 × {prompt_tokens} tokens, decode 1 token at slot {prompt_tokens}, compiled", flush=True)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    budget = Budget(args.speed_limit)
    start = time.perf_counter()
    try:
        with deadline(budget.timeout(args.variant_timeout)):
            model = random_qwen2(QWEN25_3B, layers, device)
            generator = torch.Generator(device=device).manual_seed(1)
            ids = torch.randint(QWEN25_3B["vocab_size"], (1, prompt_tokens), generator=generator, device=device)
            with torch.no_grad():
                prompt = model.model.embed_tokens(ids)
                check = min(32, prompt_tokens)  # the step against HF's own forward, eagerly
                hf = model(input_ids=ids[:, :check]).logits[:, -1:].float()
                ours = CachedStep(model, cache_len, layer_step)(prompt[:, :check], torch.zeros(1, dtype=torch.long, device=device)).float()
            from masq_fx.eval.sqnr import sqnr_db

            print(f"  built in {time.perf_counter() - start:.1f} s; the cached step vs HF's forward (eager, {check} tokens): "
                  f"{sqnr_db(hf, ours):.1f} dB logit SQNR", flush=True)
    except (Exception, SectionTimeout) as error:
        print(f"  model: failed: {_failure(error)}", flush=True)
        return
    rows: dict[str, tuple[float | None, float | None, str]] = {}
    for variant in args.variants.split(","):
        start = time.perf_counter()
        graphs_before = unique_graphs()
        prefill_s = decode_s = None
        note = ""
        if budget.left() < 40:
            rows[variant] = (None, None, "skipped: the speed part's time is up (--speed-limit)")
            print(f"  {variant}: {rows[variant][2]}", flush=True)
            continue
        try:
            with deadline(budget.timeout(args.variant_timeout)):
                quantized = quantize_variant(model, variant, device)
                torch._dynamo.reset()
                step = CachedStep(quantized, cache_len, torch.compile(layer_step, fullgraph=True, dynamic=False))
                zero = torch.zeros(1, dtype=torch.long, device=device)
                with torch.no_grad():
                    prefill_s = median_seconds(lambda: step(prompt, zero), device, args.runs, warmup=2)  # noqa: B023
                    token = prompt[:, -1:].clone()
                    slot = torch.full((1,), prompt_tokens, dtype=torch.long, device=device)
                    decode = lambda: step(token, slot)  # noqa: B023, E731
                    if device.type == "cuda":
                        try:
                            decode = cuda_graph(decode)
                            note = "decode as one CUDA graph"
                        except Exception as error:  # noqa: BLE001 - timed without the graph then, and said so
                            note = f"decode without a CUDA graph ({_failure(error)})"
                    decode_s = median_seconds(decode, device, args.runs * 5, warmup=3)
                if device.type == "cuda":
                    note += f"; peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
            note = f"{time.perf_counter() - start:.0f} s, {unique_graphs() - graphs_before} graphs compiled" + (f"; {note}" if note else "")
        except NotHere as error:
            note = f"skipped: {error}"
        except (Exception, SectionTimeout) as error:
            note = f"{'failed' if prefill_s is None else 'decode failed'}: {_failure(error)}"
        finally:
            quantized = step = decode = None  # type: ignore[assignment]  # free the variant before the next one
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
        rows[variant] = (prefill_s, decode_s, note)
        print(f"  {variant}: {note}", flush=True)
    base_prefill, base_decode, _ = rows.get("bf16", (None, None, ""))

    def cell(value: float | None, base: float | None, width: int) -> str:
        if value is None:
            return f"{'—':>{width}} {'—':>9}"
        ratio = f"{base / value:>8.2f}x" if base else f"{'—':>9}"
        return f"{1e3 * value:>{width}.2f} {ratio}"

    print(f"  {'variant':<8} {f'prefill {prompt_tokens} ms':>16} {'vs bf16':>9} {'decode ms':>10} {'vs bf16':>9}")
    for variant, (prefill_s, decode_s, _) in rows.items():
        print(f"  {variant:<8} {cell(prefill_s, base_prefill, 16)} {cell(decode_s, base_decode, 10)}", flush=True)


# ----------------------------------------------------------------------------- the run


def environment(device: torch.device) -> str:
    import transformers

    try:
        import torchao

        ao = torchao.__version__
    except Exception as error:  # noqa: BLE001
        ao = f"not importable ({_failure(error)})"
    line = f"torch {torch.__version__}, transformers {transformers.__version__}, torchao {ao}, python {sys.version.split()[0]}, device {device}"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        line += f" ({torch.cuda.get_device_name(device)}, sm_{major}{minor}, bf16 {torch.cuda.is_bf16_supported()})"
    return line


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's pytree deprecations, once per export
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching")  # torchao's subclasses and AOT autograd's cache
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--part", choices=("all", "tiny", "speed"), default="all", help="what to run (all: each part in its own process)")
    parser.add_argument("--families", default=None, help="tiny families, comma-separated (default: every one)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="recipes applied to every tiny family")
    parser.add_argument("--lowered", default=",".join(LOWERED), help="recipes also saved/loaded, lowered, compiled and generated with")
    parser.add_argument("--stage-timeout", type=float, default=90.0, help="seconds one tiny stage may take")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="run the compiled stages (default: on CUDA, not on the CPU)"
    )
    parser.add_argument(
        "--compile-families", default="llama,qwen2.5-omni-thinker", help="the families whose lowered graphs are compiled (minutes each)"
    )
    parser.add_argument("--speed-layers", type=int, default=None, help="decoder layers of the speed model (default: 36 on CUDA, 2 on the CPU)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="prefill length (default: 2048 on CUDA, 64 on the CPU)")
    parser.add_argument("--variants", default="bf16,W8A8,W4A16", help="speed variants, comma-separated")
    parser.add_argument("--runs", type=int, default=None, help="timed prefill calls (decode: 5x as many; default 10 on CUDA, 3 on the CPU)")
    parser.add_argument("--variant-timeout", type=float, default=None, help="seconds one speed variant may take (default: 120 on CUDA, 300 on the CPU)")
    parser.add_argument("--tiny-limit", type=float, default=None, help="wall-clock seconds of the tiny part (default: 230 on CUDA, 1500 on the CPU)")
    parser.add_argument("--speed-limit", type=float, default=None, help="wall-clock seconds of the speed part (default: 200 on CUDA, 900 on the CPU)")
    args = parser.parse_args()
    from masq_fx.models import resolve_device
    from masq_fx.models.tiny import TINY_FAMILIES

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    first = "qwen2.5-omni-thinker"  # the most to check (three modalities, M-RoPE, CMC): first, in case time runs out
    args.families = args.families or ",".join(sorted(TINY_FAMILIES, key=lambda family: family != first))
    args.compile = gpu if args.compile is None else args.compile
    args.speed_layers = args.speed_layers or (36 if gpu else 2)
    args.prompt_tokens = args.prompt_tokens or (2048 if gpu else 64)
    args.runs = args.runs or (10 if gpu else 3)
    args.variant_timeout = args.variant_timeout or (120.0 if gpu else 300.0)
    args.tiny_limit = args.tiny_limit or (230.0 if gpu else 1500.0)
    args.speed_limit = args.speed_limit or (200.0 if gpu else 900.0)
    if args.part == "tiny":
        return tiny_part(args)
    if args.part == "speed":
        return speed_part(args)
    print(environment(device), flush=True)
    limits = {"tiny": args.tiny_limit, "speed": args.speed_limit}
    titles = {"tiny": "part 1: tiny families, each stage on the device vs the CPU", "speed": "part 2: prefill / decode speed, compiled"}
    total = time.perf_counter()
    for part, limit in limits.items():
        print(f"\n== {titles[part]} (at most {limit:.0f} s)", flush=True)
        start = time.perf_counter()
        command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--part", part, "--device", str(device)]  # the last wins
        try:
            done = subprocess.run(command, timeout=limit + 20, check=False)  # the part stops itself at its limit
            status = "" if done.returncode == 0 else f", exit status {done.returncode}"
        except subprocess.TimeoutExpired:
            status = ", stopped at its time limit"
        print(f"== {part}: {time.perf_counter() - start:.0f} s{status}", flush=True)
    print(f"\ntotal {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()
