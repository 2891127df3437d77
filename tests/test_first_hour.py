"""A user's first hour: checkpoints vouch for their manifest, eval/generate/bench find the model in the
checkpoint, ``quantize`` checks its inputs and output before the long work, and an interrupt after
saving never loses the run report."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import safetensors.torch

import masq_fx.app.sources
from masq_fx import checkpoint
from masq_fx.app.cli import main
from masq_fx.checkpoint import CheckpointError, load, read_manifest
from masq_fx.models.tiny import tiny_model
from masq_fx.recipes import Recipe, resolve_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "tiny:qwen2.5-omni-thinker"
QUICK = ["--compare", "--no-eval", "--quiet"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, one_thread) -> Path:
    """A 4-bit checkpoint written by ``masq-fx quantize`` (read-only for the tests: they copy it)."""
    out = tmp_path_factory.mktemp("saved") / "w4a8"
    assert main(["quantize", TINY, "--recipe", "smoothquant-w4a8", *QUICK, "--out", str(out)]) == 0
    return out


@pytest.fixture
def copied(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "copy"))


@pytest.fixture(scope="module")
def omni():
    return tiny_model("qwen2.5-omni-thinker", seed=0, batch_size=2)


def leftovers(folder: Path, *expected: str) -> list[str]:
    """Entries of ``folder`` other than ``expected`` (partial files, staging or probe files, output folders)."""
    return sorted(p.name for p in folder.iterdir() if p.name not in expected)


def edit_manifest(directory: Path, edit, *, resign: bool) -> None:
    """Apply ``edit`` to the manifest; ``resign``: also record the edited manifest's hash in the tensor file
    (a deliberate, consistent-looking edit, so that the records' own checks are what refuses it)."""
    path = directory / checkpoint.MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    text = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    path.write_bytes(text)
    if resign:
        tensors = safetensors.torch.load_file(directory / checkpoint.TENSORS)
        metadata = {checkpoint.MANIFEST_SHA256_KEY: hashlib.sha256(text).hexdigest()}
        (directory / checkpoint.TENSORS).write_bytes(safetensors.torch.save(tensors, metadata=metadata))


def first_linear(manifest: dict) -> tuple[str, dict]:
    name = sorted(n for n in manifest["graph"]["linears"] if n != "lm_head")[0]
    return name, manifest["graph"]["linears"][name]


# ----------------------------------------------------------------------------- 1. manifest integrity


def test_the_manifest_hash_is_recorded_and_saving_stays_deterministic(saved, tmp_path, omni):
    from masq_fx.api import quantize

    manifest = read_manifest(saved)
    assert manifest["format_version"] == checkpoint.FORMAT_VERSION == 5 and "content_sha256" in manifest["tensors"]
    with open(saved / checkpoint.TENSORS, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"][checkpoint.MANIFEST_SHA256_KEY] == hashlib.sha256((saved / checkpoint.MANIFEST).read_bytes()).hexdigest()

    qm = quantize(omni.model, "smoothquant-w4a8", [omni.batch], progress=False)
    first, second = qm.save(tmp_path / "a"), qm.save(tmp_path / "b")
    for name in (checkpoint.TENSORS, checkpoint.MANIFEST):
        assert (first / name).read_bytes() == (second / name).read_bytes()


@pytest.mark.parametrize("field", ["act_bits", "weight_symmetric"])
def test_an_edited_manifest_is_refused(copied, omni, capsys, field):
    def edit(manifest):
        _, record = first_linear(manifest)
        if field == "act_bits":
            record["state"]["act_quant"]["bits"] = 6
        else:
            record["state"]["weight_quant"]["grid"] = "restricted"

    edit_manifest(copied, edit, resign=False)
    expected = r"manifest\.json was modified after saving.*restore the original manifest\.json.*quantize the model again"
    with pytest.raises(CheckpointError, match=expected):
        load(copied, omni.model)
    with pytest.raises(CheckpointError, match=expected):
        read_manifest(copied)  # so eval --data's calibration hashes are vouched for too
    assert main(["eval", str(copied), "--model", TINY]) == 1
    error = capsys.readouterr().err
    assert error.startswith("masq-fx eval: error: ") and error.count("\n") == 1 and "manifest.json" in error


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(out_features=r["out_features"] * 2), r"the record says \[\d+, \d+\] \(out, in features\), the model's linear is"),
        (lambda r: r["state"]["weight_quant"].update(bits=8), r"8-bit codes of .* are stored as int8 .* but .*codes is uint8"),
        (lambda r: r["state"]["weight_quant"].update(bits=2), r"outside the recorded 2-bit grid"),
        (lambda r: r["state"]["weight_quant"].update(group_size=8), r"scale is \[\d+, 1\], the recorded quantizer needs"),
        (lambda r: r.update(stored_rows=[*r["stored_rows"], 7]), r"needs the tensor 'linear/.*/weight/7/codes', which the file lacks"),
    ],
)
def test_manifest_records_that_disagree_with_the_tensors_are_refused(copied, omni, change, message):
    edit_manifest(copied, lambda manifest: change(first_linear(manifest)[1]), resign=True)
    name = first_linear(read_manifest(copied))[0]
    with pytest.raises(CheckpointError, match=rf"disagrees with quantized\.safetensors and the model at linear {name}: .*{message}.*quantize the model again"):
        load(copied, omni.model)


def test_a_tensor_file_without_the_manifest_hash_is_refused(copied, omni):
    tensors = safetensors.torch.load_file(copied / checkpoint.TENSORS)
    (copied / checkpoint.TENSORS).write_bytes(safetensors.torch.save(tensors))
    with pytest.raises(CheckpointError, match="records no manifest hash.*quantize the model again"):
        load(copied, omni.model)


def test_format_version_2_still_loads(copied, omni, saved):
    """Version 2: no manifest hash, the tensor file checked by its bytes and whole-file sha256."""
    tensors = safetensors.torch.load_file(copied / checkpoint.TENSORS)
    data = safetensors.torch.save(tensors)
    (copied / checkpoint.TENSORS).write_bytes(data)

    def as_v2(manifest):
        manifest["format_version"] = 2
        manifest["tensors"] = {"file": checkpoint.TENSORS, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        del manifest["source"]

    edit_manifest(copied, as_v2, resign=False)
    assert read_manifest(copied)["format_version"] == checkpoint.FORMAT_VERSION
    batch = omni.batch
    import torch

    from masq_fx.api import load as api_load

    assert torch.equal(api_load(copied, omni.model).logits(batch), api_load(saved, omni.model).logits(batch))
    data = bytearray(data)
    data[-5] ^= 0xFF
    (copied / checkpoint.TENSORS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is corrupt: its sha256"):
        load(copied, omni.model)



def test_format_version_3_loads_as_unrotated(copied, omni, saved):
    """Version 3 is version 4 without a rotation record."""
    edit_manifest(copied, lambda manifest: manifest.update(format_version=3), resign=True)
    import torch

    from masq_fx.api import load as api_load

    assert torch.equal(api_load(copied, omni.model).logits(omni.batch), api_load(saved, omni.model).logits(omni.batch))

# ----------------------------------------------------------------------------- 2. the model from the checkpoint


def test_eval_and_generate_use_the_model_the_checkpoint_records(saved, tmp_path, capsys, omni):
    assert read_manifest(saved)["source"] == TINY
    assert main(["eval", str(saved)]) == 0
    assert "logit SQNR dB" in capsys.readouterr().out
    assert main(["generate", str(saved), "--max-new-tokens", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert main(["generate", str(saved), "--prompt", "hi"]) == 1
    assert "no tokenizer" in capsys.readouterr().err

    from masq_fx.api import quantize

    api_saved = quantize(omni.model, "rtn-w8a8", [omni.batch], progress=False).save(tmp_path / "api")
    assert "source" not in read_manifest(api_saved)
    for command in ("eval", "generate", "bench"):
        assert main([command, str(api_saved)]) == 1
        error = capsys.readouterr().err
        assert f"masq-fx {command}: error:" in error and "does not record the model" in error and "pass --model MODEL" in error
    assert main(["eval", str(api_saved), "--model", TINY]) == 0


def test_a_local_model_folder_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    from masq_fx.app.cli import _source_name

    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert _source_name("my-model") == str(tmp_path.resolve() / "my-model")
    assert _source_name("default") == "default" and _source_name(TINY) == TINY


# ----------------------------------------------------------------------------- 3. checks before the long work


@pytest.fixture
def no_model(monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(masq_fx.app.sources, "load_source", loaded)


def quantize_fails(args: list[str], capsys) -> str:
    start = time.perf_counter()
    assert main(["quantize", TINY, *QUICK, *args]) == 1
    assert time.perf_counter() - start < 10
    error = capsys.readouterr().err
    assert error.startswith("masq-fx quantize: error: ") and error.count("\n") == 1
    return error


def write_jsonl(path: Path, *lines: str) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_a_bad_calibration_file_fails_before_the_model_loads(tmp_path, capsys, no_model):
    calib = write_jsonl(tmp_path / "calib.jsonl", '{"text": "hello"}', '{"text": "unterminated')
    error = quantize_fails(["--calib", calib, "--out", str(tmp_path / "out")], capsys)
    assert "calib.jsonl line 2 is not valid JSON" in error and "write one JSON object per line" in error
    assert leftovers(tmp_path, "calib.jsonl") == []


def test_a_missing_media_file_fails_before_the_model_loads(tmp_path, capsys, no_model):
    calib = write_jsonl(tmp_path / "calib.jsonl", '{"text": "hello"}', '{"image": "img/7.png", "answer": "7"}')
    error = quantize_fails(["--calib", calib, "--out", str(tmp_path / "out")], capsys)
    assert "line 2: image 'img/7.png' not found" in error and "paths are relative to the JSONL file's folder" in error
    assert leftovers(tmp_path, "calib.jsonl") == []


def test_an_out_under_a_file_fails_before_the_model_loads(tmp_path, capsys, no_model):
    (tmp_path / "runs").write_text("a file where a folder should be")
    error = quantize_fails(["--out", str(tmp_path / "runs" / "sub" / "w4a8")], capsys)
    assert f"{tmp_path / 'runs'} is a file, not a folder" in error and "choose another --out" in error
    assert leftovers(tmp_path, "runs") == []


def test_an_unwritable_out_fails_before_the_model_loads(tmp_path, capsys, no_model, monkeypatch):
    parent = tmp_path / "locked"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != parent and real_access(path, mode, **kw))
    error = quantize_fails(["--out", str(parent / "new" / "w4a8")], capsys)
    assert f"{parent} is not writable" in error and "make the folder writable" in error
    assert leftovers(tmp_path, "locked") == [] and leftovers(parent) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes through a 0o555 folder")
def test_a_read_only_folder_fails_before_the_model_loads(tmp_path, capsys, no_model):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        error = quantize_fails(["--out", str(parent / "w4a8")], capsys)
    finally:
        parent.chmod(0o755)
    assert f"{parent} is not writable" in error and leftovers(parent) == []


def test_a_failing_write_probe_fails_before_the_model_loads(tmp_path, capsys, no_model, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    error = quantize_fails(["--out", str(tmp_path / "w4a8")], capsys)
    assert "is not writable (Permission denied)" in error and leftovers(tmp_path) == []


def test_a_full_disk_fails_before_the_model_loads(tmp_path, capsys, no_model, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    error = quantize_fails(["--out", str(tmp_path / "w4a8")], capsys)
    assert "not enough free disk" in error and "1 MiB free" in error and "free some space" in error
    assert leftovers(tmp_path) == []


def test_an_out_that_is_no_checkpoint_fails_before_the_model_loads(tmp_path, capsys, no_model):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    error = quantize_fails(["--out", str(tmp_path / "notes"), "--overwrite"], capsys)
    assert "is not a masq_fx checkpoint directory" in error and "choose another directory" in error
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine" and leftovers(tmp_path, "notes") == []
    error = quantize_fails(["--out", str(tmp_path / "notes")], capsys)
    assert "pass --overwrite to replace it" in error


def test_generate_checks_its_media_before_the_model_loads(saved, tmp_path, capsys, no_model):
    for option in ("--image", "--audio"):
        assert main(["generate", str(saved), option, str(tmp_path / "missing")]) == 1
        error = capsys.readouterr().err
        assert f"{option} {tmp_path / 'missing'} does not exist: give the path of a" in error


# ----------------------------------------------------------------------------- 4. interrupt after saving


def test_an_interrupt_after_saving_keeps_the_checkpoint_and_its_report(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ckpt"
    assert main(["quantize", TINY, "--recipe", "rtn-w8a8", *QUICK, "--out", str(out)]) == 0
    assert "rtn-w8a8" in (out / "report.md").read_text()
    save = checkpoint.save

    def save_then_interrupt(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_interrupt)
    assert main(["quantize", TINY, "--recipe", "smoothquant-w8a8", *QUICK, "--out", str(out), "--overwrite"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert Recipe.from_dict(read_manifest(out)["recipe"]) == resolve_recipe("smoothquant-w8a8"), "the new checkpoint"
    report = (out / "report.md").read_text()
    assert "smoothquant-w8a8" in report and "rtn-w8a8" not in report, "the new checkpoint's own report"
    # the finished layers stay until the checkpoint is saved and the progress folder removed (interrupted between the two here)
    assert (out / "sqnr.png").is_file() and leftovers(tmp_path, "ckpt", "ckpt.progress") == []


def test_model_folders_the_command_line_cannot_use_are_refused_plainly(tmp_path, capsys):
    from masq_fx.models.tiny import tiny_model

    multimodal = tmp_path / "vl"
    tiny_model("qwen2.5-vl", seed=0).model.save_pretrained(multimodal)
    text = tmp_path / "text"
    tiny_model("llama", seed=0).model.save_pretrained(text)  # weights and config, no tokenizer
    capsys.readouterr()
    expected = {
        multimodal: "holds a multimodal Qwen2_5_VLForConditionalGeneration but no processor",
        text: "has no usable tokenizer",
        tmp_path: "needs a config.json",
    }
    for folder, message in expected.items():
        assert main(["quantize", str(folder), "--out", str(tmp_path / "out"), "--quiet"]) == 1
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error
