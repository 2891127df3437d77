"""Checkpoints of quantized decoders: one safetensors file of quantized state plus a JSON manifest.

:func:`save` writes ``directory/`` atomically (a temporary sibling directory, fsynced, then renamed);
:func:`load` captures a float model afresh and replays the stored results onto it. Nothing is
pickled: tensors are safetensors, everything else JSON.

The results live in the transformed graph's modules, keyed by module name, and are read from there
(:func:`masq_fx.replay.graph_edits`): each QuantLinear's :class:`~masq_fx.nn.quant_linear.QuantLinearState`,
scale table, row map, integer weights and CMC factors (a :class:`~masq_fx.replay.LinearRecord`), the
router nodes of tied per-modality smoothing, and graph parameters that differ from the HF model's
(norm weights a smoothing was folded into). :func:`load` turns the files back into those edits and
replays them onto a fresh capture (:func:`masq_fx.replay.replay`): each float linear becomes a
QuantLinear with the recorded state, the routers share their tables, and the graph gets its own
copies of the replaced parameters.

``quantized.safetensors`` (keys by module name, relative to the decoder)::

    scales/<owner>                          smoothing table [rows, in] (shared tables once, under
                                            the first linear, in graph order, that holds them)
    linear/<name>/row_of_modality           int64 [3]: modality → scale row
    linear/<name>/weight/<row>/codes        integer codes [out, in]: int8, or for ≤ 4 bits uint8
                                            [out, ⌈in/2⌉] with two codes per byte (low nibble first)
    linear/<name>/weight/<row>/scale        float32 [out, groups]
    linear/<name>/weight/<row>/zero_point   int8 [out, groups] (asymmetric weights only)
    linear/<name>/cmc/<row>/left, right     float32 CMC factors [in, r], [r, out]
    linear/<name>/cmc/<row>/left/codes, …/left/scale, …/right/codes, …/right/scale
                                            integer CMC factors (``branch_bits`` in the manifest):
                                            Lᵀ [r, in] and Rᵀ [out, r], codes as the weights' (packed
                                            at ≤ 4 bits), float32 scales [r, 1] and [out, 1]
    router/<first linear>/row_of_modality   int64 [3] of a tied per-modality router node
    graph/<attribute>                       a graph parameter a transform replaced (the γ/s of a
                                            smoothing folded into a norm), by its graph path

``<row>`` is the scale row whose weight the linear stores (0 if unsmoothed; only the text row
after CMC; every row in the MAS per-row simulation); codes of GPTQ-solved weights are the solver's.

``manifest.json`` (sorted keys, no timestamps): ``format``/``format_version``; ``recipe``
(:meth:`Recipe.to_dict`); ``versions`` of torch, torchao, transformers, safetensors, masq_fx;
``model`` (family, HF class, the decoder's dtype, sha256 of the config and of the float weights); ``modality_tokens``;
``calibration`` (sample count, tokens per modality, sha256 of the input tensors, ``sample_sha256``:
the content hashes of the calibration samples when known, see :mod:`masq_fx.data.samples`); ``tensors``
(file name, ``content_sha256``: :func:`tensors_sha256` of the stored tensors sorted by key); ``source``
(only when the saver gave one: the command-line model name it was quantized from, which ``masq-fx
eval/generate/bench`` reload); ``graph``: per linear its shape, ``state``
(:meth:`QuantLinearState.to_dict <masq_fx.nn.quant_linear.QuantLinearState.to_dict>`: quantizer
configs, static activation scale, stored weight rows, flags), table key, stored and branch rows and
``branch_bits``; the routers; the replaced graph attributes; ``rotation`` (format 4, rotated graphs only); ``sparsity`` (format 5, sparsified graphs only). The same
inputs and seed give the same bytes.

Integrity: ``manifest.json`` and ``quantized.safetensors`` vouch for each other. The manifest records
a content hash of the tensors (names, dtypes, shapes, bytes), and the safetensors file's
``__metadata__`` records the sha256 of the manifest's bytes (:data:`MANIFEST_SHA256_KEY`). No
circularity: the tensor hash covers the tensors, not the file's header where the manifest hash lives.
An edited manifest (e.g. a linear's activation bits changed by hand) is refused on reading, since it
would otherwise load silently with other numerics; records that disagree with the tensors or the
model (shapes, bit widths) are refused too, before anything is replayed.

Format versions: 5 (this one): ``graph.sparsity`` records the float graph's activation sparsity (its
:class:`~masq_fx.transforms.sparsity.SparsityConfig` and :class:`~masq_fx.transforms.sparsity.SparsityPlan`;
the LaRoSA bases and TEAL thresholds are the tensors ``sparsity/bases`` and ``sparsity/thresholds``), re-applied
like the rotation; a sparsified float model (method ``fp``) has no linear records. Version 4 is version 5 without
sparsity (read as is): ``graph.rotation`` records the float graph's rotation (its
:class:`~masq_fx.transforms.rotation.RotationConfig` and :class:`~masq_fx.transforms.rotation.RotationPlan`),
which :func:`load` re-applies to the fresh capture before replaying; version 3 is version 4 with no
rotation (read as is). Version 2 is version 3 without the manifest hash: its ``tensors``
record holds the file's ``bytes`` and ``sha256`` (of the whole file), which is still how its tensor
file is checked; it is read as is (migration is free: nothing else changed), only its manifest is
not covered. Version 1 (per-linear flags and configs at the record's top level,
static activation scales as tensors, ``quantizers_enabled``; ``sample_sha256``, the model's ``dtype``
and ``branch_bits`` possibly absent) is migrated on reading (:func:`read_manifest`); a newer version
is refused.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import safetensors.torch
import torch
from torch import Tensor, fx, nn
from transformers import PretrainedConfig

from masq_fx.calibration.calibrate import calibration_tokens
from masq_fx.capture.decoder import CapturedDecoder, capture
from masq_fx.distributed import gather_shards, is_leader
from masq_fx.errors import InputError
from masq_fx.files import fsync_directory, write_bytes_atomically, write_safetensors
from masq_fx.modality import Modality
from masq_fx.models import DecoderInputs, adapter_for, model_device
from masq_fx.nn.quant_linear import QuantLinear, QuantLinearState, branch_factor_config
from masq_fx.quantizers import QuantizedWeight, WeightQuantConfig
from masq_fx.recipes import Recipe
from masq_fx.replay import GraphEdits, LinearRecord, Router, check_float_weights, graph_edits, replay
from masq_fx.transforms.rotation import RotationConfig, RotationPlan
from masq_fx.transforms.sparsity import SparsityConfig, SparsityPlan, SparsityRecord

if TYPE_CHECKING:
    from masq_fx.pipeline import Context

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "EncodedEdits",
    "LinearBytes",
    "calibration_hashes",
    "calibration_record",
    "check_target",
    "decode_edits",
    "encode_edits",
    "library_versions",
    "linear_bytes",
    "load",
    "model_identity",
    "pack_int4",
    "read_manifest",
    "save",
    "tensors_sha256",
    "unpack_int4",
]

FORMAT = "masq_fx.checkpoint"
FORMAT_VERSION = 5
TENSORS = "quantized.safetensors"
MANIFEST = "manifest.json"
#: key of the safetensors ``__metadata__`` entry holding the sha256 of ``manifest.json``'s bytes (format 3)
MANIFEST_SHA256_KEY = "masq_fx.manifest_sha256"
_LIBRARIES = ("torch", "torchao", "transformers", "safetensors", "masq_fx")
#: config keys that name where or with what a model was saved, not what it is
_VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version"})
_HEAD = "lm_head"


class CheckpointError(InputError):
    """A checkpoint cannot be written, read, or applied to the given model (a :class:`ValueError` too)."""


# ----------------------------------------------------------------------------- 4-bit packing


def pack_int4(codes: Tensor) -> Tensor:
    """Signed codes in ``[-8, 7]`` ``[..., n]`` → uint8 ``[..., ⌈n/2⌉]``, element ``2i`` in the low nibble."""
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError(f"4-bit codes must lie in [-8, 7], got [{int(codes.min())}, {int(codes.max())}]")
    nibbles = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    if nibbles.shape[-1] % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1))
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: Tensor, columns: int) -> Tensor:
    """Inverse of :func:`pack_int4`: int8 codes ``[..., columns]``."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)[..., :columns]
    return ((nibbles.to(torch.int16) ^ 8) - 8).to(torch.int8)


# ----------------------------------------------------------------------------- hashes and identity


def tensors_sha256(named: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 of named tensors (name, dtype, shape and bytes of each, in the given order)."""
    digest = hashlib.sha256()
    for name, tensor in named:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _stable_config(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stable_config(v) for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(value, (list, tuple)):
        return [_stable_config(v) for v in value]
    return value


def model_identity(model: nn.Module, weights: bool = True) -> dict[str, str]:
    """Family, HF class, decoder dtype, sha256 of the config (without paths and versions) and, if ``weights``, of
    the weights (which reads them all).

    A bfloat16 model and its float32 twin are different models: integer codes are dtype-independent,
    but a checkpoint replays exactly only onto the dtype it was quantized in (the codes come from
    that dtype's weights, folded norm weights are stored in it, the graph computes in it).
    """
    cls = type(model)
    adapter = adapter_for(model)
    config = json.dumps(_stable_config(cast(PretrainedConfig, model.config).to_dict()), sort_keys=True, default=str)
    identity = {
        "family": adapter.family,
        "hf_class": f"{cls.__module__}.{cls.__qualname__}",
        "dtype": str(next(adapter.language_model().parameters()).dtype).removeprefix("torch."),
        "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
    }
    if weights:
        identity["weights_sha256"] = tensors_sha256(sorted(model.state_dict().items()))
    return identity


def calibration_record(samples: Sequence[DecoderInputs], data_hashes: Sequence[str], ranks: Sequence[int] = ()) -> dict[str, Any]:
    """What the checkpoint records of its calibration set: every rank's samples, in a process group (``ranks``:
    the rank holding each)."""
    fields = ("inputs_embeds", "position_ids", "modality_ids", "attention_mask")
    local = [(tensors_sha256((f, getattr(s, f)) for f in fields), calibration_tokens([s])) for s in samples]
    everyone = gather_shards(local, ranks)
    digest = hashlib.sha256("".join(d for d, _ in everyone).encode())  # of each sample's, in calibration order
    return {
        "samples": len(everyone),
        "tokens": {m.name.lower(): sum(t[m] for _, t in everyone) for m in Modality},
        "sha256": digest.hexdigest(),
        "sample_sha256": list(data_hashes),
    }


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that made the checkpoint (informational; ``"not installed"`` for
    one imported from a source checkout without being installed)."""
    found = {}
    for name in _LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


# ----------------------------------------------------------------------------- collect (save)


@dataclass
class EncodedEdits:
    """Graph edits as stored: safetensors tensors and the manifest's ``graph`` record (JSON)."""

    tensors: dict[str, Tensor]
    graph: dict[str, Any]


class _Tables:
    """Smoothing tables, each stored once under the first linear (graph order) that holds it."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors = tensors
        self.keys: dict[int, str] = {}

    def key(self, scales: Tensor, owner: str) -> str:
        if id(scales) not in self.keys:
            self.keys[id(scales)] = owner
            self.tensors[f"scales/{owner}"] = scales.detach().float().clone()
        return self.keys[id(scales)]


def _store_weight(tensors: dict[str, Tensor], prefix: str, weight: QuantizedWeight) -> None:
    codes = weight.qdata.to(torch.int8)
    tensors[f"{prefix}/codes"] = pack_int4(codes) if weight.config.bits <= 4 else codes  # read, never written: not copied
    tensors[f"{prefix}/scale"] = weight.scale.detach().float().clone()
    if weight.zero_point is not None:
        tensors[f"{prefix}/zero_point"] = weight.zero_point.to(torch.int8).clone()


def _store_linear(name: str, linear: LinearRecord, tables: _Tables, tensors: dict[str, Tensor], shape: tuple[int, int]) -> dict[str, Any]:
    """Store one linear's tensors; returns its manifest record (``shape``: out, in features)."""
    prefix = f"linear/{name}"
    codes = next(iter(linear.branch_codes.values()), None)
    record: dict[str, Any] = {
        "in_features": shape[1],
        "out_features": shape[0],
        "state": linear.state.to_dict(),
        "scales": None if linear.scales is None else tables.key(linear.scales, name),
        "stored_rows": [] if linear.weights is None else list(linear.weights),
        "branch_rows": list(linear.branch_codes or linear.branches),
        "branch_bits": None if codes is None else codes[0].config.bits,
    }
    if linear.scales is not None:
        assert linear.row_of_modality is not None  # a smoothed linear routes its tokens
        tensors[f"{prefix}/row_of_modality"] = linear.row_of_modality.long().clone()
    for row, weight in (linear.weights or {}).items():
        _store_weight(tensors, f"{prefix}/weight/{row}", weight)
    for row, (left_t, right_t) in linear.branch_codes.items():
        _store_weight(tensors, f"{prefix}/cmc/{row}/left", left_t)
        _store_weight(tensors, f"{prefix}/cmc/{row}/right", right_t)
    for row, (left, right) in linear.branches.items():
        tensors[f"{prefix}/cmc/{row}/left"] = left.clone()
        tensors[f"{prefix}/cmc/{row}/right"] = right.clone()
    return record


def _collect(gm: fx.GraphModule, model: nn.Module) -> EncodedEdits:
    edits = graph_edits(gm, adapter_for(model))
    lowered = [name for name, module in edits.linears.items() if not isinstance(module, QuantLinear)]
    if lowered:
        raise CheckpointError(
            f"the graph's {lowered[0]} is no QuantLinear (lowered to a backend?): save the reference "
            "graph, before lower_to_torchao, and lower the loaded one"
        )
    if not edits.linears and edits.sparsity is None:
        raise CheckpointError("the graph has no QuantLinears and no sparsifiers: nothing to save (run a recipe first)")
    try:
        check_float_weights(gm, adapter_for(model))
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    off = [name for name, module in edits.linears.items() if isinstance(module, QuantLinear) and not module.quantizers_enabled]
    if off:
        raise CheckpointError(f"{off[0]} has its quantizers off: save outside quantizers_off()")
    return encode_edits(edits)


def encode_edits(edits: GraphEdits) -> EncodedEdits:
    """The tensors and manifest ``graph`` record of a live graph's edits (its linears QuantLinears); :func:`decode_edits`
    reads them back. Also the format of each layer's results in a run's progress folder (:mod:`masq_fx.resume`)."""
    tensors: dict[str, Tensor] = {}
    tables = _Tables(tensors)
    linears = {
        name: _store_linear(name, LinearRecord.of(m), tables, tensors, (m.out_features, m.in_features))
        for name, m in edits.linears.items()
        if isinstance(m, QuantLinear)
    }
    routers = []
    for router in edits.routers:
        routers.append({"linears": list(router.linears), "scales": tables.key(router.scales, router.linears[0])})
        tensors[f"router/{router.linears[0]}/row_of_modality"] = router.row_of_modality.long().clone()
    for path, tensor in edits.attributes.items():
        tensors[f"graph/{path}"] = tensor.detach().clone()
    graph = {"include_head": _HEAD in linears, "linears": linears, "routers": routers, "replaced": list(edits.attributes)}
    if edits.rotation is not None:
        config, plan = edits.rotation
        graph["rotation"] = {"config": asdict(config), "plan": plan.to_dict()}
    if edits.sparsity is not None:
        graph["sparsity"] = {"config": edits.sparsity.config.to_dict(), "plan": edits.sparsity.plan.to_dict()}
        tensors["sparsity/bases"] = edits.sparsity.bases.detach().clone()
        tensors["sparsity/thresholds"] = edits.sparsity.thresholds.detach().clone()
    return EncodedEdits(tensors, graph)


# ----------------------------------------------------------------------------- save


def save(
    context: Context,
    directory: str | os.PathLike,
    *,
    model: nn.Module,
    recipe: Recipe,
    overwrite: bool = False,
    data_hashes: Sequence[str] = (),
    source: str | None = None,
    extra_files: Callable[[Path], object] | None = None,
) -> Path:
    """Write the quantized graph of ``context`` (made from ``model`` with ``recipe``) to ``directory``.

    ``data_hashes``: content sha256 of each calibration sample, recorded so that evaluation can
    refuse samples the checkpoint was calibrated on. ``source``: how the model is named on the
    command line (recorded as the manifest's ``source``, so ``masq-fx eval DIR`` can reload it).
    ``extra_files(staging)``: writes further files (a run report) into the staging directory, so they
    are published together with the checkpoint, in the same rename.

    Atomic: the files are written and fsynced in a temporary sibling directory that is then renamed;
    an interrupted save leaves no checkpoint behind and an existing one untouched. An existing
    ``directory`` is an error unless ``overwrite``. The HF ``model`` is read, never modified.

    In a process group every rank calls it (the calibration summary covers every rank's samples) and
    rank 0 alone writes.
    """
    target = Path(directory)
    calibration = calibration_record(context.calibration, data_hashes, context.sample_ranks)
    if not is_leader():
        return target
    _check_replaceable(target, overwrite)
    collected = _collect(context.graph_module, model)
    tensors = collected.tensors  # written and hashed one at a time, on the CPU (device-independent)
    adapter = adapter_for(model)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "recipe": recipe.to_dict(),
        "versions": library_versions(),
        #: learned scales and GEMM sums reproduce bit for bit at the same intra-op thread count
        "threads": torch.get_num_threads(),
        "model": model_identity(model),
        "modality_tokens": asdict(adapter.modality_tokens()),
        "modalities": [m.name.lower() for m in context.captured.modalities],
        "calibration": calibration,
        "tensors": {"file": TENSORS, "content_sha256": tensors_sha256(sorted(tensors.items()))},
        "graph": collected.graph,
    }
    if source is not None:
        manifest["source"] = source
    text = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        write_safetensors(staging / TENSORS, tensors, metadata={MANIFEST_SHA256_KEY: hashlib.sha256(text).hexdigest()})
        write_bytes_atomically(staging / MANIFEST, text)
        if extra_files is not None:
            extra_files(staging)
        os.chmod(staging, 0o755)
        fsync_directory(staging)
        _publish(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_directory(target.parent)
    return target


def check_target(directory: str | os.PathLike, overwrite: bool, option: str = "overwrite=True") -> None:
    """Refuse (:class:`CheckpointError`) a ``directory`` that :func:`save` would refuse to write: an existing
    one without ``overwrite`` (``option``: how the caller names that switch), or anything but a checkpoint
    or an empty directory. Cheap: for checking the output before the long work."""
    _check_replaceable(Path(directory), overwrite, option)


def _check_replaceable(target: Path, overwrite: bool, option: str = "overwrite=True") -> None:
    """Only a checkpoint (or an empty directory) is ever replaced, and only with ``overwrite``."""
    if not target.exists() and not target.is_symlink():
        return
    if not overwrite:
        raise CheckpointError(f"{target} already exists: pass {option} to replace it, or choose another directory")
    if target.is_symlink() or not target.is_dir() or (any(target.iterdir()) and not (target / MANIFEST).is_file()):
        raise CheckpointError(
            f"{target} exists and is not a masq_fx checkpoint directory: refusing to replace it; choose another directory"
        )


def _publish(staging: Path, target: Path, overwrite: bool) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is moved aside first and removed after."""
    if not target.exists():
        os.rename(staging, target)
        return
    _check_replaceable(target, overwrite)
    aside = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside)


# ----------------------------------------------------------------------------- load


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a checkpoint in the current format, after checking that this masq_fx can read its
    version (an older one is migrated, see :func:`_migrate_v1`) and, from format 3 on, that it is the
    manifest the tensor file was saved with (:func:`_check_manifest_hash`)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: {Path(directory)} is not a masq_fx checkpoint (or an incomplete copy of "
            "one); copy the whole directory, or save the checkpoint again"
        )
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is corrupt ({error}); copy the checkpoint again, or save it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a masq_fx checkpoint manifest (format {FORMAT!r} expected)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} has no valid format_version ({version!r}); copy the checkpoint again, or save it again")
    if version > FORMAT_VERSION:
        writer = manifest.get("versions", {}).get("masq_fx", "unknown")
        raise CheckpointError(
            f"{Path(directory)} has checkpoint format version {version}, newer than this masq_fx "
            f"{importlib.metadata.version('masq_fx')} reads (up to {FORMAT_VERSION}); it was written by "
            f"masq_fx {writer}: upgrade masq_fx to load it"
        )
    if version >= 3:
        _check_manifest_hash(Path(directory), manifest, raw)
    else:  # formats 1 and 2 check the tensor file by its bytes and whole-file sha256 (only those fields count)
        record = manifest.get("tensors") or {}
        manifest["tensors"] = {key: record.get(key) for key in ("file", "bytes", "sha256")}
    if version == 1:
        manifest = _migrate_v1(manifest, Path(directory))
    # version 2 is version 3 without the manifest hash: nothing to migrate (its ``tensors`` record keeps
    # ``bytes`` and the whole file's ``sha256``, which :func:`_read_tensors` checks as before)
    manifest["format_version"] = FORMAT_VERSION
    return manifest


def _tensor_file(directory: Path, manifest: dict[str, Any]) -> Path:
    record = manifest.get("tensors")
    name = record.get("file") if isinstance(record, dict) else None
    if not isinstance(name, str) or Path(name).name != name:
        raise CheckpointError(
            f"{directory / MANIFEST} names no valid tensor file ({name!r}): restore the checkpoint's original "
            "manifest.json (copy the checkpoint again), or quantize the model again"
        )
    path = directory / name
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; copy the whole directory, or save again")
    return path


def _check_manifest_hash(directory: Path, manifest: dict[str, Any], raw: bytes) -> None:
    """Refuse a manifest other than the one whose sha256 the tensor file's ``__metadata__`` records."""
    path = _tensor_file(directory, manifest)
    fix = "restore the original manifest.json (copy the whole checkpoint again), or quantize the model again"
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length)) if 0 < length <= path.stat().st_size - 8 else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is truncated or corrupt (unreadable header): copy the checkpoint again, or save it again")
    recorded = (header.get("__metadata__") or {}).get(MANIFEST_SHA256_KEY)
    if recorded is None:
        raise CheckpointError(
            f"{path} records no manifest hash, which format {manifest['format_version']} requires: it does not "
            f"belong to {directory / MANIFEST}; {fix}"
        )
    if hashlib.sha256(raw).hexdigest() != recorded:
        raise CheckpointError(
            f"{directory / MANIFEST} was modified after saving (its sha256 differs from the one {path.name} records), "
            f"so the checkpoint would load with other numerics than it was quantized with: {fix}"
        )


#: the v1 per-linear record fields that became its ``state``
_V1_STATE = ("weight_quant", "act_quant", "weight_rows", "branch_input", "divide_input", "scales_folded")


def _migrate_v1(manifest: dict[str, Any], directory: Path) -> dict[str, Any]:
    """A format 1 manifest as format 2 (and so 3, see :func:`read_manifest`): the fields early v1 writers left out get their meaning then
    (no calibration sample hashes, a float32 model, float CMC factors), and each linear's flags and
    configs become its ``state``, with the static activation scale read from its v1 tensor. A linear
    saved with its quantizers off is refused (version 2 cannot record it)."""
    manifest["calibration"].setdefault("sample_sha256", [])
    manifest["model"].setdefault("dtype", "float32")  # written before bfloat16 models were supported
    static: dict[str, float] = {}
    for name, record in manifest["graph"]["linears"].items():
        if not record.pop("quantizers_enabled"):
            raise CheckpointError(
                f"{directory} (format version 1) was saved with the quantizers of {name} off, which format "
                f"{FORMAT_VERSION} cannot record: quantize the model again and save it"
            )
        record.setdefault("branch_bits", None)
        record["state"] = {key: record.pop(key) for key in _V1_STATE}
        act = record["state"]["act_quant"]
        if act is not None and act["granularity"] == "per_tensor":
            static[name] = 0.0
    if static:
        path = directory / manifest["tensors"]["file"]
        try:
            with safetensors.safe_open(path, "pt") as f:
                static = {name: float(f.get_tensor(f"linear/{name}/act_static_scale")) for name in static}
        except Exception as error:
            raise CheckpointError(f"{path} lacks the static activation scales of format version 1 ({error}); save the checkpoint again") from None
    for name, record in manifest["graph"]["linears"].items():
        record["state"]["act_static_scale"] = static.get(name)
    return manifest


def calibration_hashes(directory: str | os.PathLike) -> tuple[str, ...]:
    """Content sha256 of the samples a checkpoint was calibrated on (empty when unknown)."""
    return tuple(read_manifest(directory)["calibration"]["sample_sha256"])


def _check_model(expected: dict[str, str], model: nn.Module) -> None:
    actual = model_identity(model)
    fix = "load the checkpoint into the model it was quantized from"
    if actual["hf_class"] != expected["hf_class"]:
        raise CheckpointError(
            f"the checkpoint was made from a {expected['hf_class']} ({expected['family']}), "
            f"not a {actual['hf_class']}: {fix}"
        )
    if expected["dtype"] != actual["dtype"]:
        raise CheckpointError(
            f"the checkpoint was quantized from a {expected['dtype']} model, not a {actual['dtype']} one: "
            f"convert the model with model.to(torch.{expected['dtype']}) first"
        )
    for key, what in (("config_sha256", "config"), ("weights_sha256", "float weights")):
        if actual[key] != expected[key]:
            raise CheckpointError(
                f"the model's {what} differ from those the checkpoint was quantized from "
                f"(sha256 {actual[key][:12]}…, expected {expected[key][:12]}…): {fix}"
            )


def _read_tensors(directory: Path, record: dict[str, Any]) -> dict[str, Tensor]:
    path = directory / record["file"]
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; copy the whole directory, or save again")
    if "content_sha256" in record:  # format 3: a hash of the tensors, not of the file (its header holds the manifest's)
        try:
            tensors = safetensors.torch.load_file(str(path))  # mapped, not read into a buffer first
        except Exception as error:
            raise CheckpointError(f"{path} is truncated or corrupt ({error}); copy the checkpoint again, or save it again") from None
        if tensors_sha256(sorted(tensors.items())) != record["content_sha256"]:
            raise CheckpointError(
                f"{path} is corrupt: its sha256 differs from the manifest's; copy the checkpoint again, or save it again"
            )
        return tensors
    data = path.read_bytes()
    if len(data) != record["bytes"]:
        raise CheckpointError(
            f"{path} is truncated or corrupt: {len(data)} bytes, the manifest records {record['bytes']}; "
            "copy the checkpoint again, or save it again"
        )
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise CheckpointError(
            f"{path} is corrupt: its sha256 differs from the manifest's; copy the checkpoint again, or save it again"
        )
    try:
        return safetensors.torch.load(data)
    except Exception as error:  # the file matches the manifest, but the manifest came with a bad file
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}); save the checkpoint again") from None


def load(directory: str | os.PathLike, model: nn.Module) -> CapturedDecoder:
    """Capture ``model`` afresh and replay the checkpoint's quantization onto it.

    Refuses (:class:`CheckpointError`, naming the problem and the fix) a model other than the one
    quantized, a missing, truncated or corrupt file, and a newer format version. The HF ``model`` is
    not modified; the returned graph computes exactly what the saved graph computed, on the model's device.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    _check_model(manifest["model"], model)
    tensors = _read_tensors(directory, manifest["tensors"])
    graph = manifest["graph"]
    captured = capture(model)
    expected = set(captured.decoder_linears()) | ({_HEAD} if graph["include_head"] else set())
    if (graph["linears"] or "sparsity" not in graph) and expected != set(graph["linears"]):
        raise CheckpointError(
            f"the captured graph's linears ({len(expected)}) do not match the checkpoint's ({len(graph['linears'])}): "
            "load it with the masq_fx and transformers versions in its manifest"
        )
    _check_records(directory, graph, tensors, captured)
    device = model_device(model)  # saved from the CPU, loaded where the model runs
    tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
    try:
        replay(captured.graph_module, decode_edits(graph, tensors))
    except KeyError as error:
        raise CheckpointError(f"{directory} is inconsistent (no entry {error}); save the checkpoint again") from None
    except ValueError as error:
        raise CheckpointError(f"{directory} does not replay onto this model ({error})") from None
    return captured


def _check_records(directory: Path, graph: dict[str, Any], tensors: dict[str, Tensor], captured: CapturedDecoder) -> None:
    """Refuse manifest records that disagree with the stored tensors or the model's linears (shapes, bit
    widths, tensors a record names but the file lacks), naming the linear: otherwise they would surface
    as a shape error deep in torch, or load with other numerics."""

    def refuse(name: str, problem: str) -> None:
        raise CheckpointError(
            f"{directory / MANIFEST} disagrees with {TENSORS} and the model at linear {name}: {problem}; restore the "
            "checkpoint's original files (copy the whole checkpoint again), or quantize the model again"
        )

    def tensor(name: str, key: str) -> Tensor:
        if key not in tensors:
            refuse(name, f"the manifest's record needs the tensor {key!r}, which the file lacks")
        return tensors[key]

    def check_weight(name: str, prefix: str, config: WeightQuantConfig, rows: int, columns: int) -> None:
        codes, scale = tensor(name, f"{prefix}/codes"), tensor(name, f"{prefix}/scale")
        packed = config.bits <= 4
        shape = (rows, (columns + 1) // 2 if packed else columns)
        dtype = torch.uint8 if packed else torch.int8
        if codes.dtype != dtype or tuple(codes.shape) != shape:
            refuse(
                name,
                f"{config.bits}-bit codes of [{rows}, {columns}] are stored as {str(dtype).removeprefix('torch.')} {list(shape)}, "
                f"but {prefix}/codes is {str(codes.dtype).removeprefix('torch.')} {list(codes.shape)}",
            )
        groups = 1 if config.group_size is None else columns // config.group_size
        if config.group_size is not None and columns % config.group_size:
            refuse(name, f"group size {config.group_size} does not divide its {columns} input features")
        if tuple(scale.shape) != (rows, groups):
            refuse(name, f"{prefix}/scale is {list(scale.shape)}, the recorded quantizer needs [{rows}, {groups}]")
        if (f"{prefix}/zero_point" in tensors) == config.symmetric:
            refuse(name, f"the record says {'symmetric' if config.symmetric else 'asymmetric'} weights, the file {'has' if config.symmetric else 'lacks'} zero points")
        values = unpack_int4(codes, columns) if packed else codes
        if values.numel() and (int(values.min()) < config.qmin or int(values.max()) > config.qmax):
            refuse(name, f"its codes span [{int(values.min())}, {int(values.max())}], outside the recorded {config.bits}-bit grid [{config.qmin}, {config.qmax}]")

    for name, record in graph["linears"].items():
        try:
            state = QuantLinearState.from_dict(record["state"])
            out_features, in_features = int(record["out_features"]), int(record["in_features"])
        except (KeyError, TypeError, ValueError) as error:
            refuse(name, f"its record is malformed ({error})")
        weight = captured.weights.get(name)
        if weight is not None and tuple(weight.shape) != (out_features, in_features):
            refuse(name, f"the record says [{out_features}, {in_features}] (out, in features), the model's linear is {list(weight.shape)}")
        if record["scales"] is not None:
            table = tensor(name, f"scales/{record['scales']}")
            if table.dim() != 2 or table.shape[1] != in_features:
                refuse(name, f"its smoothing table scales/{record['scales']} is {list(table.shape)}, not [rows, {in_features}]")
            row_map = tensor(name, f"linear/{name}/row_of_modality")
            if row_map.numel() and (int(row_map.min()) < 0 or int(row_map.max()) >= table.shape[0]):
                refuse(name, f"its row map points outside the {table.shape[0]} rows of its smoothing table")
        if state.weight_quant is not None:
            for row in record["stored_rows"]:
                check_weight(name, f"linear/{name}/weight/{row}", state.weight_quant, out_features, in_features)
        for row in record["branch_rows"]:
            cmc = f"linear/{name}/cmc/{row}"
            if record["branch_bits"] is None:
                left, right = tensor(name, f"{cmc}/left"), tensor(name, f"{cmc}/right")
                if left.dim() != 2 or right.dim() != 2 or left.shape[0] != in_features or right.shape[1] != out_features or left.shape[1] != right.shape[0]:
                    refuse(name, f"its CMC factors are {list(left.shape)} and {list(right.shape)}, not [{in_features}, r] and [r, {out_features}]")
                continue
            config = branch_factor_config(record["branch_bits"])
            rank = tensor(name, f"{cmc}/left/scale").shape[0]
            check_weight(name, f"{cmc}/left", config, rank, in_features)
            check_weight(name, f"{cmc}/right", config, out_features, rank)


def decode_edits(graph: dict[str, Any], tensors: dict[str, Tensor]) -> GraphEdits:
    """The manifest's graph record and the tensors as the edits :func:`~masq_fx.replay.replay` installs (inverse of :func:`encode_edits`)."""
    tables = _scale_tables(tensors)
    return GraphEdits(
        linears={name: _read_linear(name, record, tables, tensors) for name, record in graph["linears"].items()},
        routers=[
            Router(tuple(r["linears"]), tables[r["scales"]], tensors[f"router/{r['linears'][0]}/row_of_modality"])
            for r in graph["routers"]
        ],
        attributes={path: tensors[f"graph/{path}"] for path in graph["replaced"]},
        rotation=_rotation(graph.get("rotation")),
        sparsity=_sparsity(graph.get("sparsity"), tensors),
    )


def _rotation(record: dict[str, Any] | None) -> tuple[RotationConfig, RotationPlan] | None:
    """The manifest's rotation record (format 4; ``None``: the graph was not rotated)."""
    if record is None:
        return None
    try:
        return RotationConfig(**record["config"]), RotationPlan.from_dict(record["plan"])
    except (KeyError, TypeError, ValueError, InputError) as error:
        raise CheckpointError(f"the manifest's rotation record is malformed ({error}); save the checkpoint again") from None


def _sparsity(record: dict[str, Any] | None, tensors: dict[str, Tensor]) -> SparsityRecord | None:
    """The manifest's sparsity record with its bases and thresholds (format 5; ``None``: the graph is dense)."""
    if record is None:
        return None
    try:
        config, plan = SparsityConfig.from_dict(record["config"]), SparsityPlan.from_dict(record["plan"])
        bases, thresholds = tensors["sparsity/bases"], tensors["sparsity/thresholds"]
    except (KeyError, TypeError, ValueError, InputError) as error:
        raise CheckpointError(f"the manifest's sparsity record is malformed ({error}); save the checkpoint again") from None
    count = len(set(dict(plan.bases).values()))
    if (plan.roles is not None and bases.shape[0] != count) or (plan.roles is None and thresholds.shape != (len(plan.sites),)):
        raise CheckpointError(f"the sparsity tables ({list(bases.shape)}, {list(thresholds.shape)}) do not match its plan; save the checkpoint again")
    return SparsityRecord(config, plan, bases, thresholds)


def _scale_tables(tensors: dict[str, Tensor]) -> dict[str, nn.Parameter]:
    """Key → smoothing table, one parameter object per table (shared by the linears and routers using it)."""
    return {key.removeprefix("scales/"): nn.Parameter(value, requires_grad=False) for key, value in tensors.items() if key.startswith("scales/")}


def _read_linear(name: str, record: dict[str, Any], tables: dict[str, nn.Parameter], tensors: dict[str, Tensor]) -> LinearRecord:
    """Inverse of :func:`_store_linear`."""
    prefix = f"linear/{name}"
    state = QuantLinearState.from_dict(record["state"])
    scales = None if record["scales"] is None else tables[record["scales"]]
    weights = None
    if state.weight_quant is not None:
        weights = {row: _weight(tensors, f"{prefix}/weight/{row}", state.weight_quant, record["in_features"]) for row in record["stored_rows"]}
    branches, branch_codes = {}, {}
    for row in record["branch_rows"]:
        cmc = f"{prefix}/cmc/{row}"
        if record["branch_bits"] is None:
            branches[row] = (tensors[f"{cmc}/left"], tensors[f"{cmc}/right"])
            continue
        config = branch_factor_config(record["branch_bits"])
        rank = tensors[f"{cmc}/left/scale"].shape[0]
        branch_codes[row] = (
            _weight(tensors, f"{cmc}/left", config, record["in_features"]),
            _weight(tensors, f"{cmc}/right", config, rank),
        )
    return LinearRecord(
        state=state,
        scales=scales,
        row_of_modality=None if scales is None else tensors[f"{prefix}/row_of_modality"],
        weights=weights,
        branches=branches,
        branch_codes=branch_codes,
    )


def _weight(tensors: dict[str, Tensor], prefix: str, config: WeightQuantConfig, columns: int) -> QuantizedWeight:
    codes = tensors[f"{prefix}/codes"]
    return QuantizedWeight(
        qdata=unpack_int4(codes, columns) if config.bits <= 4 else codes,
        scale=tensors[f"{prefix}/scale"],
        zero_point=tensors.get(f"{prefix}/zero_point"),
        config=config,
    )


# ----------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class LinearBytes:
    """Checkpoint bytes of the decoder linears with ``bits``-bit weights, against their FP32 weights."""

    bits: int
    linears: int
    #: 4 bytes per weight element of these linears (one weight each)
    fp32_bytes: int
    #: integer codes, weight scales and zero points of every stored weight row
    weight_bytes: int
    #: smoothing tables (a shared table once), row maps and static activation scales (4 bytes each, in the manifest)
    smoothing_bytes: int
    #: CMC low-rank factors
    branch_bytes: int

    @property
    def weight_ratio(self) -> float:
        """Stored weights / FP32 weights (the issue's gate: ≤ 0.14 at 4 bits)."""
        return self.weight_bytes / self.fp32_bytes

    @property
    def total_ratio(self) -> float:
        """Everything these linears store / FP32 weights."""
        return (self.weight_bytes + self.smoothing_bytes + self.branch_bytes) / self.fp32_bytes


def _header_sizes(path: Path) -> dict[str, int]:
    """Byte count of every tensor in a safetensors file, read from its header."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    return {key: end - start for key, meta in header.items() if key != "__metadata__" for start, end in [meta["data_offsets"]]}


def linear_bytes(directory: str | os.PathLike, bits: int = 4) -> LinearBytes:
    """Bytes a checkpoint spends on its decoder linears with ``bits``-bit weights (from the file)."""
    manifest = read_manifest(directory)
    sizes = _header_sizes(Path(directory) / manifest["tensors"]["file"])
    chosen = {
        name: record
        for name, record in manifest["graph"]["linears"].items()
        if name != _HEAD and (weight := record["state"]["weight_quant"]) is not None and weight["bits"] == bits
    }
    if not chosen:
        raise CheckpointError(f"{directory} has no decoder linears with {bits}-bit weights")

    def total(prefixes: Iterable[str]) -> int:
        prefixes = tuple(prefixes)
        return sum(size for key, size in sizes.items() if key.startswith(prefixes))

    tables = {f"scales/{r['scales']}" for r in chosen.values() if r["scales"] is not None}
    return LinearBytes(
        bits=bits,
        linears=len(chosen),
        fp32_bytes=sum(4 * r["in_features"] * r["out_features"] for r in chosen.values()),
        weight_bytes=total(f"linear/{name}/weight/" for name in chosen),
        smoothing_bytes=sum(sizes[key] for key in tables)
        + total(f"linear/{name}/row_of_modality" for name in chosen)
        + 4 * sum(r["state"]["act_static_scale"] is not None for r in chosen.values()),  # a float32 each
        branch_bytes=total(f"linear/{name}/cmc/" for name in chosen),
    )
