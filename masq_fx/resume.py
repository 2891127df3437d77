"""A layer-by-layer run's progress kept on disk, so that an interrupted run continues where it stopped.

With a progress folder (:func:`masq_fx.api.apply_all`'s ``resume``, ``masq-fx quantize``'s default), after
each decoder layer every recipe's results for that layer (its QuantLinears, the routers they read, the
graph parameters it replaced, in the checkpoint's tensor format: :func:`masq_fx.checkpoint.encode_edits`;
and its CMC diagnostics) are written to ``<folder>/recipe-<k>/layer-<i>.safetensors``, each file
atomically. A rerun with the same folder replays the layers every recipe has finished instead of
computing them again: the float stream (and the statistics the report reads) is recomputed through
them, and the quantized stream through the replayed layers, which compute exactly what the finished
ones did (checkpoint round trips are bit-exact), so the resumed run's results equal an uninterrupted one's.

``<folder>/run.json`` records what the progress belongs to: the model (family, class, dtype, config),
the recipes, the calibration samples' content hash (which covers their embeddings, and so the model's
embedding weights) and the versions of masq_fx, torch, torchao and transformers. A folder of another run is refused, naming what differs.

In a process group rank 0 writes and every rank reads the folder, which must then be on a filesystem
every rank sees.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from masq_fx.checkpoint import calibration_record, decode_edits, encode_edits, library_versions, model_identity
from masq_fx.distributed import is_leader, reduce
from masq_fx.errors import InputError
from masq_fx.files import write_bytes_atomically, write_safetensors
from masq_fx.modality import Modality
from masq_fx.models import DecoderInputs, adapter_for, model_device
from masq_fx.pipeline import Context
from masq_fx.recipes import Recipe
from masq_fx.replay import layer_edits, replay
from masq_fx.transforms.cmc import BranchReport

__all__ = ["Progress", "ResumeError"]

FORMAT = "masq_fx.progress"
FORMAT_VERSION = 1
RUN = "run.json"


class ResumeError(InputError):
    """A progress folder that belongs to another run, or that cannot be read."""


def _fingerprint(model: nn.Module, recipes: Sequence[Recipe], samples: Sequence[DecoderInputs], ranks: Sequence[int]) -> dict[str, Any]:
    calibration = calibration_record(samples, (), ranks)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": library_versions(),
        "model": model_identity(model, weights=False),
        "recipes": [recipe.to_dict() for recipe in recipes],
        "calibration": {"samples": calibration["samples"], "sha256": calibration["sha256"]},
    }


def _layer_name(layer: int) -> str:
    return f"layer-{layer:04d}.safetensors"


class Progress:
    """The progress folder of one :func:`~masq_fx.api.apply_all` run of ``recipes`` (index ``k`` → ``recipe-<k>/``);
    ``ranks``: the rank holding each calibration sample, in a process group."""

    def __init__(
        self,
        directory: str | os.PathLike,
        model: nn.Module,
        recipes: Sequence[Recipe],
        samples: Sequence[DecoderInputs],
        ranks: Sequence[int] = (),
    ) -> None:
        self.directory = Path(directory)
        self.model = model
        #: the recipe index of each job this object is for (see :meth:`of`)
        self.indices = list(range(len(recipes)))
        expected = _fingerprint(model, recipes, samples, ranks)
        run = self.directory / RUN
        if run.exists():
            try:
                found = json.loads(run.read_text())
            except (OSError, ValueError) as error:
                raise ResumeError(f"{run} is unreadable ({error}); delete {self.directory} to start over") from None
            differs = [key for key in expected if found.get(key) != expected[key]]
            if differs:
                raise ResumeError(
                    f"{self.directory} holds the progress of another run (different {', '.join(differs)}): "
                    f"rerun with the same model, recipes and calibration, or delete {self.directory} to start over"
                )
        elif is_leader():
            for index in self.indices:
                (self.directory / f"recipe-{index}").mkdir(parents=True, exist_ok=True)
            write_bytes_atomically(run, (json.dumps(expected, indent=1, sort_keys=True) + "\n").encode())

    def of(self, indices: Sequence[int]) -> Progress:
        """The same folder for a run of the recipes ``indices`` only (job ``j`` of that run is recipe ``indices[j]``)."""
        subset = copy.copy(self)
        subset.indices = [self.indices[i] for i in indices]
        return subset

    def _file(self, job: int, layer: int) -> Path:
        return self.directory / f"recipe-{self.indices[job]}" / _layer_name(layer)

    def completed(self, num_layers: int) -> int:
        """How many leading layers every recipe has finished (the fewest any rank sees, in a process group)."""
        done = 0
        while done < num_layers and all(self._file(job, done).exists() for job in range(len(self.indices))):
            done += 1
        count = torch.tensor([done])
        reduce([count], "min", "agreeing on the finished layers")
        return int(count)

    def save(self, job: int, layer: int, context: Context, diagnostics: dict[str, list[Any]]) -> None:
        """Write what ``context``'s steps made of ``layer`` and the ``diagnostics`` they recorded there (rank 0)."""
        if not is_leader():
            return
        encoded = encode_edits(layer_edits(context.captured, adapter_for(self.model), layer))
        reports = {step: [asdict(r) for r in records if isinstance(r, BranchReport)] for step, records in diagnostics.items()}
        metadata = {"graph": json.dumps(encoded.graph, sort_keys=True), "diagnostics": json.dumps(reports, sort_keys=True)}
        write_safetensors(self._file(job, layer), encoded.tensors, metadata=metadata)

    def restore(self, job: int, layer: int, context: Context) -> None:
        """Install the saved results of ``layer`` into ``context``'s graph and diagnostics."""
        path = self._file(job, layer)
        try:
            with safe_open(str(path), "pt", device=str(model_device(self.model))) as opened:
                tensors = {name: opened.get_tensor(name) for name in opened.keys()}
                metadata = opened.metadata()
            graph, diagnostics = json.loads(metadata["graph"]), json.loads(metadata["diagnostics"])
        except (OSError, ValueError, KeyError, SafetensorError) as error:
            raise ResumeError(f"{path} is unreadable ({error}); delete {self.directory} to start over") from None
        replay(context.graph_module, decode_edits(graph, tensors))
        for step, records in diagnostics.items():
            context.diagnostics.setdefault(step, []).extend(BranchReport(**{**r, "modality": Modality(r["modality"])}) for r in records)
