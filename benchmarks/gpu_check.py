"""Where masq_fx stands on a GPU: each tiny family's float capture and quantized recipes on DEVICE vs the CPU.

For every tiny family (real HF classes, random weights) and each stage (HF forward, capture, calibrate,
apply a recipe, lowering to int8 kernels), the script runs the stage with the model and batch moved
to ``--device`` and prints the logit SQNR against the same stage on the CPU, or the exception that
stopped it (type, message, and the masq_fx frame it came from). masq_fx has no device option yet:
this is the probe that says what a CUDA path must fix, not a claim that it works. A stage that
fails on the CPU too (another torch than the pinned one, say) is reported as such.

Run: ``python benchmarks/gpu_check.py --device cuda`` (``--device cpu`` checks the script itself).
"""

from __future__ import annotations

import argparse
import time
import traceback
from collections.abc import Callable

import torch

from masq_fx import apply, calibrate
from masq_fx.eval.sqnr import sqnr_db
from masq_fx.models.tiny import TINY_FAMILIES, tiny_model

RECIPES = ("rtn-w8a8", "smoothquant-w8a8", "masquant-w8a8", "masquant-w4a8")


def _where(error: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "masq_fx" in f.filename]
    frame = frames[-1] if frames else traceback.extract_tb(error.__traceback__)[-1]
    return f"{frame.filename.rsplit('masq_fx', 1)[-1]}:{frame.lineno}"


def _failure(error: BaseException) -> str:
    message = next((line for line in str(error).splitlines() if line.strip()), "")[:140]
    return f"{type(error).__name__} at {_where(error)}: {message}"


def _stages(family: str, device: str) -> dict[str, Callable[[], torch.Tensor]]:
    """Stage name → a function returning that stage's logits on ``device`` (built lazily, in order)."""
    tiny = tiny_model(family, seed=0, batch_size=2)
    model = tiny.model.to(device)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tiny.batch.items()}
    state: dict[str, object] = {}

    def hf() -> torch.Tensor:
        with torch.no_grad():
            return model(**batch).logits

    def captured() -> torch.Tensor:
        calibrated = calibrate(model, [batch], recipes=RECIPES, progress=False)
        state["calibrated"] = calibrated
        with torch.no_grad():
            return calibrated.captured(calibrated.samples[0])

    def recipe(name: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            quantized = apply(state["calibrated"], name, progress=False)  # type: ignore[arg-type]
            state[name] = quantized
            return quantized.logits(batch)

        return run

    def lowered() -> torch.Tensor:
        quantized = state["masquant-w8a8"]
        quantized.lower()  # type: ignore[attr-defined]
        return quantized.logits(batch)  # type: ignore[attr-defined]

    stages = {"HF forward": hf, "capture + calibrate": captured}
    stages |= {name: recipe(name) for name in RECIPES}
    stages["masquant-w8a8 lowered"] = lowered
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--families", default=",".join(TINY_FAMILIES))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    print(f"{'family':<24}{'stage':<26}{'SQNR vs CPU (dB)':>18}  note")
    for family in args.families.split(","):
        reference = _stages(family, "cpu")
        probe = _stages(family, args.device)
        blocked = False
        for stage, run_cpu in reference.items():
            if blocked:
                print(f"{family:<24}{stage:<26}{'—':>18}  not run (an earlier stage failed)")
                continue
            start = time.perf_counter()
            try:
                expected = run_cpu().float().cpu()
            except Exception as error:  # noqa: BLE001 - the probe reports every failure and goes on
                blocked = True
                print(f"{family:<24}{stage:<26}{'CPU failed':>18}  {_failure(error)}")
                continue
            try:
                got = probe[stage]().float().cpu()
            except Exception as error:  # noqa: BLE001
                blocked = True
                print(f"{family:<24}{stage:<26}{'failed':>18}  {_failure(error)}")
                continue
            print(f"{family:<24}{stage:<26}{sqnr_db(expected, got):>18.1f}  {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
