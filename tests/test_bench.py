"""``masq_fx.app.bench`` and ``masq-fx bench`` on a tiny Llama checkpoint saved to a temporary folder."""

from __future__ import annotations

import math

import pytest
import torch

from masq_fx import PRESETS, load, quantize
from masq_fx.app.bench import (
    BenchConfig,
    BenchResult,
    GraphTiming,
    bench,
    format_table,
    interleaved_medians,
    intra_op_threads,
    measure,
    resident_linear_bytes,
    text_prompt,
)
from masq_fx.app.cli import main
from masq_fx.backends import LoweringReport
from masq_fx.generation import capture_cached
from masq_fx.modality import Modality
from masq_fx.models import adapter_for
from masq_fx.models.tiny import tiny_model

TINY = "tiny:llama"
LINEARS = [f"layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved rtn-w8a8 checkpoint of the tiny Llama (the model ``masq-fx --model tiny:llama`` builds) and that model."""
    tiny = tiny_model("llama", seed=0, batch_size=2)
    directory = tmp_path_factory.mktemp("bench") / "w8a8"
    quantize(tiny.model, "rtn-w8a8", [tiny.batch], progress=False).save(directory)
    return directory, tiny.model


def _result(lowering: LoweringReport) -> BenchResult:
    return BenchResult(
        config=BenchConfig(prompt_tokens=16),
        label="mas W4A8",
        fp32=GraphTiming(prefill_s=0.02, decode_s=0.004, fused_qlinear=0),
        quantized=GraphTiming(prefill_s=0.01, decode_s=0.002, fused_qlinear=4),
        lowering=lowering,
        resident_bytes=1 << 20,
        fp32_bytes=4 << 20,
        compile_seconds=3.0,
    )


@pytest.mark.slow
def test_bench_times_compiled_fp32_and_int8_graphs(checkpoint, one_thread):
    directory, model = checkpoint
    result = bench(load(directory, model), BenchConfig(prompt_tokens=16, runs=2, warmup=1, threads=1), progress=False)
    for timing in (result.fp32, result.quantized):
        assert 0 < timing.prefill_s < math.inf and 0 < timing.decode_s < math.inf
    assert math.isfinite(result.prefill_speedup) and math.isfinite(result.decode_speedup)
    assert result.prefill_speedup == result.fp32.prefill_s / result.quantized.prefill_s
    assert sorted(result.lowering.lowered) == sorted(LINEARS) and not result.lowering.unlowered and result.note is None
    assert result.fp32.fused_qlinear == 0 and 0 <= result.quantized.fused_qlinear <= 2 * len(LINEARS)
    assert 0.25 <= result.resident_ratio < 0.3, "one byte per weight plus per-channel scales"
    assert result.compile_seconds > 0 and torch.get_num_threads() == 1
    table = format_table(result)
    assert "rtn W8A8: 14 of 14 decoder linears on integer kernels" in table
    assert [line.split()[0] for line in table.splitlines()[3:5]] == ["fp32", "rtn"]


def test_cli_bench_loads_the_checkpoint_and_prints_the_table(checkpoint, monkeypatch, capsys):
    import masq_fx.app.bench

    directory, _ = checkpoint
    called = {}
    result = _result(LoweringReport(lowered=LINEARS))

    def fake_bench(quantized, config, progress):
        called.update(recipe=quantized.recipe, config=config, progress=progress)
        return result

    monkeypatch.setattr(masq_fx.app.bench, "bench", fake_bench)
    args = ["bench", str(directory), "--model", TINY, "--prompt-tokens", "16", "--runs", "3", "--threads", "1", "--quiet"]
    assert main(args) == 0
    assert called == {"recipe": PRESETS["rtn-w8a8"], "config": BenchConfig(prompt_tokens=16, runs=3, threads=1), "progress": False}
    assert format_table(result) in capsys.readouterr().out


def test_cli_bench_refuses_bad_options_and_documents_them(tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:  # refused by the parser, before anything loads
        main(["bench", str(tmp_path), "--model", TINY, "--runs", "0"])
    assert refused.value.code == 2 and "--runs: must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Example: masq-fx bench" in text
    for option in ("--model", "--prompt-tokens", "--runs", "--threads"):
        assert option in text
    assert text.count("(default:") >= 4


@pytest.mark.parametrize("field", ["prompt_tokens", "decode_slots", "runs", "threads"])
def test_config_refuses_sizes_below_one(field):
    with pytest.raises(ValueError, match=f"BenchConfig.{field} must be at least 1, got 0"):
        BenchConfig(**{field: 0})
    with pytest.raises(ValueError, match="BenchConfig.warmup must be at least 0, got -1"):
        BenchConfig(warmup=-1)
    assert BenchConfig(prompt_tokens=16, decode_slots=4).cache_len == 20


def test_measure_refuses_a_wrong_prompt_or_graph(checkpoint, one_thread):
    _, model = checkpoint
    config = BenchConfig(prompt_tokens=8, decode_slots=4)
    adapter = adapter_for(model)
    graph = capture_cached(model, batch_size=1, max_cache_len=16)
    with pytest.raises(ValueError, match=r"one row of 8 tokens \(BenchConfig.prompt_tokens\), got 1 x 5"):
        measure({"fp32": graph}, text_prompt(adapter, 5), config, progress=False)
    with pytest.raises(ValueError, match=r"'fp32' holds 1 rows and 16 cache slots: .*max_cache_len=12\)"):
        measure({"fp32": graph}, text_prompt(adapter, 8), config, progress=False)


def test_text_prompt_is_one_row_of_text_tokens(checkpoint):
    _, model = checkpoint
    adapter = adapter_for(model)
    prompt = text_prompt(adapter, 12)
    assert prompt.inputs_embeds.shape == (1, 12, adapter.text_config().hidden_size)
    assert torch.equal(prompt.modality_ids, torch.full((1, 12), int(Modality.TEXT)))
    assert torch.equal(prompt.position_ids, torch.arange(12)[None]) and prompt.num_tokens == 12
    assert torch.equal(text_prompt(adapter, 12).inputs_embeds, prompt.inputs_embeds), "same seed, same prompt"


def test_interleaved_medians_alternate_and_skip_the_warmup():
    order: list[str] = []
    medians = interleaved_medians({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, runs=3, warmup=2, progress=False)
    assert order == ["a", "b"] * 5
    assert set(medians) == {"a", "b"} and all(0 <= m < 1 for m in medians.values())


def test_intra_op_threads_restores_the_count_even_on_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), intra_op_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == before


def test_resident_bytes_of_reference_and_int8_linears(checkpoint):
    directory, model = checkpoint
    quantized = load(directory, model)
    held, fp32 = resident_linear_bytes(quantized.decoder.graph_module)
    assert fp32 == sum(4 * m.in_features * m.out_features for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert held == fp32, "the reference path holds one float weight per linear"
    quantized.lower()
    held, fp32_lowered = resident_linear_bytes(quantized.decoder.graph_module)
    assert fp32_lowered == fp32 and 0.25 * fp32 <= held < 0.3 * fp32


def test_table_ratios_and_notes():
    full = _result(LoweringReport(lowered=LINEARS))
    assert (full.prefill_speedup, full.decode_speedup, full.resident_ratio) == (2.0, 2.0, 0.25)
    table = format_table(full)
    assert "mas W4A8: 14 of 14 decoder linears on integer kernels" in table and "note:" not in table
    assert "4 of 2 x 14" in table and "1.00 MiB = 0.250x of FP32 4.00 MiB" in table
    assert "2.00x" in table.splitlines()[4]
    partial = _result(LoweringReport(lowered=LINEARS[1:], unlowered={LINEARS[0]: "asymmetric weights"}))
    assert format_table(partial).endswith("note: 1 linears stay on the reference (fake-quant) path (asymmetric weights)")
    none = _result(LoweringReport(unlowered={name: "weight-only W4A16" for name in LINEARS}))
    assert "no linear runs on int8 kernels (weight-only W4A16): the quantized figures time the reference" in format_table(none)
