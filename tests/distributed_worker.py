"""One rank of tests/test_distributed.py, started as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

It calibrates a tiny model on the test's batches, applies the recipes (JSON files) in one pass, saves each
checkpoint (every rank calls save; rank 0 writes) and writes what it holds to ``OUT/rank{r}.safetensors``:
the whole-graph statistics (second moments included) and each recipe's learned scales and clipping ratios.
With ``--fail-layer L``, rank 1 raises at decoder layer L, to test how the other ranks stop.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from masq_fx import sequential
from masq_fx.api import apply_all, calibrate
from masq_fx.distributed import leave
from masq_fx.modality import Modality
from masq_fx.models.tiny import tiny_model
from masq_fx.nn.quant_linear import QuantLinear

#: calibration batches: the model of seed 0, the batches of seeds 0..5 (uneven over 2 or 4 ranks on purpose)
BATCH_SEEDS = range(5)


def batches(family: str) -> list:
    return [tiny_model(family, seed=seed, batch_size=2).batch for seed in BATCH_SEEDS]


def held(calibrated, applied) -> dict[str, torch.Tensor]:
    """The whole-graph statistics and every recipe's learned parameters, by name."""
    found = {}
    for name, stats in calibrated.stats.items():
        found |= {f"stats.{name}.{key}": t.cpu().clone() for key, t in stats.state_dict().items()}
    for index, quantized in enumerate(applied):
        for module in quantized.decoder.graph_module.modules():
            if isinstance(module, QuantLinear):
                for key in ("scales", "clip_ratios"):
                    value = getattr(module, key)
                    if value is not None:
                        found[f"{index}.{module.name}.{key}"] = value.detach().cpu().clone()
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--family", default="qwen2.5-omni-thinker")
    parser.add_argument("--recipe", type=Path, action="append", default=[])
    parser.add_argument("--fail-layer", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        if args.fail_layer is not None and dist.get_rank() == 1:
            collect = sequential.collect_stats

            def failing(gm, layer=None):
                if layer == args.fail_layer:
                    raise RuntimeError("injected fault")
                return collect(gm, layer)

            sequential.collect_stats = failing  # type: ignore[assignment]
        tiny = tiny_model(args.family, seed=0)
        calibrated = calibrate(tiny.model, batches(args.family), args.recipe, progress=False, moment_modalities=tuple(Modality))
        applied = apply_all(calibrated, args.recipe, progress=False)
        for index, quantized in enumerate(applied):
            quantized.save(args.out / f"checkpoint{index}")
        save_file(held(calibrated, applied), str(args.out / f"rank{dist.get_rank()}.safetensors"))
    finally:
        leave()


if __name__ == "__main__":
    main()
