"""The device option: explicit CPU runs, CUDA refused clearly where there is none, device-independent
checkpoints, and generation caches and graph tables that follow the model's device (CPU-only checks)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import safetensors.torch
import torch

from masq_fx import calibrate, load, quantize
from masq_fx.app.cli import main
from masq_fx.errors import InputError
from masq_fx.generation import capture_cached
from masq_fx.models import model_device, place, resolve_device
from masq_fx.models.device import check_dtype
from masq_fx.models.tiny import tiny_model
from masq_fx.nn.quant_linear import QuantLinear

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


@pytest.fixture(scope="module")
def llama():
    tiny = tiny_model("llama", seed=0, batch_size=2)
    return tiny.model, tiny.batch


@pytest.fixture(scope="module")
def quantized(llama):
    model, batch = llama
    return quantize(model, "masquant-w8a8", [batch], progress=False, device="cpu")


def test_explicit_cpu_device_runs_every_stage(llama, quantized, one_thread):
    model, batch = llama
    assert quantized.device == model_device(model) == torch.device("cpu")
    logits = quantized.logits(batch)
    assert logits.device.type == "cpu" and torch.isfinite(logits).all()
    assert quantized.generate(batch, max_new_tokens=2).shape == (2, 2)
    tables = [t for m in quantized.decoder.graph_module.modules() if isinstance(m, QuantLinear) for t in (m.scales, m.row_of_modality)]
    assert all(t.device.type == "cpu" for t in tables if t is not None) and any(t is not None for t in tables)


def test_generation_cache_follows_the_model_device(llama, monkeypatch):
    model, _ = llama
    from transformers import StaticCache

    devices = []
    original = StaticCache.early_initialization

    def record(self, batch_size, num_heads, head_dim, dtype, device):
        devices.append(device)
        return original(self, batch_size, num_heads, head_dim, dtype, device)

    monkeypatch.setattr(StaticCache, "early_initialization", record)
    cached = capture_cached(model, batch_size=1, max_cache_len=8)
    caches = {name: b for name, b in cached.graph_module.named_buffers() if "cache" in name}
    assert devices == [model_device(model)]
    assert caches and all(b.device == model_device(model) for b in caches.values())


def test_library_has_no_hard_coded_cpu_device():
    """Tensors the library creates follow their inputs' device; only the device helpers name the CPU (and the
    collectives of a gloo process group, which run there)."""
    root = Path(__file__).resolve().parents[1] / "masq_fx"
    found = []
    for path in root.rglob("*.py"):
        if path.relative_to(root).as_posix() in ("models/device.py", "distributed.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.device" and any(
                isinstance(a, ast.Constant) and a.value == "cpu" for a in node.args
            ):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, f"torch.device('cpu') hard-coded at {found}"


@no_cuda
def test_cuda_without_cuda_is_refused_before_any_work(monkeypatch):
    tiny = tiny_model("llama", seed=0, batch_size=1)
    monkeypatch.setattr("masq_fx.api.capture", lambda *a, **k: pytest.fail("captured despite the bad device"))
    with pytest.raises(InputError, match=r"CUDA is not available.*use the CPU \(--device cpu, device='cpu'\)"):
        calibrate(tiny.model, [tiny.batch], device="cuda")
    with pytest.raises(InputError, match="CUDA is not available"):
        quantize(tiny.model, "rtn-w8a8", [tiny.batch], device="cuda:0")
    assert model_device(tiny.model).type == "cpu", "the model is not moved"


@pytest.mark.parametrize(
    ("device", "message"), [("gpu", "unknown device 'gpu': use 'cpu' or 'cuda'"), ("mps", "not supported: masq_fx runs on 'cpu' or 'cuda'")]
)
def test_unknown_devices_are_refused(device, message):
    with pytest.raises(InputError, match=message):
        resolve_device(device)


def test_a_dtype_the_device_cannot_run_is_refused(monkeypatch):
    check_dtype(torch.device("cpu"), torch.bfloat16)

    def refuse(x, weight, bias=None):
        raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')

    monkeypatch.setattr("masq_fx.models.device.F.linear", refuse)
    with pytest.raises(InputError, match=r"cpu cannot run float16 linears.*use float32 \(--dtype float32\)"):
        check_dtype(torch.device("cpu"), torch.float16)


@no_cuda
@pytest.mark.parametrize("command", [["quantize", "tiny:llama", "--no-eval"], ["inspect", "tiny:llama"], ["generate", "ckpt"], ["eval", "ckpt"], ["bench", "ckpt"]])
def test_cli_device_cuda_without_cuda_is_one_line_before_loading(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("masq_fx.app.sources.load_source", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main([*command, "--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"masq-fx {command[0]}: error: device 'cuda' requested") and "--device cpu" in err


def test_checkpoints_are_saved_from_the_cpu_and_load_on_the_requested_device(llama, quantized, tmp_path, one_thread):
    model, batch = llama
    quantized.save(tmp_path / "ckpt")  # the writer copies each tensor to the CPU before writing its bytes
    assert safetensors.torch.load_file(str(tmp_path / "ckpt" / "quantized.safetensors"))  # device-independent
    loaded = load(tmp_path / "ckpt", model, device="cpu")
    assert loaded.device.type == "cpu"
    gm = loaded.decoder.graph_module
    assert all(t.device.type == "cpu" for t in (*gm.parameters(), *gm.buffers()))
    assert torch.equal(loaded.logits(batch), quantized.logits(batch))


def test_place_moves_a_model_and_keeps_one_already_there(llama):
    model, _ = llama
    before = next(model.parameters())
    assert place(model) == torch.device("cpu")
    assert place(model, "cpu") == torch.device("cpu")
    assert next(model.parameters()) is before, "a model already on the device is left as it is"
