"""The ``masq-fx`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

# torchao logs missing CUDA-only extension libraries at import; they are irrelevant on CPU
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

DEFAULT_MODELS = ("smollm2", "tiny:qwen2.5-vl")


def _inspect(args: argparse.Namespace) -> int:
    from masq_fx.inspection import inspect_model, load_for_inspection

    models = DEFAULT_MODELS if args.model == "default" else (args.model,)
    for name in models:
        model, samples, title = load_for_inspection(name, samples=args.samples, seq_len=args.seq_len)
        print(inspect_model(model, samples, title=title, top_k=args.top_k, progress=not args.quiet))
        print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="masq-fx",
        description="Modality-aware post-training quantization of multimodal LLMs (MASQuant) as graph transforms.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    inspect = commands.add_parser(
        "inspect",
        help="print per-layer, per-modality activation outliers of a model's decoder",
        description=(
            "Capture the language decoder, run calibration samples through it with modality-partitioned "
            "observers, and print each linear input's per-modality channel abs-max summary. "
            "Example: masq-fx inspect smollm2 --samples 8 --seq-len 256"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    inspect.add_argument(
        "model",
        nargs="?",
        default="default",
        help=(
            "'default' (SmolLM2-135M real weights, then a tiny random Qwen2.5-VL), 'smollm2', "
            "'tiny:FAMILY' (a tiny random model of a supported family), or a local folder holding an HF "
            "causal LM and its tokenizer"
        ),
    )
    inspect.add_argument("--samples", type=int, default=8, help="calibration samples (text windows or tiny batches)")
    inspect.add_argument("--seq-len", type=int, default=256, help="tokens per text calibration window")
    inspect.add_argument("--top-k", type=int, default=4, help="outlier channels listed per site and modality")
    inspect.add_argument("--quiet", action="store_true", help="no progress bars")
    inspect.set_defaults(func=_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as error:
        print(f"masq-fx {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

