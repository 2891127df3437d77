"""A finished layer's rotated float weights moved from memory to a memory-mapped file.

A rotation gives the decoder new float weights (:mod:`masq_fx.transforms.rotation`). The model's own weights are
mapped from its safetensors files, so a layer-sequential run gives their pages back after each layer
(:mod:`masq_fx.pages`), but the rotated ones are ordinary memory, kept by every finished layer's
:class:`~masq_fx.nn.quant_linear.QuantLinear` s: 14 GiB for a 7B model in bfloat16. After a layer is done,
:class:`Offload` writes its rotated weights to a safetensors file, maps it, puts the mapped tensors in place of
the in-memory ones everywhere they are held (the float capture and every recipe's copy: graph parameters, the
rotation's record, the QuantLinears), gives their pages back, and deletes the file name (the mapping lives on
until the process lets go of the tensors). The values are the same bits; they are read from the file when next
used.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor, nn

from masq_fx.capture.decoder import LAYER_KEY, CapturedDecoder
from masq_fx.files import write_safetensors
from masq_fx.nn.quant_linear import QuantLinear
from masq_fx.pages import release
from masq_fx.transforms.rotation import rotation_record, weight_paths


class Offload:
    """Moves each finished layer's rotated weights to a mapped file in ``folder`` (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def layer(self, captured: CapturedDecoder, copies: Iterable[CapturedDecoder], layer: int) -> None:
        """Move decoder ``layer``'s rotated weights of ``captured`` (a rotated float capture) and of its ``copies``."""
        record = rotation_record(captured.graph_module)
        if record is None:
            return
        nodes = [node for node in captured.linear_nodes().values() if node.meta.get(LAYER_KEY) == layer]
        paths = [path for node in nodes for path in weight_paths(node) if path is not None and path in record.produced]
        held = {path: record.produced[path] for path in paths if record.produced[path].device.type == "cpu"}
        if not held:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        file = self.folder / f"rotated-layer-{layer}.safetensors"
        write_safetensors(file, held)
        mapped = load_file(file)
        file.unlink()
        moved = {id(tensor): nn.Parameter(mapped[path], requires_grad=False) for path, tensor in held.items()}
        for target in (captured, *copies):
            _replace(target, held, moved)
        release(moved.values())


def _replace(target: CapturedDecoder, held: dict[str, Tensor], moved: dict[int, nn.Parameter]) -> None:
    """Put the mapped tensors ``moved`` (by id of the tensor of ``held`` they replace, alive meanwhile) wherever
    ``target`` holds those."""
    gm = target.graph_module
    record = rotation_record(gm)
    assert record is not None, "a copy of a rotated capture is rotated"
    for path, tensor in held.items():
        owner, _, name = path.rpartition(".")
        module = gm.get_submodule(owner)
        if getattr(module, name, None) is tensor:
            setattr(module, name, moved[id(tensor)])
        if record.produced.get(path) is tensor:
            record.produced[path] = moved[id(tensor)]
    for module in gm.modules():
        if isinstance(module, QuantLinear):
            for attribute in ("weight", "bias"):
                value = getattr(module, attribute)
                if value is not None and id(value) in moved:
                    setattr(module, attribute, moved[id(value)])
    target.weights = {name: moved.get(id(w), w) for name, w in target.weights.items()}
    target.float_tensors = tuple(moved.get(id(t), t) for t in target.float_tensors)
