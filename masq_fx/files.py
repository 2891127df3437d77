"""Files written so that nothing partial is ever seen: a temporary sibling, fsynced, then renamed over the target."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

import torch

#: safetensors' names of the dtypes masq_fx writes
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``write(file)`` on a temporary sibling, fsynced, then renamed over ``path``.

    An interrupted write leaves ``path`` as it was and no temporary file behind.
    """
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o644)  # mkstemp creates 0600; these files are for reading
        with os.fdopen(handle, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """:func:`write_atomically` of ``data``."""
    write_atomically(path, lambda out: out.write(data))


def fsync_directory(directory: Path) -> None:
    """Make the renames inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """``tensors`` (on any device) as a safetensors file at ``path``, written atomically one tensor at a time: the
    file is never built in memory, and only one tensor at a time is copied to the CPU.

    The tensors are laid out by element size, largest first, then by name, so that each starts at a multiple of its
    element size; the same tensors give the same bytes.
    """
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name} is {tensor.dtype}, which masq_fx does not write to safetensors files")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-aligned

    def write(out: IO[bytes]) -> None:
        out.write(struct.pack("<Q", len(text)) + text)
        for name in order:
            tensor = tensors[name].detach().to("cpu").contiguous()
            if tensor.numel():
                out.write(tensor.reshape(-1).view(torch.uint8).numpy().data)

    write_atomically(path, write)
