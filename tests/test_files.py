"""The streaming safetensors writer: what it writes is what the safetensors library reads back."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from masq_fx.files import SAFETENSORS_DTYPES, write_safetensors

DTYPES = sorted(SAFETENSORS_DTYPES, key=str)


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=generator).to(dtype)


@settings(max_examples=25, deadline=None)
@given(
    entries=st.lists(
        st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3).map(tuple), st.integers(0, 1000)),
        min_size=0,
        max_size=6,
    ),
    metadata=st.booleans(),
)
def test_written_files_read_back_equal_and_deterministic(tmp_path_factory, entries, metadata):
    folder = tmp_path_factory.mktemp("st")
    tensors = {f"t{i}/{dtype}": _tensor(dtype, shape, seed) for i, (dtype, shape, seed) in enumerate(entries)}
    tensors["strided"] = torch.arange(12.0).reshape(3, 4).t()  # not contiguous
    meta = {"manifest_sha256": "ab" * 32} if metadata else None
    write_safetensors(folder / "a.safetensors", tensors, meta)
    write_safetensors(folder / "b.safetensors", dict(reversed(tensors.items())), meta)
    assert (folder / "a.safetensors").read_bytes() == (folder / "b.safetensors").read_bytes()
    loaded = load_file(str(folder / "a.safetensors"))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape and torch.equal(loaded[name], tensor), name
    with safe_open(str(folder / "a.safetensors"), "pt") as opened:
        assert opened.metadata() == meta
    assert sorted(p.name for p in folder.iterdir()) == ["a.safetensors", "b.safetensors"]  # no temporary file left


def test_unsupported_dtypes_are_refused_and_nothing_is_left(tmp_path):
    with pytest.raises(ValueError, match="x is torch.complex64"):
        write_safetensors(tmp_path / "c.safetensors", {"ok": torch.zeros(2), "x": torch.zeros(2, dtype=torch.complex64)})
    assert list(tmp_path.iterdir()) == []
