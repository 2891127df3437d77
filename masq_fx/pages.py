"""Weights memory-mapped from safetensors files, and giving their pages back once a layer is done.

``transformers`` maps a safetensors checkpoint loaded in its stored dtype instead of reading it: a
parameter's pages are read from the file when first touched, and then count in the process's
resident memory until they are given back. A layer-sequential run touches one layer at a time, so
giving each layer's pages back after its turn bounds resident memory by about one layer's weights,
however large the model. The pages are read again from the file if the weights are used later.

Pages are given back with ``madvise(MADV_PAGEOUT)`` (Linux 5.4+), which never loses data: a clean
page of a file is dropped, a page someone wrote to stays (there is no swap to page it out to). Only
tensors inside a ``.safetensors`` mapping are asked about; where the call is not supported nothing
is given back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

_MADV_PAGEOUT = 21
_MAPS = Path("/proc/self/maps")


@dataclass(frozen=True)
class _Mapping:
    start: int
    end: int


def _safetensors_mappings() -> list[_Mapping]:
    """Address ranges of this process's mappings of ``.safetensors`` files (none where ``/proc`` is absent)."""
    try:
        lines = _MAPS.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].removesuffix(" (deleted)").endswith(".safetensors"):  # deleted: offload.py's
            start, end = (int(x, 16) for x in fields[0].split("-"))
            found.append(_Mapping(start, end))
    return found


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def release(tensors: Iterable[torch.Tensor]) -> int:
    """Give back the resident pages of those ``tensors`` that lie in a safetensors file mapping; the bytes given back.

    Their values are unchanged: the pages are read from the file again when next touched.
    """
    madvise = _madvise()
    mappings = _safetensors_mappings()
    if madvise is None or not mappings:
        return 0
    page = mmap.PAGESIZE
    released = 0
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.numel() == 0 or not tensor.is_contiguous():
            continue
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if not any(m.start <= start and end <= m.end for m in mappings):
            continue
        first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
        if last > first and madvise(first, last - first, _MADV_PAGEOUT) == 0:
            released += last - first
    return released
