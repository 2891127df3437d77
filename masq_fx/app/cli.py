"""The ``masq-fx`` command line: ``quantize``, ``eval``, ``generate``, ``inspect``, ``bench``."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

# before torch and torchao are imported: torchao logs the CUDA-only extension libraries it cannot load
# on a CPU machine, and torch's pytree warns that torchao registers enums the old way; neither matters here
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from masq_fx.errors import CalibrationMemoryError, InputError, MasqFxError, MissingFileError, OutputExistsError  # noqa: E402

DEFAULT_RECIPE = "masquant-w4a8"
DEFAULT_COMPARE = ("smoothquant-w4a8-gptq",)  # the same weight solver as the default recipe
#: calibration batches the run report's per-layer SQNR is measured on
REPORT_SAMPLES = 4
MODEL_HELP = (
    "'default' (the built-in tri-modal thinker: SmolLM2-135M with trained vision and audio towers), "
    "'smollm2' (SmolLM2-135M-Instruct, text), 'tiny:FAMILY' (a tiny random model of a supported family) "
    "or a local HF model folder (a supported family; multimodal with its processor, text-only with its tokenizer)"
)
CHECKPOINT_MODEL_HELP = MODEL_HELP + "; by default the model the checkpoint was quantized from (masq-fx quantize records it)"


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _print_rows(rows: dict[str, dict[str, float]], as_json: bool) -> None:
    print(json.dumps(rows, indent=2, sort_keys=False) if as_json else _table(rows))


def _sizes(args: argparse.Namespace):
    from masq_fx.app.sources import Sizes

    # a command without calibration options builds one calibration sample; without evaluation ones, no items
    return Sizes(calibration=getattr(args, "calib_samples", 1), evaluation=getattr(args, "eval_items", 1), seq_len=getattr(args, "seq_len", Sizes.seq_len))


def _table(rows: dict[str, dict[str, float]]) -> str:
    metrics = list(dict.fromkeys(m for scores in rows.values() for m in scores))
    lines = [f"{'model':<20}" + "".join(f"{m:>20}" for m in metrics)]
    for name, scores in rows.items():
        cells = [f"{100 * v:>19.1f}%" if "exact match" in m else f"{v:>20.3f}" for m, v in ((m, scores[m]) for m in metrics)]
        lines.append(f"{name:<20}" + "".join(cells))
    return "\n".join(lines)


#: free disk space --out must have at least, besides the checkpoint's estimate (the report, the staging copy's slack)
MIN_FREE_BYTES = 16 * 2**20


def _source_name(model: str) -> str:
    """How a checkpoint records ``model`` (its ``source``): a name as given, a local folder as its absolute path."""
    from masq_fx.app.sources import TINY_PREFIX

    if model in ("default", "smollm2") or model.startswith(TINY_PREFIX) or not Path(model).is_dir():
        return model
    return str(Path(model).resolve())


def _weight_file_bytes(model: str) -> int | None:
    """Bytes of ``model``'s float weight files, found without loading it (None: unknown).

    A rough upper bound of the checkpoint: integer codes (4 or 8 bits), scales and low-rank factors
    take less than the float weights they replace. Tiny random models are negligible (0).
    """
    from masq_fx.app.sources import TINY_PREFIX

    if model.startswith(TINY_PREFIX):
        return 0
    if model in ("default", "smollm2"):
        try:
            from masq_fx.builtin.smollm2 import smollm2_gguf_path

            return smollm2_gguf_path().stat().st_size
        except Exception:  # the model's own loading explains missing weights
            return None
    folder = Path(model)
    files = [f for f in folder.glob("*") if f.suffix in (".safetensors", ".bin", ".gguf", ".pt")] if folder.is_dir() else []
    return sum(f.stat().st_size for f in files) or None


def _check_output(out: Path, overwrite: bool, model: str) -> None:
    """Refuse, before anything is loaded, an --out that saving would refuse or could not write."""
    import os
    import shutil
    import tempfile

    from masq_fx.checkpoint import check_target

    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{out} exists: pass --overwrite to replace it, or choose another --out")
    check_target(out, overwrite, "--overwrite")  # only a checkpoint or an empty folder is ever replaced
    ancestor = out.absolute().parent  # the checkpoint is staged beside --out, in folders created as needed
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"cannot create --out {out}: {ancestor} is a file, not a folder; choose another --out")
    unwritable = f"cannot write --out {out}: {ancestor} is not writable"
    fix = "choose another --out, or make the folder writable"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{unwritable}; {fix}")
    try:  # os.access does not know every reason (read-only mounts, ACLs): try it
        handle, probe = tempfile.mkstemp(dir=ancestor, prefix=".masq-fx-probe.", suffix=".tmp")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise InputError(f"{unwritable} ({error.strerror}); {fix}") from None
    estimate = _weight_file_bytes(model)
    need = MIN_FREE_BYTES + (estimate or 0)  # no estimate for an unknown model: only the floor is checked
    free = shutil.disk_usage(ancestor).free
    if free < need:
        raise InputError(
            f"not enough free disk for the checkpoint in {ancestor}: {free / 2**20:.0f} MiB free, about "
            f"{need / 2**20:.0f} MiB needed; free some space, or choose an --out on another disk"
        )


def _check_calibration(path: Path | None) -> None:
    """Read every --calib sample (JSON, keys, media files present) before the model is loaded."""
    from masq_fx.data.samples import read_samples

    if path is not None:
        read_samples(path)


def _quantize(args: argparse.Namespace) -> int:
    from masq_fx.api import apply_all, calibrate
    from masq_fx.app.run_report import build as build_report
    from masq_fx.app.sources import load_source
    from masq_fx.distributed import is_leader
    from masq_fx.recipes import resolve_recipe

    leader = is_leader()  # in a torchrun group, rank 0 alone checks --out, evaluates, writes and prints
    say = print if leader else lambda *_: None
    # everything that can be checked without the model is, before the model loads and calibrates
    recipes = {name: resolve_recipe(name) for name in (args.recipe, *args.compare)}  # fail fast on a bad name
    if args.rotate is not None:
        from masq_fx.transforms.rotation import RotationConfig

        recipes[args.recipe] = replace(recipes[args.recipe], rotation=RotationConfig(seed=args.rotate))
    suffix = "" if args.rotate is None else "-rot"
    out = Path(args.out or f"runs/{args.model.replace(':', '-').replace('/', '_')}-{args.recipe}{suffix}")
    if leader:
        _check_output(out, args.overwrite, args.model)
    _check_calibration(args.calib)
    import torch

    # the checkpoint records the dtype; eval, generate and bench load the model in it
    sizes = replace(_sizes(args), calibration_tokens=args.calib_tokens)
    source = load_source(args.model, sizes, args.calib, getattr(torch, args.dtype), args.device, progress=not args.quiet)
    say(f"{source.title}\nrecipe {args.recipe} → {out}")
    # one capture; the float graph is the FP32 row and the report's SQNR reference
    calibrated = calibrate(
        source.model, source.calibration, recipes.values(), progress=not args.quiet, data_hashes=source.calibration_hashes
    )
    evaluate = leader and not args.no_eval
    rows: dict[str, dict[str, float]] = {}
    if evaluate:
        rows["FP32" if args.dtype == "float32" else "BF16"] = source.evaluate(calibrated.captured)
    # every recipe in one layer-by-layer pass: the float statistics are computed once for all of them;
    # each finished layer is kept in the progress folder until the checkpoint is saved
    args.progress_folder = out.with_name(f"{out.name}.progress")
    if (args.progress_folder / "run.json").exists():
        say(f"continuing the interrupted run kept in {args.progress_folder}")
    start = time.perf_counter()
    applied = apply_all(calibrated, list(recipes.values()), progress=not args.quiet, resume=args.progress_folder)
    say(f"{', '.join(recipes)}: quantized in {time.perf_counter() - start:.0f} s")
    report = None
    for name, quantized in zip(recipes, applied):
        if name == args.recipe:
            # published with the checkpoint (its metrics filled in at the end): an interrupt after saving
            # never leaves a checkpoint without its report, nor a replaced one's old report
            if leader:
                report = build_report(
                    quantized,
                    title=f"{source.title}: {name}",
                    samples=calibrated.samples[:REPORT_SAMPLES],
                    reference=calibrated.captured,
                    progress=not args.quiet,
                )
            quantized.save(out, overwrite=args.overwrite, source=_source_name(args.model), extra_files=None if report is None else report.write)
            if leader:
                shutil.rmtree(args.progress_folder)
            say(f"saved {out}")
        if evaluate:
            rows[name] = source.evaluate(quantized.decoder)
    if rows:
        _print_rows(rows, args.json)
    if report is not None:
        print(f"report {replace(report, metrics=rows).write(out)}")
    return 0


def _checkpoint_dtype(directory: Path):
    """The dtype the checkpoint's model was quantized in (``quantize --dtype``)."""
    import torch

    from masq_fx.checkpoint import read_manifest

    return getattr(torch, read_manifest(directory)["model"]["dtype"])


def _checkpoint_model(args: argparse.Namespace) -> str:
    """``--model``, or else the model the checkpoint ``args.directory`` records; reads (and so checks) the
    checkpoint's manifest first, before any model is loaded."""
    from masq_fx.app.sources import TINY_PREFIX
    from masq_fx.checkpoint import read_manifest

    manifest = read_manifest(args.directory)
    if args.model is not None:
        return args.model
    source = manifest.get("source")
    if not isinstance(source, str):
        raise InputError(
            f"{args.directory} does not record the model it was quantized from (it was saved through the Python "
            "API, not masq-fx quantize): pass --model MODEL"
        )
    if source not in ("default", "smollm2") and not source.startswith(TINY_PREFIX) and not Path(source).is_dir():
        raise InputError(
            f"{args.directory} was quantized from the model folder {source}, which no longer exists: pass --model "
            "with the folder it moved to"
        )
    return source


def _eval(args: argparse.Namespace) -> int:
    from masq_fx.api import load
    from masq_fx.app.sources import load_source
    from masq_fx.capture.decoder import capture

    if args.data is not None:
        return _eval_data(args)
    args.model = _checkpoint_model(args)
    source = load_source(args.model, _sizes(args), dtype=_checkpoint_dtype(args.directory), device=args.device, progress=not args.quiet)
    quantized = load(args.directory, source.model)
    rows = {"FP32": source.evaluate(capture(source.model)), str(args.directory): source.evaluate(quantized.decoder)}
    print(source.title)
    _print_rows(rows, args.json)
    return 0


def _eval_data(args: argparse.Namespace) -> int:
    """Exact match per modality on the samples of ``args.data`` that have an answer, never on calibration samples."""
    from masq_fx.api import load
    from masq_fx.app.sources import exact_match_per_kind, load_source
    from masq_fx.checkpoint import calibration_hashes
    from masq_fx.data.samples import read_samples, require_unseen
    from masq_fx.eval.accuracy import DecoderFn, eager_decoder

    samples = [s for s in read_samples(args.data) if s.answer is not None]
    if not samples:
        raise InputError(f"no sample in {args.data} has an 'answer': exact match needs JSONL lines with \"answer\"")
    require_unseen(samples, calibration_hashes(args.directory), str(args.directory))
    args.model = _checkpoint_model(args)
    source = load_source(args.model, _sizes(args), dtype=_checkpoint_dtype(args.directory), device=args.device, progress=not args.quiet)
    quantized = load(args.directory, source.model)
    decoders: dict[str, DecoderFn] = {"FP32": eager_decoder(source.model), str(args.directory): quantized.decoder}
    rows = {
        name: {f"{kind} exact match": score.value for kind, score in exact_match_per_kind(source, decoder, samples).items()}
        for name, decoder in decoders.items()
    }
    print(f"{source.model.__class__.__name__} ({args.model}), {len(samples)} samples with answers from {args.data}")
    _print_rows(rows, args.json)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from masq_fx.api import load
    from masq_fx.app.sources import load_source
    from masq_fx.eval.accuracy import reply_tokens

    for option, path in (("--image", args.image), ("--audio", args.audio)):
        if path is not None and not path.is_file():
            kind = "PNG/JPEG image" if option == "--image" else "16 kHz WAV"
            raise MissingFileError(f"{option} {path} does not exist: give the path of a {kind} file")
    source = load_source(_checkpoint_model(args), dtype=_checkpoint_dtype(args.directory), device=args.device)
    batch = source.prompt(args.prompt, args.image, args.audio)
    quantized = load(args.directory, source.model)
    if args.int8:
        print(quantized.lower())
    tokens = quantized.generate(batch, max_new_tokens=args.max_new_tokens, stop_id=source.stop_id)
    for row in tokens.tolist():
        print(source.decode(reply_tokens(row, source.stop_id)))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from masq_fx.app.inspect import inspect_model
    from masq_fx.app.sources import load_source
    from masq_fx.models import adapter_for

    source = load_source(args.model, _sizes(args), device=args.device)
    adapter = adapter_for(source.model)
    samples = [adapter.decoder_inputs(batch) for batch in source.calibration]
    print(inspect_model(source.model, samples, title=source.title, top_k=args.top_k, progress=not args.quiet))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from masq_fx.api import load
    from masq_fx.app.bench import BenchConfig, bench, format_table
    from masq_fx.app.sources import Sizes, load_source

    config = BenchConfig(prompt_tokens=args.prompt_tokens, runs=args.runs, threads=args.threads)
    sizes = Sizes(calibration=1, evaluation=1, eval_windows=1)
    source = load_source(_checkpoint_model(args), sizes, dtype=_checkpoint_dtype(args.directory), device=args.device)
    quantized = load(args.directory, source.model)
    print(source.title)
    print(format_table(bench(quantized, config, progress=not args.quiet)))
    return 0


def _list(args: argparse.Namespace) -> int:
    from masq_fx.models import supported_families
    from masq_fx.models.tiny import TINY_FAMILIES
    from masq_fx.recipes import PRESETS

    print("presets:")
    for name, recipe in PRESETS.items():
        print(f"  {name:<24}{recipe.label}")
    print("families (a local HF folder of one of these): " + ", ".join(supported_families()))
    print("models by name: default (built-in tri-modal thinker), smollm2 (SmolLM2-135M-Instruct), " + ", ".join(f"tiny:{f}" for f in TINY_FAMILIES))
    return 0


def _device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default=None, help="where the model runs: cpu, cuda or cuda:N (default: cuda when available, else cpu)"
    )


def _check_device(args: argparse.Namespace) -> None:
    """Resolve ``--device`` (its default included) and refuse one this machine lacks, before any model is loaded."""
    if not hasattr(args, "device"):
        return
    from masq_fx.models.device import default_device, resolve_device

    args.device = resolve_device(default_device() if args.device is None else args.device)


def _data_options(parser: argparse.ArgumentParser, calib: int | None, evaluation: bool) -> None:
    """The data size options of a command that calibrates (``calib``: its default sample count) and/or evaluates."""
    if calib is not None:
        parser.add_argument("--calib-samples", type=_positive_int, default=calib, help="calibration samples (per modality for 'default', with half as many reference-text windows; text windows otherwise)")
        parser.add_argument("--seq-len", type=_positive_int, default=256, help="tokens per text calibration window")
    if evaluation:
        parser.add_argument("--eval-items", type=_positive_int, default=64, help="evaluation questions per modality ('default')")


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="masq-fx",
        description="Modality-aware post-training quantization of multimodal LLMs (MASQuant) as graph transforms.",
        formatter_class=formatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    listing = commands.add_parser("list", help="list the presets, supported families and models known by name", formatter_class=formatter)
    listing.set_defaults(func=_list)

    quantize = commands.add_parser(
        "quantize",
        help="quantize a model, save the checkpoint and print FP vs quantized metrics",
        description=(
            "Capture the language decoder, calibrate, apply the recipe, save a checkpoint, and evaluate FP32, "
            "the recipe and the --compare recipes per modality. Example: masq-fx quantize default "
            "--recipe masquant-w4a8 --out runs/w4a8"
        ),
        formatter_class=formatter,
    )
    quantize.add_argument("model", nargs="?", default="default", help=MODEL_HELP)
    quantize.add_argument("--recipe", default=DEFAULT_RECIPE, help="preset name (see masq_fx.PRESETS) or a recipe .json file")
    quantize.add_argument("--compare", nargs="*", default=list(DEFAULT_COMPARE), help="further recipes to evaluate (not saved)")
    quantize.add_argument(
        "--rotate", nargs="?", type=int, const=0, default=None, metavar="SEED",
        help="rotate the float graph before --recipe (residual stream, value heads, online down_proj Hadamard; seeded, default 0)",
    )  # fmt: skip
    quantize.add_argument("--out", default=None, help="checkpoint folder (default: runs/MODEL-RECIPE, -rot when rotated)")
    quantize.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint folder")
    quantize.add_argument("--no-eval", action="store_true", help="skip the evaluation")
    quantize.add_argument("--quiet", action="store_true", help="no progress bars")
    quantize.add_argument("--threads", type=_positive_int, default=None, help="torch intra-op threads (default: torch's; the checkpoint records it, results reproduce at the same count)")
    quantize.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    quantize.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="the float model's dtype while it is quantized (activations between linears)"
    )
    _data_options(quantize, calib=32, evaluation=True)
    quantize.add_argument(
        "--calib", type=Path, default=None, help="calibration samples: a JSONL file or a folder (default: the model's built-in calibration split)"
    )
    quantize.add_argument(
        "--calib-tokens", type=int, default=None, help="token budget of the --calib samples, split equally between their modalities"
    )
    _device_option(quantize)
    quantize.set_defaults(func=_quantize)

    evaluate = commands.add_parser(
        "eval",
        help="evaluate a saved checkpoint against FP32",
        description="Load a checkpoint onto its model and print FP32 vs quantized metrics. Example: masq-fx eval runs/w4a8",
        formatter_class=formatter,
    )
    evaluate.add_argument("directory", type=Path, help="a folder written by masq-fx quantize")
    evaluate.add_argument("--model", default=None, help=CHECKPOINT_MODEL_HELP)
    evaluate.add_argument(
        "--data", type=Path, default=None, help="evaluate exact match per modality on this JSONL file's samples with an 'answer' instead"
    )
    _data_options(evaluate, calib=None, evaluation=True)
    evaluate.add_argument("--threads", type=_positive_int, default=None, help="torch intra-op threads (default: torch's)")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    _device_option(evaluate)
    evaluate.set_defaults(func=_eval)

    generate = commands.add_parser(
        "generate",
        help="answer a prompt with a saved checkpoint",
        description=(
            "Load a checkpoint and generate greedily through the KV-cache graph. Example: "
            "masq-fx generate runs/w4a8 --image seven.png"
        ),
        formatter_class=formatter,
    )
    generate.add_argument("directory", type=Path, help="a folder written by masq-fx quantize")
    generate.add_argument("--model", default=None, help=CHECKPOINT_MODEL_HELP)
    generate.add_argument("--prompt", default=None, help="a text prompt")
    generate.add_argument("--image", type=Path, default=None, help="an image file (PNG/JPEG), for 'default' and image models")
    generate.add_argument("--audio", type=Path, default=None, help="a 16-bit WAV file (16 kHz for 'default', the processor's rate for a folder), for audio models")
    generate.add_argument("--max-new-tokens", type=_positive_int, default=16, help="tokens to generate at most")
    generate.add_argument("--int8", action="store_true", help="run W8A8/W4A8 linears on torchao int8 kernels, W4A16 on the int4 CPU kernel")
    _device_option(generate)
    generate.set_defaults(func=_generate)

    inspect = commands.add_parser(
        "inspect",
        help="print per-layer, per-modality activation outliers of a model's decoder",
        description=(
            "Capture the language decoder, run calibration samples through it with modality-partitioned "
            "observers, and print each linear input's per-modality channel abs-max summary. "
            "Example: masq-fx inspect smollm2 --calib-samples 8 --seq-len 256"
        ),
        formatter_class=formatter,
    )
    inspect.add_argument("model", nargs="?", default="default", help=MODEL_HELP)
    inspect.add_argument("--top-k", type=_positive_int, default=4, help="outlier channels listed per site and modality")
    inspect.add_argument("--quiet", action="store_true", help="no progress bars")
    inspect.add_argument("--threads", type=_positive_int, default=None, help="torch intra-op threads (default: torch's)")
    _data_options(inspect, calib=8, evaluation=False)
    _device_option(inspect)
    inspect.set_defaults(func=_inspect)

    speed = commands.add_parser(
        "bench",
        help="time a saved checkpoint against FP32 on --device (prefill and decode, compiled)",
        description=(
            "Load a checkpoint, put its W8A8/W4A8 linears on torchao int8 kernels, compile the FP32 and the "
            "quantized KV-cache graphs and print median prefill and decode latency, measured interleaved. "
            "Compiling takes minutes on SmolLM2. Example: masq-fx bench runs/w4a8 --model default --runs 20"
        ),
        formatter_class=formatter,
    )
    speed.add_argument("directory", type=Path, help="a folder written by masq-fx quantize")
    speed.add_argument("--model", default=None, help=CHECKPOINT_MODEL_HELP)
    speed.add_argument("--prompt-tokens", type=_positive_int, default=512, help="prompt length of the prefill, and cache filled before the decoded token")
    speed.add_argument("--runs", type=_positive_int, default=20, help="timed runs of each graph (the table shows medians)")
    speed.add_argument("--threads", type=_positive_int, default=2, help="torch intra-op threads while compiling and timing")
    speed.add_argument("--quiet", action="store_true", help="no progress bars")
    _device_option(speed)
    speed.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "threads", None) is not None and args.command != "bench":  # bench scopes its own threads
        import torch

        torch.set_num_threads(args.threads)
    # library warnings (e.g. a modality absent from calibration) as one plain line, not a source location
    warnings.formatwarning = lambda message, *_, **__: f"masq-fx {args.command}: warning: {message}\n"
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # model loading's bars too
    from masq_fx.distributed import launched, leave

    name = f"masq-fx {args.command}"
    try:
        _check_device(args)
        if launched():
            name = _join_ranks(args)
        return args.func(args)
    except CalibrationMemoryError as error:
        print(f"{name}: error: {error} (lower --calib-samples, --calib-tokens or --seq-len)", file=sys.stderr)
        return 1
    except MasqFxError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        kept = getattr(args, "progress_folder", None)
        if kept is not None and kept.exists():
            print(f"{name}: interrupted; the finished layers are kept in {kept}: run the same command again to continue", file=sys.stderr)
        else:
            print(f"{name}: interrupted; nothing partial was written (checkpoints and reports are published atomically)", file=sys.stderr)
        return 130
    finally:
        leave()


def _join_ranks(args: argparse.Namespace) -> str:
    """Join the process group ``torchrun`` started this process in (``quantize`` only); the name errors carry."""
    from masq_fx.distributed import join, local_device

    if args.command != "quantize":
        raise InputError(f"only quantize runs on several processes: run masq-fx {args.command} as one process, without torchrun")
    args.device = local_device(args.device)
    group = join(args.device)
    if group.rank != 0:  # rank 0 alone shows progress and prints
        args.quiet = True
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return f"masq-fx {args.command} (rank {group.rank} of {group.size})"


if __name__ == "__main__":
    sys.exit(main())
