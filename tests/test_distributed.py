"""Data-parallel calibration (masq_fx.distributed) against the single process it spreads.

Each test starts ranks of ``tests/distributed_worker.py`` as ``torchrun`` would (gloo on the CPU, one
thread each, bounded in time) and compares what they computed with a single-process run here: the
statistics' tables bit for bit (maxima, minima and integer counts reduce exactly), second moments and
learned scales within float rounding of sums taken in another order, the checkpoints' manifests equal
and their logits equal within that rounding.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from masq_fx.api import apply_all, calibrate, load, quantize
from masq_fx.checkpoint import read_manifest
from masq_fx.data.text import token_windows
from masq_fx.distributed import gather_shards, shard
from masq_fx.errors import InputError
from masq_fx.modality import Modality
from masq_fx.models.tiny import tiny_model
from masq_fx.recipes import PRESETS
from masq_fx.transforms.mas import MASLearningConfig

WORKER = Path(__file__).with_name("distributed_worker.py")
sys.path.insert(0, str(WORKER.parent))
from distributed_worker import batches, held  # noqa: E402

FAMILY = "qwen2.5-omni-thinker"
#: GPTQ from reduced second moments; rotation, MAS learning (2 samples a step: one per rank), clipping, CMC
RECIPES = {
    "gptq": PRESETS["smoothquant-w4a8-gptq"],
    "masquant": replace(PRESETS["masquant-w4a8"], learning=replace(PRESETS["masquant-w4a8"].learning, epochs=1, step_samples=2)),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, ranks: int, recipes: list[Path], *extra: str, timeout: float = 420) -> list[subprocess.CompletedProcess]:
    """Run ``ranks`` worker processes to the end (killed after ``timeout`` s) and return them."""
    port = _free_port()
    procs = []
    for rank in range(ranks):
        env = os.environ | {
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
        }
        args = [sys.executable, str(WORKER), str(out), "--family", FAMILY, *(f"--recipe={r}" for r in recipes), *extra]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done


def recipe_files(tmp_path: Path) -> list[Path]:
    paths = []
    for name, recipe in RECIPES.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(recipe.to_dict()))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What 2 gloo ranks computed, and what one process computes from the same batches."""
    tmp = tmp_path_factory.mktemp("ranks")
    done = launch(tmp, 2, recipe_files(tmp))
    for proc in done:
        assert proc.returncode == 0, proc.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tiny = tiny_model(FAMILY, seed=0)
        calibrated = calibrate(tiny.model, batches(FAMILY), list(RECIPES.values()), progress=False, moment_modalities=tuple(Modality))
        applied = apply_all(calibrated, list(RECIPES.values()), progress=False)
        single = tmp / "single"
        for index, quantized in enumerate(applied):
            quantized.save(single / f"checkpoint{index}")
        return tmp, held(calibrated, applied), single, tiny
    finally:
        torch.set_num_threads(threads)


def test_ranks_hold_the_single_process_statistics_and_scales(two_ranks):
    tmp, reference, _, _ = two_ranks
    for rank in range(2):
        found = load_file(str(tmp / f"rank{rank}.safetensors"))
        assert found.keys() == reference.keys()
        assert any(".moment." in k for k in found) and any(k.endswith(".scales") for k in found)
        for key, expected in reference.items():
            if ".moment." in key or key.endswith((".scales", ".clip_ratios")):  # float sums in another order
                scale = expected.abs().max().clamp_min(1e-30)
                assert float((found[key] - expected).abs().max() / scale) <= 1e-6, key
            else:  # maxima, minima, integer counts: exact
                assert torch.equal(found[key], expected), key


def test_rank_zero_writes_the_single_process_checkpoint(two_ranks):
    tmp, _, single, tiny = two_ranks
    sample = tiny.batch
    for index in range(len(RECIPES)):
        ours, theirs = read_manifest(tmp / f"checkpoint{index}"), read_manifest(single / f"checkpoint{index}")
        assert ours["calibration"] == theirs["calibration"] and ours["calibration"]["samples"] == 5
        assert ours["recipe"] == theirs["recipe"] and ours["graph"] == theirs["graph"]
        got = load(tmp / f"checkpoint{index}", tiny.model).logits(sample)
        expected = load(single / f"checkpoint{index}", tiny.model).logits(sample)
        assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-5


def test_a_failing_rank_stops_every_rank_with_where_and_nothing_is_written(tmp_path):
    done = launch(tmp_path, 2, recipe_files(tmp_path)[:1], "--fail-layer", "1", timeout=180)
    assert all(proc.returncode != 0 for proc in done)
    assert "rank 0: reducing the observers' statistics at decoder layer 1 failed" in done[0].stderr
    assert "injected fault" in done[1].stderr and "raised on rank 1 of 2, at decoder layer 1" in done[1].stderr
    assert not list(tmp_path.glob("checkpoint*")) and not list(tmp_path.glob("rank*"))


def test_shards_are_balanced_by_tokens_and_put_back_in_order(monkeypatch):
    from masq_fx import distributed

    items = list(range(7))
    costs = [[100, 0, 0], [10, 0, 0], [10, 0, 0], [10, 0, 0], [100, 0, 0], [10, 0, 0], [10, 0, 0]]
    assert distributed.assign(costs) == (0,) * 7  # no process group
    assert shard(items, ()) == items and gather_shards(items, ()) == items
    monkeypatch.setattr(distributed, "ranks", lambda: distributed.Ranks(1, 3))
    owners = distributed.assign(costs)
    # one of every 3 consecutive items to each rank; the second long item goes to a rank without the first
    assert sorted(owners[:3]) == sorted(owners[3:6]) == [0, 1, 2] and owners[0] != owners[4]
    assert owners == (0, 1, 2, 2, 1, 0, 2)
    assert shard(items, owners) == [1, 4]
    monkeypatch.setattr(distributed, "gather", lambda value: [[0, 5], value, [2, 3, 6]])
    assert gather_shards([1, 4], owners) == items
    with pytest.raises(InputError, match="3 ranks but only 2 calibration batches"):
        shard([0, 1], (0, 1))


def test_token_balance_follows_each_modality(monkeypatch):
    """Audio and text batches alternate, so taking every other batch would give one rank all the audio."""
    from masq_fx import distributed

    costs = [[0, 0, 400], [300, 0, 0]] * 4
    monkeypatch.setattr(distributed, "ranks", lambda: distributed.Ranks(0, 2))
    owners = distributed.assign(costs)
    for modality in (0, 2):
        assert [sum(c[modality] for c, o in zip(costs, owners) if o == r) for r in (0, 1)] == [sum(c[modality] for c in costs) // 2] * 2


def test_mas_steps_must_spread_evenly_over_the_ranks():
    with pytest.raises(ValueError, match="step_samples must be at least 1"):
        MASLearningConfig(step_samples=0)


@pytest.mark.slow
def test_torchrun_quantize_writes_the_single_process_checkpoint(tmp_path, smollm2, one_thread):
    """``torchrun -m masq_fx quantize`` on real SmolLM2 weights, 2 gloo ranks: rank 0 alone prints and writes, and
    writes what one process writes (SmoothQuant's scales come from maxima, which reduce exactly)."""
    model, tokenizer = smollm2
    options = ["--recipe", "smoothquant-w8a8", "--compare", "--calib-samples", "4", "--seq-len", "64", "--no-eval", "--threads", "1", "--device", "cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "masq_fx", "quantize", "smollm2"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    ranks = subprocess.run([*torchrun, *options, "--out", str(tmp_path / "ranks")], capture_output=True, text=True, env=env, timeout=600)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert ranks.stdout.count("saved ") == 1 and ranks.stdout.count("quantized in") == 1
    # the same calibration windows in this one process (masq_fx.app.sources makes them so for 'smollm2')
    windows = token_windows(tokenizer, "calibration", window=64, count=4)
    quantize(model, "smoothquant-w8a8", [{"input_ids": w[None], "attention_mask": torch.ones_like(w[None])} for w in windows], progress=False).save(tmp_path / "single")
    ours, theirs = (load_file(str(tmp_path / d / "quantized.safetensors")) for d in ("ranks", "single"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert read_manifest(tmp_path / "ranks")["calibration"] == read_manifest(tmp_path / "single")["calibration"]


def test_owners_balance_the_costliest_tasks_first(monkeypatch):
    from masq_fx import distributed

    assert distributed.owners([5.0, 1.0, 4.0, 2.0]) == [0, 0, 0, 0]  # no process group
    monkeypatch.setattr(distributed, "ranks", lambda: distributed.Ranks(0, 2))
    assert distributed.owners([5.0, 1.0, 4.0, 2.0]) == [0, 0, 1, 1]  # loads 6 and 6
